"""``kaiyuan trial list|run|status|report|promote|rollback NAME``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import orjson

from kaiyuan.cli import EXTRA_COMMANDS, _config
from kaiyuan.config import GatewayConfig
from kaiyuan.trials.models import TrialConfig
from kaiyuan.trials.progress import Progress
from kaiyuan.trials.store import TrialStore


class TrialError(Exception):
    pass


def all_trials(config: GatewayConfig, store: TrialStore | None) -> dict[str, TrialConfig]:
    """Trials from the config file, then the ones defined through the admin API."""
    out = {t.name: t for t in config.trials}
    if store is not None:
        for name, d in store.defs().items():
            out.setdefault(name, TrialConfig.model_validate(d))
    return out


def _open(args: argparse.Namespace) -> tuple[GatewayConfig, TrialStore]:
    from kaiyuan.store.db import open_store

    config = _config(args)
    return config, TrialStore(open_store(args.db or config.store.url))


def _trial(config: GatewayConfig, store: TrialStore, name: str | None) -> TrialConfig:
    trials = all_trials(config, store)
    if not name:
        raise TrialError("name the trial: kaiyuan trial ACTION NAME (see 'kaiyuan trial list')")
    if name not in trials:
        raise TrialError(f"no trial named {name!r}; known: {', '.join(sorted(trials)) or '(none)'}")
    return trials[name]


def _steps(text: str) -> list[float]:
    vals = []
    for x in (x.strip() for x in text.split(",")):
        try:
            vals.append(float(x[:-1]) / 100 if x.endswith("%") else float(x))
        except ValueError:
            raise TrialError(f"--steps must be comma-separated shares such as 0.1,0.5,1 or 10%,50%,100%; got {text!r}") from None
    if not vals or any(not 0 <= v <= 1 for v in vals):
        raise TrialError(f"--steps must be shares between 0 and 1; got {text!r}")
    return vals


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except TrialError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # DatasetError and plugin errors
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    config, store = _open(args)
    action = args.action
    if action == "list":
        for t in all_trials(config, store).values():
            print(f"{t.name}  mode={t.mode}  {t.incumbent} -> {', '.join(t.candidates)}  sample={t.sample_rate}")
        return 0
    trial = _trial(config, store, args.name)
    overrides = {k: v for k, v in (("seed", args.seed), ("order", args.order), ("planned_n", args.planned_n)) if v is not None}
    if overrides:
        trial = TrialConfig.model_validate({**trial.model_dump(mode="json", by_alias=True), **overrides})
    if action == "run":
        return _cmd_run(args, config, store, trial)
    if action in ("status", "report"):
        from kaiyuan.trials.report import build_report, render_text

        if args.margin is not None:
            trial = trial.model_copy(update={"margin": args.margin})
        rep = build_report(trial, store, monthly_requests=args.monthly_requests, resamples=args.resamples)
        print(render_text(rep))
        if action == "report":
            if args.json:
                Path(args.json).write_bytes(orjson.dumps(rep, option=orjson.OPT_INDENT_2))
                print(f"JSON written to {args.json}")
            if args.html:
                from kaiyuan.trials.html import render_html

                Path(args.html).write_text(render_html(rep), encoding="utf-8")
                print(f"HTML written to {args.html}")
        return 0
    if action == "promote":
        cand = args.candidate or trial.candidates[0]
        if cand not in trial.candidates:
            raise TrialError(f"{cand!r} is not a candidate of trial {trial.name}: {', '.join(trial.candidates)}")
        steps = _steps(args.steps) if args.steps else [1.0]
        st = store.record_routing(trial.name, "promote", trial.incumbent, cand, steps, (args.step_minutes or 0) * 60,
                                  actor=os.environ.get("USER"), note=args.note)
        print(f"promoted: {trial.incumbent} traffic now goes to {cand} at {st.share():.0%}"
              + (f", then steps {steps} every {args.step_minutes} min" if len(steps) > 1 else "")
              + " (running gateways apply it within their refresh interval)")
        return 0
    if action == "rollback":
        hist = store.routing_history(trial.name)
        cand = hist[-1]["candidate"] if hist else trial.candidates[0]
        store.record_routing(trial.name, "rollback", trial.incumbent, cand, [0.0], 0, actor=os.environ.get("USER"), note=args.note)
        print(f"rolled back: {trial.incumbent} traffic goes to {trial.incumbent} again")
        return 0
    raise TrialError(f"unknown action {action!r}")


def _cmd_run(args: argparse.Namespace, config: GatewayConfig, store: TrialStore, trial: TrialConfig) -> int:
    from kaiyuan.trials.dataset import from_request_log, load_jsonl
    from kaiyuan.trials.offline import GatewayClient, RunSummary, run_offline

    if args.from_log:
        items = from_request_log(store.engine, trial.incumbent, args.from_log)
    else:
        path = args.dataset or trial.dataset
        if not path:
            raise TrialError(f"trial {trial.name}: give --dataset FILE.jsonl or --from-log N (or set 'dataset' in the trial)")
        items = load_jsonl(path)
    if args.fresh:
        store.clear_results(trial.name)
    url = args.gateway or f"http://{config.server.host}:{config.server.port}"
    key = args.api_key or os.environ.get("KAIYUAN_API_KEY") or config.server.master_key
    progress = Progress(len(items), trial.primary_metric, enabled=True if args.progress else None)
    if trial.mode == "offline":
        print(f"replaying {len(items)} item(s) in " + (f"a seeded random order (seed {trial.seed})" if trial.order == "shuffled"
                                                    else "the dataset's own order"), file=sys.stderr)

    async def go() -> RunSummary:
        async with GatewayClient(url, key, replay=trial.name) as client:
            return await run_offline(trial, items, client, store, config, args.concurrency, progress=progress)

    summary = asyncio.run(go())
    print(f"replayed {summary.items} item(s): {summary.pairs} pair(s), {summary.candidate_failures} candidate failure(s), "
          f"{summary.incumbent_failures} incumbent failure(s), {summary.judge_unparsable} unparsable judge output(s), "
          f"{summary.skipped_policy} candidate call(s) skipped by data policy, "
          f"trial spend ${summary.spent_usd:.4f}"
          + (f" ({summary.backfilled} call(s) priced from the request log)" if summary.backfilled else "") + (" - STOPPED at the budget cap" if summary.stopped_by_budget else ""))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "run", "status", "report", "promote", "rollback"])
    p.add_argument("name", nargs="?")
    p.add_argument("--config", "-c")
    p.add_argument("--db", help="database URL (default: the config's store.url)")
    p.add_argument("--dataset", help="run: JSONL file of requests (optionally with references)")
    p.add_argument("--from-log", type=int, metavar="N", help="run: replay the last N logged requests to the incumbent")
    p.add_argument("--gateway", help="run: gateway URL (default: the config's server address)")
    p.add_argument("--api-key", help="run: key for the gateway (default: $KAIYUAN_API_KEY or the master key)")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--fresh", action="store_true", help="run: forget earlier results of this trial")
    p.add_argument("--seed", type=int, help="run/report: seed of the random replay order (default: the trial's, 0)")
    p.add_argument("--order", choices=["shuffled", "dataset"], help="run/report: replay order (default: shuffled)")
    p.add_argument("--planned-n", type=int, help="status/report: fixed-horizon verdict read once at this many results")
    p.add_argument("--progress", action="store_true", help="run: show the progress bar even when stderr is not a terminal")
    p.add_argument("--json", help="report: write the JSON export here")
    p.add_argument("--html", help="report: write the HTML report here")
    p.add_argument("--monthly-requests", type=float, help="report: project costs at this volume")
    p.add_argument("--margin", type=float, help="status/report: judge non-inferiority at this margin instead")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--candidate", help="promote: which candidate (default: the first)")
    p.add_argument("--steps", help="promote: shares in steps, e.g. 0.1,0.5,1 (default: 1 = all at once)")
    p.add_argument("--step-minutes", type=float, help="promote: minutes between steps")
    p.add_argument("--note", help="recorded with promote / rollback")


EXTRA_COMMANDS.append(("trial", "trials: run, report on, promote or roll back a candidate model", add_arguments, run))

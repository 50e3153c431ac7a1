"""The console's Trials pages: status and verdict, the estimate over time, cost, promote and roll back.

Numbers come from the trial report (kaiyuan.trials.report); the estimate's path over time is the
report's own verdict computed on the first n results for a few n, so the chart and the verdict
cannot disagree. Promote and rollback buttons call ``/admin/trials/{name}/promote|rollback``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from kaiyuan.console.access import Viewer
from kaiyuan.console.pages import _common, admin_page, page, render
from kaiyuan.errors import ErrorKind, GatewayError

CHECKPOINTS = 24
LIST_RESAMPLES = 50
PATH_RESAMPLES = 20


def _runtime(request: web.Request) -> Any:
    from kaiyuan.trials.server import TRIALS_KEY

    rt = request.app.get(TRIALS_KEY)
    if rt is None or rt.store is None:
        raise GatewayError(ErrorKind.NO_DEPLOYMENT, "trials need a database (store.url)", code="no_store")
    return rt


def estimate_path(trial: Any, rows: list[dict[str, Any]], candidate: str) -> dict[str, Any]:
    """The report's verdict (estimate, interval) after the first n results, for up to CHECKPOINTS values of n."""
    from kaiyuan.trials.report import candidate_report

    mine = [r for r in rows if r["candidate"] == candidate]
    total = len(mine)
    sizes = sorted({max(1, round(total * i / CHECKPOINTS)) for i in range(1, CHECKPOINTS + 1)}) if total else []
    points: list[dict[str, Any]] = []
    threshold = None
    for n in sizes:
        v = candidate_report(trial, mine[:n], candidate, PATH_RESAMPLES)["verdict"]
        if v.get("verdict") == "no_data" or v.get("mean") is None:
            continue
        threshold = v.get("threshold")
        points.append({"n": v["n"], "mean": v["mean"], "lo": v["lo"], "hi": v["hi"]})
    return {"points": points, "threshold": threshold}


def _reports(rt: Any, names: list[str] | None, resamples: int) -> list[dict[str, Any]]:
    from kaiyuan.trials.report import build_report

    out = []
    for t in rt.trials.values():
        if names is None or t.name in names:
            out.append(build_report(t, rt.store, resamples=resamples))
    return out


@page
@admin_page
async def trials(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    rt = _runtime(request)
    await rt.flush()
    live = {s["name"]: s for s in rt.status()}
    reports = await asyncio.to_thread(_reports, rt, None, LIST_RESAMPLES)
    return render("trials.html", **_common(viewer, "trials", reports=reports, live=live))


@page
@admin_page
async def trial(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    rt = _runtime(request)
    name = request.match_info["name"]
    t = rt.trials.get(name)
    if t is None:
        raise GatewayError(ErrorKind.NOT_FOUND, f"no trial named {name!r}", code="trial_not_found")
    await rt.flush()
    rep = (await asyncio.to_thread(_reports, rt, [name], 500))[0]
    rows = await asyncio.to_thread(rt.store.results, name)
    paths = {c: await asyncio.to_thread(estimate_path, t, rows, c) for c in t.candidates}
    live = next((s for s in rt.status() if s["name"] == name), None)
    return render("trial.html", **_common(viewer, "trials", rep=rep, paths=paths, live=live))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ui/trials", trials)
    app.router.add_get("/ui/trials/{name}", trial)

"""What the benchmark sends, and to which gateways: the pluggable parts of bench/run.py.

A :class:`Scenario` is one request shape (path, body, headers, stream flag). A :class:`Variant` is
one Kaiyuan process with a config patch (auth, limits, Redis, shadowing...) and the headers its
requests need. Later features add a column by appending to ``SCENARIOS`` or ``VARIANTS`` here;
nothing else in run.py has to change.

``MODELS`` maps the public model names the gateways serve to the upstream model names
(bench/fast_upstream.py reads the stream shape from the upstream name).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STREAM_CHUNKS = 20  # content chunks per fast stream (fast_upstream --chunks)
HOLD_CHUNKS, HOLD_INTERVAL_MS = 100, 100  # the 1,000-stream hold: 100 chunks, 100 ms apart (10 s)
PACED_INTERVAL_MS = 5  # chat-stream-paced: the fast stream's 20 chunks, one per read even under Valgrind

MODELS = {
    "bench": "fast",
    "bench-candidate": "fast",  # the shadow trial's candidate (kaiyuan+shadow100); unused otherwise
    "bench-hold": f"paced-{HOLD_CHUNKS}-{HOLD_INTERVAL_MS}",
    "bench-paced": f"paced-{STREAM_CHUNKS}-{PACED_INTERVAL_MS}",
}

USER_MSG = [{"role": "user", "content": "Say hello to the benchmark in one short sentence."}]


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    body: dict[str, Any]
    stream: bool
    headers: dict[str, str] = field(default_factory=dict)
    # "kaiyuan" also covers its variants; "floor" the bare pass-throughs (bench/floors/)
    targets: tuple[str, ...] = ("direct", "kaiyuan", "litellm", "portkey", "floor")
    baseline: str | None = None  # the scenario whose *direct* numbers are the reference; None: itself
    done_marker: str = "[DONE]"
    expect_chunks: int = 0
    flag: str | None = None  # only run when --with FLAG is given
    probe: bool = False  # skip (and say so) when the gateway answers 404 on this path

    def body_for(self, target: str) -> dict[str, Any]:
        """The body as sent to ``target``: the upstream itself expects the upstream model name."""
        if target == "direct" or target.startswith("floor-"):  # the floors forward bytes untouched
            return {**self.body, "model": MODELS.get(self.body["model"], self.body["model"])}
        return self.body


CHAT = Scenario(
    "chat",
    "/v1/chat/completions",
    {"model": "bench", "messages": USER_MSG, "max_tokens": 64},
    stream=False,
)
CHAT_STREAM = Scenario(
    "chat-stream",
    "/v1/chat/completions",
    {"model": "bench", "messages": USER_MSG, "max_tokens": 64, "stream": True},
    stream=True,
    expect_chunks=STREAM_CHUNKS,
)
# The same stream with its events 5 ms apart, as a model generates them: the gateway reads one event
# at a time (the back-to-back stream arrives in one or two reads under Valgrind, which hides the cost
# per read). For bench/instructions.py --scenario chat-stream-paced -c 1; run.py only with --with paced.
CHAT_STREAM_PACED = dataclasses.replace(CHAT_STREAM, name="chat-stream-paced",
                                        body={**CHAT_STREAM.body, "model": "bench-paced"}, flag="paced")
# Anthropic Messages in, OpenAI-compatible out (issue 3). The upstream speaks OpenAI only, so the
# reference is the direct OpenAI call of the same shape. Skipped when /v1/messages is not there yet.
ANTHROPIC = Scenario(
    "anthropic",
    "/v1/messages",
    {"model": "bench", "max_tokens": 64, "messages": USER_MSG},
    stream=False,
    headers={"anthropic-version": "2023-06-01"},
    targets=("kaiyuan",),  # LiteLLM's /v1/messages calls a path the fake upstream lacks (see notes)
    baseline="chat",
    flag="anthropic",
    probe=True,
)
ANTHROPIC_STREAM = Scenario(
    "anthropic-stream",
    "/v1/messages",
    {"model": "bench", "max_tokens": 64, "messages": USER_MSG, "stream": True},
    stream=True,
    headers={"anthropic-version": "2023-06-01"},
    targets=("kaiyuan",),
    baseline="chat-stream",
    done_marker="message_stop",
    expect_chunks=STREAM_CHUNKS,
    flag="anthropic",
    probe=True,
)

SCENARIOS: list[Scenario] = [CHAT, CHAT_STREAM, CHAT_STREAM_PACED, ANTHROPIC, ANTHROPIC_STREAM]

# The stream-holding mode: one long paced stream per connection.
HOLD = Scenario(
    "hold",
    "/v1/chat/completions",
    {"model": "bench-hold", "messages": USER_MSG, "max_tokens": 64, "stream": True},
    stream=True,
    expect_chunks=HOLD_CHUNKS,
)


@dataclass(frozen=True)
class Variant:
    """A Kaiyuan process with ``config_patch`` deep-merged into the base config.

    ``setup`` runs once the process is ready (``base_url`` -> extra request headers), e.g. to create
    a virtual key through the admin API; ``headers`` are static extra request headers.
    """

    name: str
    config_patch: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    setup: Callable[[str], dict[str, str]] | None = None
    flag: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    redis: bool = False  # run.py starts a private redis-server and sets limits.redis_url
    all_cpus: bool = False  # not pinned to the gateway's CPU: may use every core (the --workers rows)
    supervisor_cpu: str | None = None  # a supervisor (server.supervisor: always) moved to this CPU once ready


MASTER_KEY = "sk-bench-master"
PRICES = {"prices_file": str(Path(__file__).resolve().parent / "prices.yaml")}  # budgets need prices


def _virtual_key(base_url: str) -> dict[str, str]:
    """A virtual key with RPM + TPM + a monthly budget, far above what the benchmark sends."""
    from bench.keys_overhead import key_setup  # imports kaiyuan: only when the variant runs

    return key_setup(base_url, MASTER_KEY)


VARIANTS: list[Variant] = [
    # Auth with the master key only. Issue 6 adds "kaiyuan+shadow100" (a shadow trial at 100%) as
    # one more entry with its config patch.
    Variant(
        "kaiyuan+master-key",
        config_patch={"server": {"master_key": MASTER_KEY}},
        headers={"Authorization": f"Bearer {MASTER_KEY}"},
        flag="auth",
    ),
    # Issue 13 (keys round 4): the pass-through with the bench model priced and no key: each request
    # is costed and writes its spend-ledger row, as a priced model does for any caller. It splits the
    # keyed columns' extra into "a priced request" (this minus plain) and "the key" (keyed minus this).
    Variant("kaiyuan+prices", config_patch={"accounting": PRICES}, flag="prices"),
    # Issue 5: auth + RPM/TPM limits + budget reservation per request, counters in process / in Redis.
    Variant(
        "kaiyuan+keys-sqlite",
        config_patch={"server": {"master_key": MASTER_KEY}, "accounting": PRICES},
        setup=_virtual_key,
        flag="keys",
    ),
    Variant(
        "kaiyuan+keys-redis",
        config_patch={"server": {"master_key": MASTER_KEY}, "accounting": PRICES, "limits": {"backend": "redis"}},
        setup=_virtual_key,
        flag="keys-redis",
        redis=True,
    ),
    # Issue 6: every request to "bench" mirrored to "bench-candidate" in the background (shadow at
    # 100%), priced so the trial ledger is written; no judge, no cap. Compare with plain "kaiyuan".
    Variant(
        "kaiyuan+shadow100",
        config_patch={"trials": [{
            "name": "bench-shadow", "mode": "shadow", "incumbent": "bench", "candidates": ["bench-candidate"],
            "sample_rate": 1.0, "max_concurrency": 64,
            "prices": {"bench-candidate": {"input_per_mtok": 0.1, "output_per_mtok": 0.1}},
        }]},
        flag="shadow",
    ),
    # Issue 13: `kaiyuan serve --workers 2` on both cores, which it shares with the upstream and the
    # load generators here (the plain column is one worker: pinned to one CPU, the default is 1).
    Variant("kaiyuan-workers2", config_patch={"server": {"workers": 2}}, flag="workers", all_cpus=True),
    # Issue 13: one worker on the gateway's CPU, its request log written by a supervisor moved to the
    # load generators' CPU (server.supervisor: always). CPU per request counts both processes.
    Variant("kaiyuan-sup", config_patch={"server": {"workers": 1, "supervisor": "always"}}, flag="sup",
            supervisor_cpu="0"),
    # Issue 13: the default layout with a key: the worker's limits and budget are held by its
    # supervisor (limits.shared; most admits from the worker's leased slices, limits.lease), exact
    # across workers.
    Variant("kaiyuan-sup+keys", config_patch={"server": {"workers": 1, "supervisor": "always", "master_key": MASTER_KEY},
                                              "accounting": PRICES},
            setup=_virtual_key, flag="keys-sup", supervisor_cpu="0"),
    # Diagnostic: the same gateway without the request log, to see what the log costs.
    Variant("kaiyuan-nolog", config_patch={"request_log": {"enabled": False}}, flag="nolog"),
]


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out

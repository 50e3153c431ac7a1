"""A gateway with a master key, a seeded request log and a team's virtual key, for the console tests."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

from bench.console_seed import MODELS, TEAMS, seed
from kaiyuan.console import rollup
from kaiyuan.testing.harness import RunningGateway
from tests.http import http

MASTER = "sk-console-master-0123456789"
SEED_ROWS = 3000


@dataclass
class Console:
    gw: RunningGateway
    team_key: str  # a virtual key of TEAMS[0]
    team_key_id: str
    other_team: str  # TEAMS[1]

    @property
    def url(self) -> str:
        return self.gw.url

    def api(self, method: str, path: str, key: str = MASTER, json: Any = None) -> Any:
        r = http(method, self.url + path, json=json, key=key)
        assert r.status_code < 300, (path, r.status_code, r.text)
        return r.json()

    def session(self, key: str = MASTER) -> httpx.Client:
        """A signed-in browser-like client (cookies kept, redirects not followed)."""
        c = httpx.Client(base_url=self.url, follow_redirects=False, timeout=30)
        form = c.get("/ui/login")
        token = form.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        r = c.post("/ui/login", data={"csrf": token, "key": key, "next": "/ui/overview"})
        assert r.status_code == 303, r.text
        return c


VENDORS = {"deepseek-chat": "deepseek", "qwen-plus": "alibaba", "qwen-local": "self-hosted", "gpt-4o": "openai"}


def config(upstream: str, **console: Any) -> dict[str, Any]:
    """The seeded models (bench.console_seed.MODELS, same deployment ids and prices), all on the fake upstream."""
    models = []
    for name, dep, pin, pout, _ in MODELS:
        d = {"provider": "openai_compatible", "base_url": upstream + "/v1", "model": dep.split(":", 1)[1].split("@")[0],
             "api_key": "sk-upstream", "id": dep, "price": {"input": pin, "output": pout}}
        d["vendor"] = VENDORS[name]  # as the real hosts would say (the fake upstream is on 127.0.0.1)
        if name == "qwen-local":
            d["tags"] = ["self_hosted"]
        models.append({"name": name, "deployments": [d], "log_bodies": name == "deepseek-chat"})
    trial = {"name": "4o-to-deepseek", "incumbent": "gpt-4o", "candidates": ["deepseek-chat"], "mode": "shadow",
             "sample_rate": 0.0, "scorers": [{"type": "exact"}]}
    return {"server": {"master_key": MASTER}, "console": {"reference_model": "gpt-4o", **console}, "models": models,
            "trials": [trial]}


TRIAL = "4o-to-deepseek"


def seed_trial(engine: Any, n: int = 240, now: float | None = None) -> None:
    """Stored results of the trial: the candidate matches the reference on ~97% of items."""
    import random

    import orjson

    from kaiyuan.trials.store import TrialStore

    now = time.time() if now is None else now
    rng = random.Random(3)
    rows = []
    for i in range(n):
        cand = 1.0 if rng.random() < 0.97 else 0.0
        rows.append({"id": f"tr-{i}", "trial": TRIAL, "ts": now - (n - i) * 60, "source": "shadow", "item": f"req-{i}",
                     "candidate": "deepseek-chat", "request": "q", "incumbent_answer": "a", "candidate_answer": "a" if cand else "b",
                     "incumbent_ms": 900 + rng.random() * 200, "candidate_ms": 600 + rng.random() * 200,
                     "incumbent_cost": 0.004, "candidate_cost": 0.0004, "incumbent_error": None, "candidate_error": None,
                     "judge_score": None, "judge_status": None, "judge_detail": None,
                     "scores": orjson.dumps({"exact": {"incumbent": 1.0, "candidate": cand}}).decode()})
    TrialStore(engine).add_results(rows)


def start(make_gateway: Any, upstream: str, rows: int = SEED_ROWS, **console: Any) -> Console:
    gw = make_gateway(config(upstream, **console))
    assert gw.gateway.engine is not None
    now = time.time()
    seed(gw.gateway.engine, rows, now, days=7)
    rollup.catch_up(gw.gateway.engine)
    seed_trial(gw.gateway.engine, now=now)
    key = http("POST", gw.url + "/admin/keys", json={"name": "search-viewer", "team_id": TEAMS[0]}, key=MASTER).json()
    return Console(gw, key["key"], key["id"], TEAMS[1])

"""Shadow mode: the client's response is unchanged and not delayed; trial traffic respects data policy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from kaiyuan.config import parse_config
from kaiyuan.context import Principal, RequestContext
from kaiyuan.gateway import Gateway
from kaiyuan.providers.base import UpstreamCall, UpstreamReply
from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from kaiyuan.testing.server_thread import ServerThread
from kaiyuan.trials.runtime import TrialsRuntime
from tests.conftest import openai_model


class StallingFake(FakeOpenAI):
    """Answers chat only once ``release`` is set (an asyncio.Event on the server loop)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.release: asyncio.Event | None = None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if self.release is None:
            self.release = asyncio.Event()
        self.requests.append({"stalled": True})
        await self.release.wait()
        self.requests.pop()
        return await super().chat(request)


@pytest.fixture
def stalling(servers: ServerThread) -> Iterator[StallingFake]:
    fake = StallingFake(api_key="sk-upstream")
    fake.url = servers.serve(fake.app)  # type: ignore[attr-defined]
    yield fake

    async def release() -> None:
        if fake.release is not None:
            fake.release.set()

    servers.call(release())
    servers.stop(fake.app)


def runtime_of(gw: RunningGateway) -> TrialsRuntime:
    return next(h.__self__ for h in gw.gateway.on_complete if isinstance(getattr(h, "__self__", None), TrialsRuntime))


def wait_for(cond: Any, what: str, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def shadow_gateway(make_gateway: Any, inc_url: str, cand_url: str, **trial: Any) -> RunningGateway:
    cand_extra = trial.pop("cand_extra", {})
    inc_extra = trial.pop("inc_extra", {})
    return make_gateway({
        "models": [openai_model("gpt-big", inc_url, "big", **inc_extra), openai_model("qwen-small", cand_url, "small", **cand_extra)],
        "trials": [{"name": "sh", "mode": "shadow", "incumbent": "gpt-big", "candidates": ["qwen-small"],
                    "sample_rate": 1.0, "scorers": [{"type": "regex", "pattern": "^echo: "}], **trial}],
    })


def client(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=20)


@pytest.mark.parametrize("stream", [False, True])
def test_shadow_never_changes_or_delays_the_response(make_gateway: Any, fake_openai: FakeOpenAI, stalling: StallingFake,
                                                      servers: ServerThread, stream: bool) -> None:
    plain = make_gateway({"models": [openai_model("gpt-big", fake_openai.url, "big")]})  # type: ignore[attr-defined]
    shadowed = shadow_gateway(make_gateway, fake_openai.url, stalling.url)  # type: ignore[attr-defined]
    msgs = [{"role": "user", "content": "what is two plus two"}]

    def ask(gw: RunningGateway) -> Any:
        if stream:
            chunks = list(client(gw).chat.completions.create(model="gpt-big", messages=msgs, stream=True))
            return ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices), [c.choices[0].finish_reason for c in chunks]]
        r = client(gw).chat.completions.create(model="gpt-big", messages=msgs)
        return [r.model, r.choices[0].model_dump(), r.usage.model_dump() if r.usage else None]

    expected = ask(plain)
    got = ask(shadowed)  # the candidate upstream is stalled: this returns only if nothing waits for it
    assert got == expected
    rt = runtime_of(shadowed)
    wait_for(lambda: len(stalling.requests) == 1, "the shadow call to reach the stalled candidate")
    assert rt.pending["sh"] == 1 and rt.counters["sh"]["results"] == 0  # the client returned while the shadow was in flight
    servers.call(_set(stalling))
    wait_for(lambda: rt.counters["sh"]["results"] == 1, "the shadow result")
    servers.call(rt.flush())
    assert rt.store is not None
    row = rt.store.results("sh")[0]
    assert row["source"] == "shadow" and row["candidate_answer"] == "echo: what is two plus two"
    assert row["incumbent_answer"] == "echo: what is two plus two" and row["scores"] is not None
    assert row["scores"] == '{"regex":{"incumbent":1.0,"candidate":1.0}}'


async def _set(f: StallingFake) -> None:
    assert f.release is not None
    f.release.set()


def test_restricted_requests_are_not_mirrored_elsewhere(make_gateway: Any, fake_openai: FakeOpenAI, servers: ServerThread) -> None:
    cand = FakeOpenAI(api_key="sk-upstream")
    cand_url = servers.serve(cand.app)
    try:
        own = {"deployment": {"tags": ["self_hosted"]}}  # the incumbent itself may take restricted requests
        gw = shadow_gateway(make_gateway, fake_openai.url, cand_url, inc_extra=own)  # type: ignore[attr-defined]
        rt = runtime_of(gw)
        c = client(gw)
        c.chat.completions.create(model="gpt-big", messages=[{"role": "user", "content": "secret"}],
                                  extra_headers={"x-kaiyuan-policy": "self_hosted"})
        wait_for(lambda: rt.counters["sh"]["skipped_policy"] == 1, "the policy skip")
        c.chat.completions.create(model="gpt-big", messages=[{"role": "user", "content": "public"}])
        wait_for(lambda: rt.counters["sh"]["results"] == 1, "the unrestricted shadow")
        assert [r["messages"][0]["content"] for r in cand.requests] == ["public"]
        # the same restricted request is mirrored when the candidate is self-hosted
        gw2 = shadow_gateway(make_gateway, fake_openai.url, cand_url, inc_extra=own, cand_extra=own)  # type: ignore[attr-defined]
        client(gw2).chat.completions.create(model="gpt-big", messages=[{"role": "user", "content": "secret2"}],
                                            extra_headers={"x-kaiyuan-policy": "self_hosted"})
        wait_for(lambda: runtime_of(gw2).counters["sh"]["results"] == 1, "the self-hosted shadow")
        assert cand.requests[-1]["messages"][0]["content"] == "secret2"
    finally:
        servers.stop(cand.app)


def test_shadow_spend_stops_at_the_cap(make_gateway: Any, fake_openai: FakeOpenAI) -> None:
    url = fake_openai.url  # type: ignore[attr-defined]
    gw = shadow_gateway(make_gateway, url, url, budget_usd=0.0001, max_concurrency=1,
                        prices={"qwen-small": {"input_per_mtok": 20, "output_per_mtok": 20}})
    rt = runtime_of(gw)
    c = client(gw)
    for i in range(6):
        c.chat.completions.create(model="gpt-big", messages=[{"role": "user", "content": f"question number {i}"}])
        gw.settle()  # the answer may reach the client before the trial's hook has seen the request
        wait_for(lambda: rt.pending["sh"] == 0, "shadow idle")
    # each shadow call costs ~0.00018 USD: the first one exhausts the cap, later requests are not sampled
    assert rt.counters["sh"]["results"] == 1 and rt.exhausted(rt.trials["sh"])
    gw.servers.call(rt.flush())
    assert rt.store is not None and rt.store.spent("sh") == pytest.approx(rt.spent["sh"]) and rt.spent["sh"] > 0.0001
    assert sum(1 for r in fake_openai.requests if r["model"] == "small") == 1


# -- property: trial calls never leave the request's data policy ---------------------------------------

TAGS = ["self_hosted", "region:eu", "vendor:openai"]
TAG_SETS = [[], ["self_hosted"], ["region:eu"], ["self_hosted", "region:eu"], ["vendor:openai"], ["vendor:openai", "region:eu"]]


def reference_allows(policy: str | None, tags: list[str]) -> bool:
    """An independent reading of the policy language, for the property below."""
    if not policy:
        return True
    for term in policy.split(","):
        if not term.strip():
            continue
        ok = False
        for alt in term.split("|"):
            alt = alt.strip()
            ok = ok or ((alt[1:] not in tags) if alt.startswith("!") else (alt in tags))
        if not ok:
            return False
    return True


literal = st.builds(lambda neg, tag: ("!" if neg else "") + tag, st.booleans(), st.sampled_from(TAGS))
term = st.lists(literal, min_size=1, max_size=2).map("|".join)
policy_text = st.one_of(st.none(), st.just(""), st.lists(term, min_size=1, max_size=3).map(",".join))


def _policy_gateway() -> Gateway:
    models = [{"name": "inc", "deployments": [{"provider": "openai_compatible", "base_url": "http://127.0.0.1:9/0", "model": "m0"}]}]
    i = 0
    for name in ("cand", "judge"):
        deps = []
        for tags in TAG_SETS:
            i += 1
            deps.append({"provider": "openai_compatible", "base_url": f"http://127.0.0.1:9/{i}", "model": f"m{i}", "tags": tags})
        models.append({"name": name, "deployments": deps})
    cfg = parse_config({"models": models, "trials": [{"name": "p", "incumbent": "inc", "candidates": ["cand"], "sample_rate": 1.0,
                                                      "judge": {"model": "judge"}}]})
    return Gateway(cfg)


@settings(max_examples=200, deadline=None)
@given(ctx_policy=policy_text, principal_policy=policy_text, header_policy=policy_text, fail=st.booleans())
def test_property_trial_calls_respect_the_request_policy(ctx_policy: str | None, principal_policy: str | None,
                                                         header_policy: str | None, fail: bool) -> None:
    gw = _policy_gateway()
    rt = TrialsRuntime(gw)
    called: list[Any] = []
    for ps in gw.providers.values():
        for p in ps:
            async def send(call: UpstreamCall, p: Any = p) -> UpstreamReply:
                called.append(p)
                if fail:  # retryable: the mirror tries every deployment it is allowed to
                    return UpstreamReply(503, {}, b'{"error": {"message": "busy"}}')
                return UpstreamReply(200, {}, b'{"choices":[{"index":0,"message":{"role":"assistant","content":"x [[C]]"}}]}')
            p.send = send  # type: ignore[method-assign]
    headers = {"x-kaiyuan-policy": header_policy} if header_policy is not None else {}
    ctx = RequestContext("r1", "openai", "chat", headers=headers, model="inc", policy=ctx_policy,
                         principal=Principal(policy=principal_policy), body={"messages": [{"role": "user", "content": "q"}]})
    ctx.status = 200
    ctx.response_body = b'{"choices":[{"index":0,"message":{"role":"assistant","content":"a"}}]}'

    async def go() -> None:
        rt.pre_route(ctx)
        rt.on_complete(ctx)
        await asyncio.gather(*rt.tasks)

    asyncio.run(go())
    policies = [ctx_policy, principal_policy, header_policy]
    for p in called:
        assert all(reference_allows(pol, p.deployment.tags) for pol in policies), (policies, p.deployment.tags)
    # not vacuous: when they all fail, the executor tried as many distinct allowed deployments of the
    # candidate as its routing.retries.max_attempts lets it (trial calls go through the same executor)
    permitted = [p for p in gw.providers["cand"] if all(reference_allows(pol, p.deployment.tags) for pol in policies)]
    if fail:
        tried = {id(p) for p in called}
        assert tried <= {id(p) for p in permitted}
        assert len(tried) == min(gw.models["cand"].routing.retries.max_attempts, len(permitted))
    elif permitted:
        assert any(p in called for p in gw.providers["cand"])


def test_participating_keys_teams_and_dialects() -> None:
    base = "http://127.0.0.1:9/v1"
    models = [{"name": n, "deployments": [{"provider": "openai_compatible", "base_url": base, "model": n}]} for n in ("inc", "cand")]
    cfg = parse_config({"models": models, "trials": [
        {"name": "k", "incumbent": "inc", "candidates": ["cand"], "sample_rate": 1.0, "keys": ["key-a"], "teams": ["t1"]}]})
    rt = TrialsRuntime(Gateway(cfg))

    def sampled(key: str | None, team: str | None, dialect: str = "openai", endpoint: str = "chat", model: str = "inc") -> bool:
        ctx = RequestContext("r", dialect, endpoint, model=model, principal=Principal(key_id=key, team_id=team))
        rt.pre_route(ctx)
        rt.pre_route(ctx)  # idempotent if the hook runs twice
        assert ctx.trial_shadow in ((), ("k",))
        return bool(ctx.trial_shadow)

    assert sampled("key-a", "t1")
    assert not sampled("key-b", "t1") and not sampled("key-a", "t2") and not sampled(None, None)
    assert sampled("key-a", "t1", dialect="anthropic", endpoint="messages")  # Anthropic Messages traffic is mirrored too
    assert not sampled("key-a", "t1", dialect="anthropic")  # (no such endpoint: the answer is not captured)
    assert not sampled("key-a", "t1", endpoint="embeddings") and not sampled("key-a", "t1", model="cand")


def test_shadow_across_protocols(make_gateway: Any, fake_openai: FakeOpenAI, fake_anthropic: Any) -> None:
    """An Anthropic-protocol candidate (and incumbent) behind an OpenAI caller: translated both ways."""
    claude = {"name": "claude", "deployments": [{"provider": "anthropic", "base_url": fake_anthropic.url, "model": "claude-up",
                                                 "api_key": "sk-ant-upstream"}]}
    gw = make_gateway({
        "models": [openai_model("gpt-big", fake_openai.url, "big"), claude],  # type: ignore[attr-defined]
        "trials": [{"name": "to-claude", "incumbent": "gpt-big", "candidates": ["claude"], "sample_rate": 1.0},
                   {"name": "from-claude", "incumbent": "claude", "candidates": ["gpt-big"], "sample_rate": 1.0}],
    })
    rt = runtime_of(gw)
    c = client(gw)
    assert c.chat.completions.create(model="gpt-big", messages=[{"role": "user", "content": "one"}]).choices[0].message.content == "echo: one"
    assert c.chat.completions.create(model="claude", messages=[{"role": "user", "content": "two"}], max_tokens=50
                                     ).choices[0].message.content == "echo: two"
    wait_for(lambda: rt.counters["to-claude"]["results"] == 1 and rt.counters["from-claude"]["results"] == 1, "both shadows")
    gw.servers.call(rt.flush())
    assert rt.store is not None
    a, b = rt.store.results("to-claude")[0], rt.store.results("from-claude")[0]
    assert (a["incumbent_answer"], a["candidate_answer"], a["candidate_error"]) == ("echo: one", "echo: one", None)
    assert (b["incumbent_answer"], b["candidate_answer"], b["candidate_error"]) == ("echo: two", "echo: two", None)
    sent = [r["messages"][0]["content"] for r in fake_anthropic.requests]
    assert any(x in ("one", [{"type": "text", "text": "one"}]) for x in sent)  # the mirror spoke Anthropic's format
    assert all("max_tokens" in r for r in fake_anthropic.requests)

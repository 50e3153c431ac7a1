"""Regressions (issue 9, section 3): trust defects on the streaming request path.

- An uncompressed upstream stream had no overall size cap (compressed ones were capped after
  decompression): an upstream that streams without end (events with no tokens, an endless SSE
  comment) was bounded only by ``timeouts.total``. Now every stream is capped at the deployment's
  ``max_stream_bytes``: the upstream request is closed, the caller's stream ends with one error
  event in its own dialect, and the ledger records what was counted (the prompt, and the output
  tokens counted on the way).
- A pass-through upstream that sent its own SSE ``error`` event and then closed got two error
  events to the caller (its own, then the gateway's "ended early"). Now exactly one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from kaiyuan.config import ConfigError, parse_config
from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.http import http
from tests.regressions.budget_kit import MASTER, anth, cost, ledger, new_key, oai, priced, usd
from tests.test_trials_shadow import wait_for

LIMIT = 1024 * 1024  # max_stream_bytes in these tests
IN, OUT = 1.0, 1000.0
MSGS: Any = [{"role": "user", "content": "hello"}]
COMMENT = b": keep-alive\n\n"  # an SSE comment: nothing to count, nothing to relay
EMPTY_CHUNK = (b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"up-m","choices":'
               b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":null}]}\n\n')  # an event with no tokens
PING = b'event: ping\ndata: {"type": "ping"}\n\n'


@pytest.fixture
def gw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI, fake_anthropic: Any,
       fake_gemini: Any) -> RunningGateway:
    dep = {"max_stream_bytes": LIMIT}
    return make_gateway({"server": {"master_key": MASTER}, "models": [
        priced("m", fake_openai.url, "up-m", IN, OUT, dep=dep),
        priced("claude", fake_anthropic.url, "claude-up", IN, OUT, protocol="anthropic", dep=dep),
        priced("gem", fake_gemini.url, "gemini-up", IN, OUT, protocol="gemini", dep=dep),
        priced("native", fake_openai.url, "up-resp", IN, OUT, dep={**dep, "responses_api": True}),
        priced("wide", fake_openai.url, "up-m", IN, OUT),  # the default max_stream_bytes
    ]})


def _billed_counted(gw: RunningGateway, key_id: str, completion: int) -> None:
    """The ledger row bills the prompt (counted) and ``completion`` output tokens (counted)."""
    [row] = ledger(gw, key_id)
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] == completion
    assert usd(row["cost_usd"]) == cost(row["prompt_tokens"], completion, IN, OUT)
    log = gw.log_rows()[-1]
    assert log["status"] == 502 and "max_stream_bytes" in log["error"]


def _closed(fake: Any) -> None:
    wait_for(lambda: fake.cancelled == 1, "the upstream to see its request closed", limit=10.0)


def test_an_endless_comment_stream_is_cut_for_an_openai_caller(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 100}])
    fake_openai.default = Behaviour(endless=COMMENT, endless_after=3)  # role, "echo:", " hello", then comments
    got = []
    with pytest.raises(openai.APIError) as e:
        for ch in oai(gw, k["key"]).chat.completions.create(model="m", messages=MSGS, stream=True):
            got.append(ch.choices[0].delta.content or "" if ch.choices else "")
    assert "".join(got) == "echo: hello"
    assert "max_stream_bytes" in e.value.message and str(LIMIT) in e.value.message
    _closed(fake_openai)
    _billed_counted(gw, k["id"], 2)


def _anthropic_until_cut(gw: RunningGateway, key: str, model: str) -> tuple[str, anthropic.APIStatusError]:
    """The text an Anthropic SDK caller got before its stream failed, and the failure."""
    got = []
    with pytest.raises(anthropic.APIStatusError) as e:
        with anth(gw, key).messages.stream(model=model, max_tokens=100, messages=MSGS) as s:
            for text in s.text_stream:
                got.append(text)
    return "".join(got), e.value


def test_endless_empty_events_are_cut_for_an_anthropic_caller(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 100}])
    fake_openai.default = Behaviour(endless=EMPTY_CHUNK, endless_after=3)
    text, err = _anthropic_until_cut(gw, k["key"], "m")
    assert text == "echo: hello"
    assert "max_stream_bytes" in str(err)
    _closed(fake_openai)
    _billed_counted(gw, k["id"], 2)


def test_endless_pings_are_cut_on_an_anthropic_pass_through(gw: RunningGateway, fake_anthropic: Any) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 100}])
    fake_anthropic.default = Behaviour(endless=PING, endless_after=4)  # message_start, block start, ping, "echo:"
    text, err = _anthropic_until_cut(gw, k["key"], "claude")
    assert text == "echo:"
    assert "max_stream_bytes" in str(err)
    _billed_counted(gw, k["id"], 1)


# The cut bills the usage the Anthropic upstream already reported (docs/robustness.md, "Stream size"):
# message_start's input tokens and a message_delta's output tokens, not the gateway's own counts.
LONG: Any = [{"role": "user", "content": "lorem ipsum " * 300}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": "hello"}]  # a long prompt (so 777 tokens are plausible), the answer "echo: hello"
REPORTED = {"input_tokens": 777, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}


def _cut_anthropic_long(gw: RunningGateway, key: str) -> str:
    got = []
    with pytest.raises(anthropic.APIStatusError) as e:
        with anth(gw, key).messages.stream(model="claude", max_tokens=100, messages=LONG) as s:
            got.extend(s.text_stream)
    assert "max_stream_bytes" in str(e.value)
    return "".join(got)


def _billed(gw: RunningGateway, key_id: str, prompt: int, completion: int) -> None:
    [row] = ledger(gw, key_id)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
    assert usd(row["cost_usd"]) == cost(prompt, completion, IN, OUT)


def test_a_cut_anthropic_pass_through_bills_message_start_s_prompt(gw: RunningGateway, fake_anthropic: Any) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 100}])
    fake_anthropic.default = Behaviour(endless=PING, endless_after=4, usage=REPORTED)  # message_start .. "echo:"
    assert _cut_anthropic_long(gw, k["key"]) == "echo:"
    _billed(gw, k["id"], 777, 1)  # the upstream's prompt; one content event counted (message_start said 1)


def test_a_cut_anthropic_pass_through_bills_message_delta_s_output(gw: RunningGateway, fake_anthropic: Any) -> None:
    """Cut after message_delta (the upstream's final output count) but before message_stop."""
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 100}])
    # message_start, block start, ping, "echo:", " hello", block stop, message_delta, then endless pings
    fake_anthropic.default = Behaviour(endless=PING, endless_after=7, usage={**REPORTED, "output_tokens": 40})
    assert _cut_anthropic_long(gw, k["key"]) == "echo: hello"
    _billed(gw, k["id"], 777, 40)  # more than the 2 events counted: the upstream's count wins


def test_a_cut_anthropic_pass_through_with_no_usage_yet_bills_the_gateway_s_count(gw: RunningGateway,
                                                                                  fake_anthropic: Any) -> None:
    from kaiyuan.accounting.tokens import count_prompt

    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 100}])
    fake_anthropic.default = Behaviour(endless=PING, endless_after=0, usage=REPORTED)  # pings before message_start
    assert _cut_anthropic_long(gw, k["key"]) == ""
    counted = count_prompt("claude-up", {"model": "claude", "max_tokens": 100, "messages": LONG, "stream": True})
    assert counted != 777
    _billed(gw, k["id"], counted, 0)


@pytest.mark.parametrize("model", ["claude", "gem"])
def test_a_cut_translated_stream_bills_the_upstream_s_prompt(gw: RunningGateway, fake_anthropic: Any, fake_gemini: Any,
                                                             model: str) -> None:
    """The same for an OpenAI caller of an Anthropic or Gemini upstream (the stream translated):
    message_start's input tokens, or the first Gemini chunk's usageMetadata.promptTokenCount."""
    from kaiyuan.testing.fake_openai import count_tokens

    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 100}])
    if model == "claude":
        fake_anthropic.default = Behaviour(endless=PING, endless_after=4, usage=REPORTED)
        prompt = 777
    else:  # the fake counts words + 2 per turn; one chunk ("echo:"), then endless comments
        fake_gemini.default = Behaviour(endless=COMMENT, endless_after=1)
        prompt = sum(count_tokens(m["content"]) + 2 for m in LONG)
    got = []
    with pytest.raises(openai.APIError) as e:
        for ch in oai(gw, k["key"]).chat.completions.create(model=model, messages=LONG, max_tokens=100, stream=True):
            got.append(ch.choices[0].delta.content or "" if ch.choices else "")
    assert "".join(got) == "echo:" and "max_stream_bytes" in e.value.message
    _billed(gw, k["id"], prompt, 1)


@pytest.mark.parametrize("model", ["m", "native"])  # translated from chat, and a Responses pass-through
def test_an_endless_stream_is_cut_for_a_responses_caller(gw: RunningGateway, fake_openai: FakeOpenAI, model: str) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 100}])
    fake_openai.default = Behaviour(endless=COMMENT, endless_after=3)
    with pytest.raises(openai.APIError) as e:
        with oai(gw, k["key"]).responses.stream(model=model, input="hello") as s:
            for _ in s:
                pass
    assert "max_stream_bytes" in e.value.message
    _closed(fake_openai)
    [row] = ledger(gw, k["id"])
    assert row["prompt_tokens"] > 0 and gw.log_rows()[-1]["status"] == 502


def test_a_stream_within_the_limit_is_untouched(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    """Just under the limit: the answer is whole (the limit counts bytes, it does not cut early)."""
    fake_openai.default = Behaviour(content="x" * (LIMIT // 2))
    k = new_key(gw)
    text = "".join(ch.choices[0].delta.content or "" for ch in
                   oai(gw, k["key"]).chat.completions.create(model="m", messages=MSGS, stream=True) if ch.choices)
    assert text == "x" * (LIMIT // 2)


@pytest.mark.parametrize("bad", [0, -1, "lots", None])
def test_a_bad_max_stream_bytes_is_a_config_error_naming_it(bad: Any) -> None:
    cfg = {"models": [{"name": "m", "deployments": [{"provider": "openai_compatible", "base_url": "http://x/v1",
                                                      "model": "m", "max_stream_bytes": bad}]}]}
    with pytest.raises(ConfigError, match="max_stream_bytes"):
        parse_config(cfg, "<test>")


def test_the_default_holds_the_longest_answers() -> None:
    """256 MiB: 128k output tokens at ~2 KB an event (top-20 logprobs) fit (docs/robustness.md)."""
    cfg = parse_config({"models": [{"name": "m", "deployments": [
        {"provider": "openai_compatible", "base_url": "http://x/v1", "model": "m"}]}]}, "<test>")
    assert cfg.models[0].deployments[0].max_stream_bytes == 256 * 1024 * 1024  # type: ignore[union-attr]
    assert 128_000 * 2048 < 256 * 1024 * 1024


# -- one error event, not two ---------------------------------------------------------------------
def _sse(gw: RunningGateway, path: str, body: dict[str, Any]) -> str:
    r = http("POST", gw.url + path, body, MASTER)
    assert r.status_code == 200, r.text
    return r.text


def _events(text: str) -> list[tuple[str, Any]]:
    """(event name, data) of each event of an SSE body."""
    out = []
    for block in text.split("\n\n"):
        name, data = "", None
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:") and line[5:].strip() != "[DONE]":
                data = json.loads(line[5:])
        if name or data is not None:
            out.append((name, data))
    return out


def _errors(events: list[tuple[str, Any]]) -> list[Any]:
    """The error events (a Responses stream's ``response.failed`` after one is its end, not another error)."""
    return [d for name, d in events if name == "error" or (isinstance(d, dict) and (
        d.get("type") == "error" or ("error" in d and "type" not in d and "choices" not in d)))]


@pytest.mark.parametrize(("path", "model", "fake"), [
    ("/v1/chat/completions", "m", "openai"),  # OpenAI pass-through
    ("/v1/messages", "claude", "anthropic"),  # Anthropic pass-through
    ("/v1/responses", "native", "openai"),  # Responses pass-through
    ("/v1/messages", "m", "openai"),  # translated: OpenAI upstream, Anthropic caller
    ("/v1/chat/completions", "claude", "anthropic"),  # translated: Anthropic upstream, OpenAI caller
    ("/v1/responses", "m", "openai"),  # translated: chat upstream, Responses caller
])
def test_an_upstream_error_event_then_close_is_one_error_event(gw: RunningGateway, fake_openai: FakeOpenAI,
                                                                fake_anthropic: Any, path: str, model: str,
                                                                fake: str) -> None:
    (fake_openai if fake == "openai" else fake_anthropic).default = Behaviour(error_event_after_chunks=3)
    body: dict[str, Any] = {"model": model, "stream": True}
    if path == "/v1/responses":
        body["input"] = "hello there"
    else:
        body.update(messages=MSGS, max_tokens=50)
    events = _events(_sse(gw, path, body))
    [err] = _errors(events)
    after = events[[d for _n, d in events].index(err) + 1:]
    assert [n or d.get("type") for n, d in after] in ([], ["response.failed"]), events  # nothing after it but the end
    gw.settle()
    row = gw.log_rows()[-1]
    assert row["status"] >= 500 and "mid-stream" in row["error"]


# -- one huge event on a translated stream --------------------------------------------------------
def _tool_stream(args: str) -> list[bytes]:
    """An OpenAI chat stream whose one tool call's arguments come in a single event."""
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "up-m"}

    def ev(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b"data: " + json.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).encode() + b"\n\n"

    return [ev({"role": "assistant", "content": None, "tool_calls": [
               {"index": 0, "id": "call_1", "type": "function", "function": {"name": "write", "arguments": ""}}]}),
            ev({"tool_calls": [{"index": 0, "function": {"arguments": args}}]}),
            ev({}, "tool_calls"),
            b"data: " + json.dumps({**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9,
                                                                     "total_tokens": 14}}).encode() + b"\n\n"]


TOOLS: Any = [{"name": "write", "description": "write a file", "input_schema": {"type": "object"}}]


def test_a_5_mib_tool_argument_event_is_translated(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    text = ("x" * 1000 + "é\n") * 5200
    stream = _tool_stream(json.dumps({"text": text}))
    assert 5 * 1024 * 1024 < len(stream[1]) < 5.5 * 1024 * 1024
    fake_openai.default = Behaviour(raw_stream=stream)
    with anth(gw, MASTER).messages.stream(model="wide", max_tokens=100, messages=MSGS, tools=TOOLS) as s:
        final = s.get_final_message()
    [block] = [b for b in final.content if b.type == "tool_use"]
    assert block.input == {"text": text} and final.stop_reason == "tool_use"


def test_a_9_mib_event_is_refused_on_a_translated_stream_and_passed_on_a_pass_through(
        gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    args = json.dumps({"text": "x" * (9 * 1024 * 1024)})
    fake_openai.default = Behaviour(raw_stream=_tool_stream(args))
    with pytest.raises(anthropic.APIStatusError) as e:
        with anth(gw, MASTER).messages.stream(model="wide", max_tokens=100, messages=MSGS, tools=TOOLS) as s:
            s.get_final_message()
    msg = str(e.value)
    assert f"larger than {8 * 1024 * 1024} bytes" in msg and "translated" in msg and "do not stream" in msg
    gw.settle()
    assert gw.log_rows()[-1]["status"] == 502
    # the same event to an OpenAI caller is a pass-through: scanned, not parsed, and relayed whole
    chunks = list(oai(gw, MASTER).chat.completions.create(model="wide", messages=MSGS, stream=True))
    got = "".join(c.choices[0].delta.tool_calls[0].function.arguments or "" for c in chunks  # type: ignore[index, union-attr]
                  if c.choices and c.choices[0].delta.tool_calls)
    assert got == args


# -- event framing: one long event is assembled whole, whatever its chunks -----------------------
async def _chunks(data: bytes, cuts: list[int]) -> Any:
    last = 0
    for c in [*cuts, len(data)]:
        yield data[last:c]
        last = c


@pytest.mark.parametrize("seed", range(8))
async def test_long_events_are_framed_whole_across_any_chunking(seed: int) -> None:
    import random

    from kaiyuan.server.sse_framer import HOLD_FROM, sse_events

    rng = random.Random(seed)
    events = [b"data: " + bytes([97 + i]) * rng.choice([10, HOLD_FROM // 3, HOLD_FROM * 3]) for i in range(6)]
    sep = b"\r\n\r\n" if seed % 2 else b"\n\n"
    data = sep.join(events) + sep
    # cuts everywhere, and at each separator's every byte (a terminator split across chunks)
    cuts = sorted({rng.randrange(1, len(data)) for _ in range(60)} |
                  {i + k for i in range(len(data)) if data.startswith(sep, i) for k in range(1, len(sep))})
    got = [ev async for batch in sse_events(_chunks(data, cuts)) for ev in batch]
    assert got == events


async def test_a_long_unfinished_event_is_refused_at_the_limit() -> None:
    from kaiyuan.errors import GatewayError
    from kaiyuan.server.sse_framer import sse_events

    data = b"data: " + b"x" * (3 * 1024 * 1024)
    with pytest.raises(GatewayError, match="larger than 1048576 bytes: why") as e:
        async for _ in sse_events(_chunks(data, list(range(65536, len(data), 65536))), 1024 * 1024, ": why"):
            pass
    assert e.value.status == 502 and e.value.code == "upstream_event_too_large"

"""The Responses dialect without a server: golden checks against a recorded OpenAI response, and
hypothesis round trips (canonical -> output items -> input items -> canonical; chat chunks ->
Responses events, whose deltas must add up to the final response)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.responses import Response

from kaiyuan.dialects import canonical as c
from kaiyuan.dialects import responses as rq
from kaiyuan.dialects import responses_out as ro
from kaiyuan.dialects.responses_stream import ChatToResponses
from kaiyuan.errors import GatewayError
from kaiyuan.sealing import Sealer, derive_key

FIXTURES = Path(__file__).parent / "fixtures" / "openai"
SEALER = Sealer(derive_key("test secret"))


def _recorded() -> dict[str, Any]:
    return json.loads((FIXTURES / "responses_text.json").read_text())


def test_response_object_has_every_field_of_the_recorded_one() -> None:
    rec = _recorded()
    text = rec["output"][0]["content"][0]["text"]
    canon = c.Response("x", "m", [c.Text(text)], "end", c.Usage(14, 50, 0, 0, 0))
    ours = ro.finished(ro.skeleton("resp_1", "gpt-4o-mini", {"input": "x"}), ro.output_items(canon.content, ro.Shape()),
                       canon.stop_reason, canon.usage)
    assert set(rec) <= set(ours), set(rec) - set(ours)
    assert set(rec["output"][0]) == set(ours["output"][0])
    assert set(rec["output"][0]["content"][0]) == set(ours["output"][0]["content"][0])
    assert ours["usage"] == rec["usage"]
    for key in ("object", "status", "background", "error", "incomplete_details", "tool_choice", "tools", "truncation",
                "parallel_tool_calls", "store", "reasoning", "text", "metadata", "service_tier", "top_logprobs"):
        assert ours[key] == rec[key], key
    assert Response.model_validate(ours).output_text == text


def test_recorded_output_items_are_valid_input() -> None:
    rec = _recorded()
    prep = rq.prepare({"model": "m", "input": "and tomorrow?"}, rec["output"], SEALER.open)
    first, last = prep.request.messages
    assert first.role == "assistant" and c.joined_text(first.content) == rec["output"][0]["content"][0]["text"]
    assert last.role == "user" and c.joined_text(last.content) == "and tomorrow?"


# -- round trips ------------------------------------------------------------------------------------
NAMES = ["search", "crm__find", "crm__update", "edit"]
text = st.text(min_size=1, max_size=20)
block = st.one_of(
    text.map(c.Text),
    st.builds(lambda i, n, a: c.ToolCall(f"call_{i}", n, orjson.dumps(a).decode()),
              st.integers(0, 10**6), st.sampled_from(NAMES), st.dictionaries(st.text(max_size=5), st.integers(-10**9, 10**9), max_size=3)),
    st.builds(lambda t, s: c.Thinking(t, signature=s), text, st.one_of(st.none(), text)),
)


def _names() -> rq.ToolNames:
    names = rq.ToolNames()
    names.add(None, "search", "function")
    names.add("crm", "find", "function")
    names.add("crm", "update", "function")
    names.add(None, "edit", "custom")
    return names


def _normal(blocks: list[Any]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for b in blocks:
        if isinstance(b, c.Text):
            if out and out[-1][0] == "text":
                out[-1] = ("text", out[-1][1] + b.text)
            else:
                out.append(("text", b.text))
        elif isinstance(b, c.ToolCall):
            args = orjson.loads(b.arguments)
            out.append(("call", b.id, b.name, args))
        elif isinstance(b, c.Thinking):
            out.append(("thinking", b.text, b.signature))
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(block, min_size=1, max_size=8))
def test_output_items_round_trip_as_input(blocks: list[c.Block]) -> None:
    names = _names()
    for b in blocks:  # custom tools carry one string: {"input": ...}
        if isinstance(b, c.ToolCall) and b.name == "edit":
            b.arguments = orjson.dumps({"input": b.arguments}).decode()
    items = ro.output_items(blocks, ro.Shape(names, summary=True, seal=SEALER.seal))
    prep = rq.prepare({"model": "m", "input": [*items, {"role": "user", "content": "next"}]}, [], SEALER.open)
    back = [b for m in prep.request.messages if m.role == "assistant" for b in m.content]
    assert _normal(back) == _normal(blocks)
    for it in items:
        if it["type"] == "function_call":
            assert NS_SEP_FREE(it["name"]) and (it.get("namespace") == "crm") == (it["name"] in ("find", "update"))


def NS_SEP_FREE(name: str) -> bool:
    return rq.NS_SEP not in name


def test_tampered_reasoning_is_refused() -> None:
    blob = SEALER.seal(c.Thinking("secret thoughts", signature="sig"))
    opened = SEALER.open(blob)
    assert opened is not None and opened.signature == "sig"
    flipped = blob[:-2] + ("A" if blob[-2] != "A" else "B") + blob[-1]
    for bad in (flipped, "ky1.", "ky1.!!", Sealer(derive_key("other")).seal(c.Thinking("x"))):
        with pytest.raises(GatewayError) as e:
            SEALER.open(bad)
        assert e.value.status == 400 and e.value.code == "invalid_encrypted_content"
    assert SEALER.open("gAAAAABo-openai-own-blob") is None  # another provider's: not ours to judge


def test_foreign_reasoning_blob_falls_back_to_its_summary() -> None:
    item = {"type": "reasoning", "id": "rs_1", "encrypted_content": "gAAAAABsomething",
            "summary": [{"type": "summary_text", "text": "I looked it up."}]}
    prep = rq.prepare({"model": "m", "input": [item, {"role": "user", "content": "go on"}]}, [], SEALER.open)
    th = prep.request.messages[0].content[0]
    assert isinstance(th, c.Thinking) and th.text == "I looked it up." and th.signature is None


# -- the stream translator ------------------------------------------------------------------------
piece = st.one_of(
    st.tuples(st.just("content"), text),
    st.tuples(st.just("reasoning_content"), text),
    st.tuples(st.just("tool"), st.integers(0, 2), st.text(max_size=8)),
)


def _chunk(p: tuple[Any, ...]) -> dict[str, Any]:
    if p[0] == "tool":
        tc = {"index": p[1], "id": f"call_{p[1]}", "function": {"name": NAMES[p[1]], "arguments": p[2]}}
        return {"choices": [{"index": 0, "delta": {"tool_calls": [tc]}, "finish_reason": None}]}
    return {"choices": [{"index": 0, "delta": {p[0]: p[1]}, "finish_reason": None}]}


def _events(raw: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for ev in raw:
        head, data = ev.split(b"\n", 1)
        obj = orjson.loads(data[len(b"data: "):])
        assert head == b"event: " + obj["type"].encode()
        out.append(obj)
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(piece, max_size=15), st.booleans(), st.sampled_from(["stop", "length", "tool_calls"]))
def test_stream_events_add_up_to_the_final_response(pieces: list[tuple[Any, ...]], summary: bool, finish: str) -> None:
    tr = ChatToResponses(ro.skeleton("resp_1", "m", {}), ro.Shape(_names(), summary=summary))
    raw = tr.start()
    for p in pieces:
        raw += tr.feed(_chunk(p))
    raw += tr.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    raw += tr.end()
    events = _events(raw)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    final = events[-1]["response"]
    assert events[-1]["type"] == ("response.incomplete" if finish == "length" else "response.completed")
    assert final["usage"]["total_tokens"] == 7
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    done = [e["output_index"] for e in events if e["type"] == "response.output_item.done"]
    assert sorted(added) == sorted(done) == list(range(len(final["output"])))
    for i, item in enumerate(final["output"]):
        deltas = "".join(e["delta"] for e in events if e.get("output_index") == i and e["type"].endswith(".delta"))
        if item["type"] == "message":
            assert deltas == item["content"][0]["text"]
        elif item["type"] == "reasoning":
            assert deltas == item["content"][0]["text"]
            assert bool(item["summary"]) == summary
        elif item["type"] == "function_call":
            assert deltas == ("" if item["arguments"] == "{}" and not deltas else item["arguments"])
    texts = "".join(p[1] for p in pieces if p[0] == "content")
    assert ro.output_text(final["output"]) == texts
    assert Response.model_validate(final)

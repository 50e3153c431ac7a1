"""Answers that run past the output cap the gateway sent upstream.

The budget reserved ``cap x n`` output tokens (:mod:`kaiyuan.accounting.output_cap`) and the
upstream was told that cap. An upstream that ignores it would spend money nobody reserved, so the
gateway enforces the cap itself:

- a stream is counted as it is relayed (one token per content event: a lower bound, so an upstream
  that honours the cap is never cut); once it passes ``cap x n`` the gateway closes the upstream
  request (generation stops), and ends the caller's stream as a capped answer does: finish reason
  ``length`` (``max_tokens`` stop reason for Anthropic callers), usage, end of stream;
- a whole answer whose reported output exceeds the cap is cut to the cap's share of its text,
  with the same finish reason;
- the usage recorded is the truth the vendor bills: what the upstream reported, or else what was
  counted; the deployment is flagged in ``/admin/deployments`` (``honours_max_tokens: false``).

Only the cut path parses events; the counting is a few substring tests per event.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from kaiyuan.accounting.tokens import count_prompt
from kaiyuan.context import RequestContext
from kaiyuan.dialects import canonical as c

Flag = Callable[[str, int, int], None]  # (deployment, limit, output seen)


@dataclass(slots=True)
class OutputLimit:
    """The output tokens one answer may have, what has been counted so far, and whom to tell."""

    cap: int  # per completion
    n: int
    flag: Flag
    deployment: str
    upstream_model: str
    seen: int = 0

    @property
    def limit(self) -> int:
        return self.cap * self.n

    def over(self, tokens: int) -> bool:
        """Count ``tokens`` more; True once the answer is past its limit."""
        self.seen += tokens
        return self.seen > self.limit

    def overrun(self, reported: int) -> None:
        self.flag(self.deployment, self.limit, reported)


def output_limit(ctx: RequestContext, flag: Flag, upstream_model: str) -> OutputLimit | None:
    """The limit for the deployment that answered, from the cap the gateway sent it (None: no cap)."""
    if ctx.output_cap is None or ctx.deployment is None:
        return None
    return OutputLimit(ctx.output_cap, ctx.choices, flag, ctx.deployment, upstream_model)


async def close_upstream(ctx: RequestContext) -> None:
    """Close the upstream request now (cancels its generation), not read it to its end."""
    if ctx.upstream is not None:
        # only the connection: the pipeline's close_upstream still ends the deployment's work
        await ctx.upstream.reply.aclose()


def record_cut(ctx: RequestContext, lim: OutputLimit, body: dict[str, Any]) -> tuple[int, int]:
    """After a cut stream: the usage to bill (prompt counted, output counted) into ``ctx.usage``,
    and the deployment flagged. Returns (prompt, completion)."""
    counted = record_counted(ctx, lim, body)
    lim.overrun(lim.seen)
    return counted


def record_counted(ctx: RequestContext, lim: OutputLimit, body: dict[str, Any]) -> tuple[int, int]:
    """A stream the gateway ended before the upstream reported its usage: bill what was counted
    (what it reported, else the prompt as counted here and the output tokens counted on the way)."""
    u = ctx.usage
    if u.prompt_tokens is None:
        u.prompt_tokens = count_prompt(lim.upstream_model, body)
    u.completion_tokens = max(u.completion_tokens or 0, lim.seen)
    return u.prompt_tokens, u.completion_tokens


# -- OpenAI-protocol events (bytes, pass-through) ------------------------------------------------
_EMPTY_DELTA = (b"{}", b'{"role"', b'{ "role"')
_NO_CONTENT = (b'{"content":""', b'{"content":null', b'{"content": ""', b'{"content": null')


def openai_event_tokens(ev: bytes) -> int:
    """1 for a chat chunk whose delta carries generated text, reasoning or tool arguments, or a
    legacy completions chunk with text; 0 for the opening (role) chunk, an empty delta (the
    closing chunk), usage-only chunks. One scan to the delta, then a look at its first bytes
    (the compact form of a text delta, nearly every event, is recognised at once)."""
    i = ev.find(b'"delta":{"content":"')
    if i >= 0 and ev[i + 20:i + 21] != b'"':
        return 1
    i = ev.find(b'"delta":')
    if i < 0:  # legacy completions ({"choices": [{"text": ...}]}) or a usage-only chunk
        k = ev.find(b'"text":"')
        return 1 if k >= 0 and ev[k + 8:k + 9] != b'"' else 0
    d = ev[i + 8:i + 48].lstrip()
    if d.startswith(_EMPTY_DELTA):
        return 0
    if d.startswith(_NO_CONTENT):
        return 1 if ev.find(b"reasoning") >= 0 or ev.find(b"tool_calls") >= 0 else 0
    return 1


def anthropic_event_tokens(ev: bytes) -> int:
    """1 for a content_block_delta that carries text, thinking or tool input; 0 for the rest
    (a signature, an empty first piece of tool input)."""
    if ev.find(b"content_block_delta") < 0 or ev.find(b"signature_delta") >= 0:  # find, not `in`: docs/architecture.md
        return 0
    return 0 if ev.find(b'"partial_json":""') >= 0 or ev.find(b'"partial_json": ""') >= 0 else 1


def openai_cut_events(last: bytes, lim: OutputLimit, usage: tuple[int, int] | None) -> bytes:
    """The end of a cut OpenAI stream: one ``length`` finish chunk per choice, the usage chunk
    (when ``usage`` is given: the caller asked for it) and ``[DONE]``."""
    base = _chunk_base(last)
    legacy = base["object"] == "text_completion"
    out = []
    for i in range(lim.n):
        choice: dict[str, Any] = {"text": ""} if legacy else {"delta": {}}
        ch = {**base, "choices": [{"index": i, **choice, "logprobs": None, "finish_reason": "length"}]}
        out.append(b"data: " + orjson.dumps(ch) + b"\n\n")
    if usage is not None:
        u = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": usage[0] + usage[1]}
        out.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": u}) + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def _chunk_base(ev: bytes) -> dict[str, Any]:
    payload = ev.split(b"data:", 1)[-1]
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        obj = {}
    if not isinstance(obj, dict):
        obj = {}
    return {"id": obj.get("id") or "chatcmpl-cut", "object": obj.get("object") or "chat.completion.chunk",
            "created": obj.get("created") or 0, "model": obj.get("model")}


# -- OpenAI chunks as dicts (translated streams) -------------------------------------------------
def chunk_tokens(ch: dict[str, Any]) -> int:
    """1 for a chunk that carries generated text, reasoning or tool arguments (any shape is
    tolerated here: the translators judge malformed chunks)."""
    choices = ch.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        d = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(d, dict):
            continue
        if d.get("content") or d.get("reasoning_content") or d.get("reasoning"):
            return 1
        calls = d.get("tool_calls")
        for tc in calls if isinstance(calls, list) else ():
            fn = tc.get("function") if isinstance(tc, dict) else None
            if isinstance(fn, dict) and fn.get("arguments"):
                return 1
    return 0


async def capped_chunks(chunks: AsyncIterator[dict[str, Any]], ctx: RequestContext, lim: OutputLimit | None,
                        include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    """``chunks`` until the answer passes its limit; then a ``length`` finish chunk (and a usage
    chunk when ``include_usage``) and the end, with the upstream closed."""
    if lim is None:
        async for ch in chunks:
            yield ch
        return
    last: dict[str, Any] = {}
    async for ch in chunks:
        if lim.over(chunk_tokens(ch)):
            break
        last = ch
        yield ch
    else:
        return
    await close_upstream(ctx)
    closer = getattr(chunks, "aclose", None)
    if closer is not None:
        await closer()
    prompt, out = record_cut(ctx, lim, ctx.prompt_body())
    base = {k: last.get(k) for k in ("id", "object", "created", "model")}
    yield {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]}
    if include_usage:
        yield {**base, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": out,
                                               "total_tokens": prompt + out}}


# -- whole answers -------------------------------------------------------------------------------
def overran(lim: OutputLimit | None, reported: int, body_bytes: int) -> bool:
    """A whole answer past its limit. A count above the body's byte size is not an overrun but an
    absurd report (every token is at least a byte): the settle clamps it, the answer stays whole."""
    return lim is not None and lim.limit < reported <= body_bytes


def _cut(text: Any, frac: float) -> Any:
    return text[: math.floor(len(text) * frac)] if isinstance(text, str) else text


def cut_openai_body(obj: dict[str, Any], lim: OutputLimit, reported: int) -> bytes:
    """An OpenAI chat/completions body whose output ran past the limit, cut to the limit's share
    of each choice's text, finish reason ``length``. Usage stays as reported (it is the bill)."""
    frac = lim.limit / reported
    for ch in obj.get("choices") or ():
        if not isinstance(ch, dict):
            continue
        msg = ch.get("message")
        if isinstance(msg, dict):
            for key in ("content", "reasoning_content", "reasoning"):
                if key in msg:
                    msg[key] = _cut(msg[key], frac)
        if "text" in ch:
            ch["text"] = _cut(ch["text"], frac)
        ch["finish_reason"] = "length"
    lim.overrun(reported)
    return orjson.dumps(obj)


def cut_anthropic_body(obj: dict[str, Any], lim: OutputLimit, reported: int) -> bytes:
    frac = lim.limit / reported
    for b in obj.get("content") or ():
        if isinstance(b, dict):
            for key in ("text", "thinking"):
                if key in b:
                    b[key] = _cut(b[key], frac)
    obj["stop_reason"] = "max_tokens"
    lim.overrun(reported)
    return orjson.dumps(obj)


def cut_canonical(r: c.Response, lim: OutputLimit, flag: bool = True) -> None:
    """A translated whole answer past the limit: text and thinking cut, stop reason max_tokens;
    ``flag=False`` leaves flagging the deployment to the caller (on the event loop: this may run
    in a worker thread, ``kaiyuan.offload``)."""
    frac = lim.limit / r.usage.output_tokens
    for b in r.content:
        if isinstance(b, (c.Text, c.Thinking)):
            b.text = _cut(b.text, frac)
    r.stop_reason = "max_tokens"
    if flag:
        lim.overrun(r.usage.output_tokens)


def reported_output(usage: Any, key: str) -> int:
    v = usage.get(key) if isinstance(usage, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0

"""Gemini API (``generateContent`` / ``streamGenerateContent``) <-> canonical. Pure functions.

Gemini is an outbound protocol only (no Gemini-shaped inbound route). Tool schemas and JSON
response schemas are sent as ``parametersJsonSchema`` / ``responseJsonSchema`` so that JSON Schema
arrives unchanged. Function call arguments are objects on Gemini's side and JSON text in
canonical form; nothing in between drops them.
"""

from __future__ import annotations

import base64
import os
import re
from typing import Any

import orjson

from kaiyuan.accounting.usage_check import reported_tokens
from kaiyuan.dialects import canonical as c
from kaiyuan.errors import ErrorKind, GatewayError, invalid, kind_for_upstream_status

ROLE_OUT = {"user": "user", "assistant": "model"}
TOOL_MODE = {"auto": "AUTO", "any": "ANY", "tool": "ANY", "none": "NONE"}
# canonical Request attribute -> generationConfig key
GENERATION_KEYS = {
    "temperature": "temperature", "top_p": "topP", "top_k": "topK", "max_tokens": "maxOutputTokens",
    "seed": "seed", "presence_penalty": "presencePenalty", "frequency_penalty": "frequencyPenalty",
}


def new_call_id() -> str:
    return "call_" + os.urandom(12).hex()


# Gemini's thoughtSignature on a functionCall part must come back with that call on the next turn
# (Gemini 3 answers 400 without it). Other dialects have no field for it, so it rides inside the
# tool call id, which every client echoes back: ``<id>__ts__<url-safe signature>``.
SIG_MARK = "__ts__"
# Gemini's documented stand-in for a function call the model did not produce itself (history from
# another upstream, e.g. after a fallback; hand-built transcripts): with it, Gemini 3 skips the
# signature check instead of answering 400 (ai.google.dev/gemini-api/docs/gemini-3, "Migrating from
# other models"). Only the first functionCall of a model turn needs a signature.
FOREIGN_SIGNATURE = "context_engineering_is_the_way_to_go"


_STD_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
SIG_MARK_BYTES = "__tsb__"  # any other signature: base64url of its UTF-8 bytes, so it always round-trips


def call_id_with_signature(call_id: str, signature: Any) -> str:
    if not isinstance(signature, str) or not signature:
        return call_id
    if len(signature) % 4 == 0 and _STD_B64.fullmatch(signature):  # what Gemini sends: standard base64
        return call_id + SIG_MARK + signature.replace("+", "-").replace("/", "_").rstrip("=")
    return call_id + SIG_MARK_BYTES + base64.urlsafe_b64encode(signature.encode()).decode().rstrip("=")


def signature_of(call_id: str) -> str | None:
    if SIG_MARK_BYTES in call_id:
        enc = call_id.split(SIG_MARK_BYTES, 1)[1]
        try:
            return base64.urlsafe_b64decode(enc + "=" * (-len(enc) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None
    if SIG_MARK not in call_id:
        return None
    enc = call_id.split(SIG_MARK, 1)[1].replace("-", "+").replace("_", "/")
    return enc + "=" * (-len(enc) % 4)


def call_from_part(fc: dict[str, Any], part: dict[str, Any]) -> tuple[str, str, str]:
    """(id, name, arguments JSON) of a functionCall part; the id carries the part's thoughtSignature."""
    cid = call_id_with_signature(fc.get("id") or new_call_id(), part.get("thoughtSignature"))
    return cid, fc.get("name", ""), orjson.dumps(fc.get("args") or {}).decode()


def _guess_mime(url: str) -> str:
    ext = url.rsplit(".", 1)[-1].lower().split("?")[0]
    return {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp",
            "gif": "image/gif", "heic": "image/heic"}.get(ext, "image/jpeg")


def _image(b: c.Image) -> dict[str, Any]:
    if b.url:
        return {"fileData": {"mimeType": b.media_type or _guess_mime(b.url), "fileUri": b.url}}
    return {"inlineData": {"mimeType": b.media_type or "image/png", "data": b.data}}


def _function_response(b: c.ToolResult) -> dict[str, Any]:
    text = c.joined_text(b.content)
    if any(isinstance(p, c.Image) for p in b.content):
        raise invalid(f"tool result {b.tool_call_id}: images in tool results cannot be sent to Gemini")
    try:
        parsed = orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        parsed = None
    response = parsed if isinstance(parsed, dict) else {("error" if b.is_error else "result"): text}
    return {"functionResponse": {"name": b.name or b.tool_call_id, "response": response}}


def _parts(m: c.Message) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for b in m.content:
        if isinstance(b, c.Text):
            if b.text:
                parts.append({"text": b.text})
        elif isinstance(b, c.Image):
            parts.append(_image(b))
        elif isinstance(b, c.ToolCall):
            try:
                args = orjson.loads(b.arguments or "{}")
            except orjson.JSONDecodeError:
                raise invalid(f"tool call {b.id}: arguments are not valid JSON; Gemini needs a JSON object") from None
            part: dict[str, Any] = {"functionCall": {"name": b.name, "args": args}}
            sig = signature_of(b.id)
            if sig:
                part["thoughtSignature"] = sig
            parts.append(part)
        elif isinstance(b, c.ToolResult):
            parts.append(_function_response(b))
        # Thinking is not sent back: Gemini does not accept earlier thoughts as input.
    calls = [p for p in parts if "functionCall" in p]
    if calls and not any("thoughtSignature" in p for p in calls):
        calls[0]["thoughtSignature"] = FOREIGN_SIGNATURE
    return parts


def request_from_canonical(req: c.Request) -> dict[str, Any]:
    if req.parallel_tool_calls is False:
        raise invalid("'parallel_tool_calls': false has no equivalent in the Gemini API; remove it",
                      param="parallel_tool_calls", code="unsupported_parameter")
    contents: list[dict[str, Any]] = []
    system = c.joined_text(req.system)
    for m in req.messages:
        if m.role == "system":  # mid-conversation: the system instruction before any turn, else a user part
            text = c.joined_text(m.content)
            if not contents:
                system = (system + "\n\n" + text) if system else text
                continue
            m = c.Message("user", [c.Text(c.SYSTEM_MARK.format(text))])
        parts = _parts(m)
        if not parts:
            continue
        role = ROLE_OUT[m.role]
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    if req.tools:
        decls = []
        for t in req.tools:
            d: dict[str, Any] = {"name": t.name}
            if t.description:
                d["description"] = t.description
            d["parametersJsonSchema"] = t.parameters
            decls.append(d)
        body["tools"] = [{"functionDeclarations": decls}]
    tc = req.tool_choice
    if tc is not None:
        fcc: dict[str, Any] = {"mode": TOOL_MODE[tc.mode]}
        if tc.mode == "tool" and tc.name:
            fcc["allowedFunctionNames"] = [tc.name]
        body["toolConfig"] = {"functionCallingConfig": fcc}
    gc: dict[str, Any] = {}
    for attr, key in GENERATION_KEYS.items():
        v = getattr(req, attr)
        if v is not None:
            gc[key] = v
    if req.stop:
        gc["stopSequences"] = req.stop
    rf = req.response_format
    if rf and rf.get("type") in ("json_object", "json_schema"):
        gc["responseMimeType"] = "application/json"
        schema = (rf.get("json_schema") or {}).get("schema")
        if schema:
            gc["responseJsonSchema"] = schema
    if req.thinking_budget is not None:  # THINKING_ADAPTIVE is Gemini's -1 (dynamic thinking)
        budget = req.thinking_budget
        gc["thinkingConfig"] = {"thinkingBudget": budget, "includeThoughts": budget != 0}
    if gc:
        body["generationConfig"] = gc
    return body


def usage_to_canonical(u: Any) -> c.Usage:
    if not isinstance(u, dict):
        return c.Usage()
    thoughts = reported_tokens(u.get("thoughtsTokenCount"), "thoughtsTokenCount")
    out = (reported_tokens(u.get("candidatesTokenCount"), "candidatesTokenCount") or 0) + (thoughts or 0)
    return c.Usage(reported_tokens(u.get("promptTokenCount"), "promptTokenCount") or 0, out,
                   reported_tokens(u.get("cachedContentTokenCount")), None, thoughts)


def response_to_canonical(obj: dict[str, Any]) -> c.Response:
    blocks: list[c.Block] = []
    reason: str | None = None
    cands = obj.get("candidates") or []
    if cands:
        cand = cands[0]
        for part in (cand.get("content") or {}).get("parts") or []:
            if "functionCall" in part:
                blocks.append(c.ToolCall(*call_from_part(part["functionCall"] or {}, part)))
            elif isinstance(part.get("text"), str):
                blocks.append(c.Thinking(part["text"]) if part.get("thought") else c.Text(part["text"]))
        reason = c.GEMINI_FINISH_TO_CANON.get(cand.get("finishReason") or "STOP", "end")
    elif (obj.get("promptFeedback") or {}).get("blockReason"):
        reason = "content_filter"
    return c.Response(str(obj.get("responseId") or ""), str(obj.get("modelVersion") or ""), blocks,
                      c.final_stop(reason, bool(c.tool_calls_of(blocks))), usage_to_canonical(obj.get("usageMetadata")))


def error_from_body(obj: Any, status: int) -> GatewayError:
    err = obj.get("error") if isinstance(obj, dict) else None
    msg = err.get("message") if isinstance(err, dict) else None
    raw = err.get("code") if isinstance(err, dict) else None
    code: int = raw if isinstance(raw, int) else status
    kind = kind_for_upstream_status(code) if code >= 400 else ErrorKind.UPSTREAM_ERROR
    return GatewayError(kind, f"upstream sent an error: {msg or 'unknown error'}", status=code if code >= 400 else 502)

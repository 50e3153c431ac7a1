"""Gemini API as an *inbound* dialect (``generateContent`` bodies from Gemini-dialect callers, such as
Gemini CLI or the google-genai SDK) <-> canonical. Pure functions.

The outbound direction (the gateway calling a Gemini upstream) is :mod:`kaiyuan.dialects.gemini`.
Gemini carries the model in the URL; the route puts it into the body's ``model`` before these
functions run. Function calls may come without ids (the API numbers nothing): ids are made from
the turn and position, and each ``functionResponse`` answers the first unanswered call of its name
in the turn before it (or the call with its ``id`` when it has one). Errors use Google's shape
``{"error": {"code", "message", "status"}}``.
"""

from __future__ import annotations

import os
from typing import Any

import orjson

from kaiyuan.dialects import canonical as c
from kaiyuan.errors import GatewayError, google_status, invalid

ROLE_IN = {"user": "user", "model": "assistant", None: "user"}
MODE_IN = {"AUTO": "auto", "ANY": "any", "NONE": "none", "VALIDATED": "auto", "MODE_UNSPECIFIED": "auto"}
CANON_TO_FINISH = {"end": "STOP", "max_tokens": "MAX_TOKENS", "tool_use": "STOP", "stop_sequence": "STOP",
                   "content_filter": "SAFETY", "pause": "STOP"}
# generationConfig keys with no canonical equivalent: refused when set, never dropped silently.
UNTRANSLATABLE_GEN = ("responseLogprobs", "logprobs", "responseModalities", "speechConfig", "mediaResolution",
                      "audioTimestamp", "enableEnhancedCivicAnswers")
KNOWN_KEYS = frozenset({"model", "contents", "systemInstruction", "tools", "toolConfig", "generationConfig",
                        "safetySettings", "cachedContent", "labels"})
# safetySettings and labels are accepted and not forwarded (vendor policy and bookkeeping); cachedContent
# names a cache on Google's side that no other upstream has: refused.


def error_body(err: GatewayError) -> bytes:
    """``{"error": {"code", "message", "status"}}``, the status a google.rpc.Code name."""
    return orjson.dumps({"error": {"code": err.status, "message": err.message, "status": google_status(err.status)}})


def stream_error_event(err: GatewayError) -> bytes:
    return b"data: " + error_body(err) + b"\n\n"


def _bad(msg: str, where: str) -> GatewayError:
    return invalid(f"{where}: {msg}", param=where)


def validate(body: dict[str, Any]) -> None:
    """Shallow checks with the field path in each message (``contents[1].parts[0]: ...``)."""
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise _bad("required: a non-empty array of {role, parts}", "contents")
    for i, content in enumerate(contents):
        where = f"contents[{i}]"
        if not isinstance(content, dict):
            raise _bad("must be an object with role and parts", where)
        if content.get("role") not in ROLE_IN:
            raise _bad(f"role must be 'user' or 'model', got {content.get('role')!r}", f"{where}.role")
        parts = content.get("parts")
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            raise _bad("parts must be an array of objects", f"{where}.parts")
    for key in ("systemInstruction", "generationConfig", "toolConfig"):
        if key in body and not isinstance(body[key], dict):
            raise _bad("must be an object", key)
    if "tools" in body and not isinstance(body["tools"], list):
        raise _bad("must be an array", "tools")


def _image(p: dict[str, Any], where: str) -> c.Image:
    if "inlineData" in p:
        d = p["inlineData"] or {}
        if not isinstance(d.get("data"), str):
            raise _bad("inlineData.data must be base64 text", where)
        return c.Image(media_type=d.get("mimeType"), data=d["data"])
    d = p["fileData"] or {}
    if not isinstance(d.get("fileUri"), str):
        raise _bad("fileData.fileUri must be a string", where)
    return c.Image(media_type=d.get("mimeType"), url=d["fileUri"])


def _response_result(fr: dict[str, Any], call_id: str, name: str) -> c.ToolResult:
    resp = fr.get("response")
    if isinstance(resp, dict) and set(resp) == {"output"} and isinstance(resp["output"], str):
        text = resp["output"]  # Gemini CLI's shape: {"output": "..."}
    elif isinstance(resp, dict) and set(resp) <= {"result"} and isinstance(resp.get("result"), str):
        text = resp["result"]
    else:
        text = orjson.dumps(resp if resp is not None else {}).decode()
    is_error = isinstance(resp, dict) and set(resp) == {"error"}
    return c.ToolResult(call_id, [c.Text(text)], is_error, name)


def _turn(content: dict[str, Any], i: int, open_calls: list[tuple[str, str]]) -> c.Message:
    role = ROLE_IN[content.get("role")]
    blocks: list[c.Block] = []
    for j, p in enumerate(content["parts"]):
        where = f"contents[{i}].parts[{j}]"
        if isinstance(p.get("text"), str):
            blocks.append(c.Thinking(p["text"], p.get("thoughtSignature")) if p.get("thought") else c.Text(p["text"]))
        elif "inlineData" in p or "fileData" in p:
            blocks.append(_image(p, where))
        elif isinstance(p.get("functionCall"), dict) and role == "assistant":
            fc = p["functionCall"]
            if not isinstance(fc.get("name"), str):
                raise _bad("functionCall.name is required", where)
            cid = fc.get("id") if isinstance(fc.get("id"), str) and fc.get("id") else f"call_{i}_{j}"
            blocks.append(c.ToolCall(cid, fc["name"], orjson.dumps(fc.get("args") or {}).decode()))
        elif isinstance(p.get("functionResponse"), dict) and role == "user":
            fr = p["functionResponse"]
            name, fid = fr.get("name"), fr.get("id")
            match = next((k for k, (cid, n) in enumerate(open_calls) if (fid and cid == fid) or (not fid and n == name)), None)
            if match is None:
                raise _bad(f"functionResponse for {name!r} answers no functionCall of the model turn before it", where)
            cid, cname = open_calls.pop(match)
            blocks.append(_response_result(fr, cid, cname))
        elif p.get("thought") is True or "thoughtSignature" in p:
            continue  # an empty thought part: nothing to carry
        else:
            kinds = ", ".join(sorted(k for k in p if k != "thoughtSignature")) or "empty"
            raise _bad(f"part kind {kinds} cannot be translated for this model's upstream "
                       "(supported: text, inlineData, fileData, functionCall, functionResponse)", where)
    return c.Message(role, blocks)  # type: ignore[arg-type]


def _messages(contents: list[dict[str, Any]]) -> list[c.Message]:
    messages: list[c.Message] = []
    open_calls: list[tuple[str, str]] = []
    for i, content in enumerate(contents):
        m = _turn(content, i, open_calls)
        if m.role == "assistant":
            open_calls = [(b.id, b.name) for b in m.content if isinstance(b, c.ToolCall)]
        elif not any(isinstance(b, c.ToolResult) for b in m.content):
            open_calls = []
        if messages and messages[-1].role == m.role:
            messages[-1].content.extend(m.content)
        else:
            messages.append(m)
    return messages


def _schema(decl: dict[str, Any]) -> dict[str, Any]:
    s = decl.get("parametersJsonSchema", decl.get("parameters"))
    return _lower_types(s) if isinstance(s, dict) else {"type": "object", "properties": {}}


def _lower_types(s: Any) -> Any:
    """Gemini's OpenAPI-subset schemas spell types in capitals (``"OBJECT"``); JSON Schema does not."""
    if isinstance(s, dict):
        return {k: (v.lower() if k == "type" and isinstance(v, str) else _lower_types(v)) for k, v in s.items()}
    if isinstance(s, list):
        return [_lower_types(v) for v in s]
    return s


def _tools(tools: list[Any]) -> list[c.Tool]:
    out: list[c.Tool] = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise _bad("must be an object", f"tools[{i}]")
        for key in t:
            if key != "functionDeclarations":
                raise _bad(f"tool {key!r} runs on Google's side and cannot be translated for this model's upstream",
                           f"tools[{i}].{key}")
        for k, d in enumerate(t.get("functionDeclarations") or []):
            if not isinstance(d, dict) or not isinstance(d.get("name"), str):
                raise _bad("name is required", f"tools[{i}].functionDeclarations[{k}]")
            out.append(c.Tool(d["name"], d.get("description"), _schema(d)))
    return out


def _tool_choice(tc: dict[str, Any] | None) -> c.ToolChoice | None:
    fcc = (tc or {}).get("functionCallingConfig")
    if not isinstance(fcc, dict):
        return None
    mode = MODE_IN.get(str(fcc.get("mode") or "AUTO").upper())
    if mode is None:
        raise _bad("mode must be AUTO, ANY, NONE or VALIDATED", "toolConfig.functionCallingConfig.mode")
    names = fcc.get("allowedFunctionNames")
    if mode == "any" and isinstance(names, list) and len(names) == 1 and isinstance(names[0], str):
        return c.ToolChoice("tool", names[0])
    return c.ToolChoice(mode)  # type: ignore[arg-type]


def _num(v: Any, where: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad("must be a number", where)
    return float(v)


def _int(v: Any, where: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad("must be a whole number", where)
    return v


def _response_format(gc: dict[str, Any]) -> dict[str, Any] | None:
    if gc.get("responseMimeType") != "application/json":
        return None
    schema = gc.get("responseJsonSchema", gc.get("responseSchema"))
    if isinstance(schema, dict):
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": _lower_types(schema)}}
    return {"type": "json_object"}


def request_to_canonical(body: dict[str, Any], stream: bool = False) -> c.Request:
    """A validated generateContent body (with ``model`` from the URL) -> canonical."""
    unknown = sorted(k for k in body if k not in KNOWN_KEYS)
    if unknown:
        raise _bad("unknown field; this gateway takes the generateContent fields only", unknown[0])
    if body.get("cachedContent"):
        raise _bad("a context cache on Google's side has no equivalent on this model's upstream", "cachedContent")
    gc = body.get("generationConfig") or {}
    for key in UNTRANSLATABLE_GEN:
        if gc.get(key):
            raise _bad("has no equivalent on this model's upstream; remove it", f"generationConfig.{key}")
    n = _int(gc.get("candidateCount"), "generationConfig.candidateCount")
    if n is not None and n > 1:
        raise _bad("only 1 candidate can be translated for this model's upstream", "generationConfig.candidateCount")
    si = body.get("systemInstruction") or {}
    system = [c.Text(p["text"]) for p in si.get("parts") or [] if isinstance(p, dict) and isinstance(p.get("text"), str)]
    stop = gc.get("stopSequences") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("must be an array of strings", "generationConfig.stopSequences")
    tc = gc.get("thinkingConfig")
    budget = _int(tc.get("thinkingBudget"), "generationConfig.thinkingConfig.thinkingBudget") if isinstance(tc, dict) else None
    if budget is not None and budget < 0:
        budget = c.THINKING_ADAPTIVE
    return c.Request(
        model=body["model"], messages=_messages(body["contents"]), system=system,
        max_tokens=_int(gc.get("maxOutputTokens"), "generationConfig.maxOutputTokens"),
        temperature=_num(gc.get("temperature"), "generationConfig.temperature"),
        top_p=_num(gc.get("topP"), "generationConfig.topP"), top_k=_int(gc.get("topK"), "generationConfig.topK"),
        stop=list(stop), stream=stream, tools=_tools(body.get("tools") or []),
        tool_choice=_tool_choice(body.get("toolConfig")), response_format=_response_format(gc), thinking_budget=budget,
        seed=_int(gc.get("seed"), "generationConfig.seed"),
        presence_penalty=_num(gc.get("presencePenalty"), "generationConfig.presencePenalty"),
        frequency_penalty=_num(gc.get("frequencyPenalty"), "generationConfig.frequencyPenalty"),
    )


# -- canonical response -> Gemini --------------------------------------------------------------
def usage_from_canonical(u: c.Usage) -> dict[str, Any]:
    out: dict[str, Any] = {"promptTokenCount": u.input_tokens, "candidatesTokenCount": u.output_tokens - (u.reasoning or 0),
                           "totalTokenCount": u.input_tokens + u.output_tokens}
    if u.cache_read:
        out["cachedContentTokenCount"] = u.cache_read
    if u.reasoning:
        out["thoughtsTokenCount"] = u.reasoning
    return out


def call_part(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    try:
        args = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        args = {}
    return {"functionCall": {"id": call_id, "name": name, "args": args if isinstance(args, dict) else {}}}


def new_response_id() -> str:
    return os.urandom(12).hex()


def response_from_canonical(r: c.Response, model: str) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    for b in r.content:
        if isinstance(b, c.Thinking) and b.text:
            parts.append({"text": b.text, "thought": True})
        elif isinstance(b, c.Text) and b.text:
            parts.append({"text": b.text})
        elif isinstance(b, c.ToolCall):
            parts.append(call_part(b.id, b.name, b.arguments))
    return {"candidates": [{"content": {"role": "model", "parts": parts},
                            "finishReason": CANON_TO_FINISH.get(r.stop_reason, "STOP"), "index": 0}],
            "usageMetadata": usage_from_canonical(r.usage), "modelVersion": model,
            "responseId": r.id or new_response_id()}

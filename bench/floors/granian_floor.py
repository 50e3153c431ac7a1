"""The Rust-I/O floor: granian (RSGI) as the server, pyreqwest as the client, forwarding each request
to one upstream and nothing else.

    python bench/floors/granian_floor.py --port 8002 --upstream http://127.0.0.1:9000

It shows what Rust-backed I/O would save (issue 13): bench/run.py runs it next to the aiohttp floor
when granian and pyreqwest are installed (`pip install granian pyreqwest`), one worker, one thread.
"""

from __future__ import annotations

import os
from typing import Any

from bench.floors.common import HOP, run_granian

UPSTREAM = os.environ.get("FLOOR_UPSTREAM", "").rstrip("/")


class App:
    """An RSGI application: one pyreqwest client, made lazily on the worker's own event loop."""

    def __init__(self) -> None:
        self.client: Any = None

    async def _client(self) -> Any:
        if self.client is None:
            from pyreqwest.client import ClientBuilder

            self.client = ClientBuilder().max_connections(None).gzip(False).build()
        return self.client

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.path == "/readyz":
            proto.response_str(200, [("content-type", "text/plain")], "ok")
            return
        body = await proto()
        headers = {k: v for k, v in scope.headers.items() if k.lower() not in HOP}
        client = await self._client()
        req = client.post(UPSTREAM + scope.path).headers(headers).body_bytes(body).build_streamed()
        async with req as up:
            ctype = up.get_header("content-type") or "application/json"
            if not ctype.startswith("text/event-stream"):
                data = await up.body_reader.bytes()
                proto.response_bytes(up.status, [("content-type", ctype)], bytes(data))
                return
            out = proto.response_stream(up.status, [("content-type", ctype)])
            reader = up.body_reader
            while (chunk := await reader.read_chunk()) is not None:
                await out.send_bytes(bytes(chunk))


app = App()


def main() -> None:
    run_granian("bench.floors.granian_floor:app")


if __name__ == "__main__":
    main()

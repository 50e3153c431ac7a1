"""A mixed floor: granian (RSGI) as the server with aiohttp as the upstream client (issue 13, sixth round).

    python bench/floors/granian_aiohttp_floor.py --port 8004 --upstream http://127.0.0.1:9000

It answers "what would swapping only the server leg save?": the upstream call keeps Kaiyuan's own
client (aiohttp, with its timeouts, pools and cancellation), the listening socket and HTTP parsing
move to granian. One worker, one runtime thread. Not in the default run: `bench/run.py --mixed-floors`.
"""

from __future__ import annotations

import os
from typing import Any

from bench.floors.common import HOP, run_granian

UPSTREAM = os.environ.get("FLOOR_UPSTREAM", "").rstrip("/")


class App:
    """An RSGI application: one pooled aiohttp session, made lazily on the worker's own event loop."""

    def __init__(self) -> None:
        self.session: Any = None

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.path == "/readyz":
            proto.response_str(200, [("content-type", "text/plain")], "ok")
            return
        if self.session is None:
            import aiohttp

            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        body = await proto()
        headers = {k: v for k, v in scope.headers.items() if k.lower() not in HOP}
        async with self.session.post(UPSTREAM + scope.path, data=body, headers=headers) as up:
            ctype = up.headers.get("Content-Type", "application/json")
            if not ctype.startswith("text/event-stream"):
                proto.response_bytes(up.status, [("content-type", ctype)], await up.read())
                return
            out = proto.response_stream(up.status, [("content-type", ctype)])
            async for chunk in up.content.iter_any():
                await out.send_bytes(chunk)


app = App()


def main() -> None:
    run_granian("bench.floors.granian_aiohttp_floor:app")


if __name__ == "__main__":
    main()

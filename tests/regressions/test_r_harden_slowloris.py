"""Regression (issue 9, section 3): slowloris. 1,100 half-sent requests locked everyone out.

Now a connection must send a whole request head within ``server.header_timeout_s``, and open
connections are capped below the open-file limit; at the cap a new connection closes the oldest
idle one (``server.connections``). Shown here with the gateway process limited to 256 open files
under 300 slow request heads that reconnect as soon as they are closed: a real request through
the official SDK is still served (within the SDK's 30 s timeout)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import openai

from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import GatewayProcess
from tests.conftest import openai_model

HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"


class SlowHeads:
    """``n`` connections that each send a request head one header line at a time, forever, and
    reconnect whenever the gateway closes them."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n = port, n
        self.stop = threading.Event()
        self.reconnects = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> socket.socket | None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            s.sendall(HEAD)
            return s
        except OSError:
            return None

    def _run(self) -> None:
        socks: list[socket.socket | None] = [self._open() for _ in range(self.n)]
        i = 0
        while not self.stop.is_set():
            i += 1
            for j, s in enumerate(socks):
                try:
                    if s is None:
                        raise OSError
                    s.sendall(b"X-Slow-%d: x\r\n" % i)
                except OSError:
                    if s is not None:
                        s.close()
                    self.reconnects += 1
                    socks[j] = self._open()
                if self.stop.is_set():
                    break
            self.stop.wait(1.0)  # closed heads are reopened once a second, as slowloris tools do
        for s in socks:
            if s is not None:
                s.close()


def test_real_request_is_served_under_300_slow_heads(fake_openai: FakeOpenAI, tmp_path: Any) -> None:
    config = {"store": {"url": f"sqlite:///{tmp_path}/s.db"}, "models": [openai_model("m", fake_openai.url)]}
    gw = GatewayProcess(config, str(tmp_path), nofile=256)
    attack: SlowHeads | None = None
    try:
        gw.wait_ready()
        attack = SlowHeads(gw.port, 300)
        attack.thread.start()
        time.sleep(3)  # the heads are in, and being refreshed
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="none", timeout=30, max_retries=8)
        t0 = time.monotonic()
        out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "still there?"}])
        assert out.choices[0].message.content == "echo: still there?"
        assert time.monotonic() - t0 < 30  # the bound (503s at the cap are retried by the SDK)
        assert attack.reconnects > 0  # the attack was at the cap and being pushed out
        assert gw.proc.poll() is None
    finally:
        if attack is not None:
            attack.stop.set()
            attack.thread.join(10)
        gw.stop()
    assert "Too many open files" not in gw.log_path.read_text()


def test_a_head_that_never_ends_is_closed(fake_openai: FakeOpenAI, tmp_path: Any) -> None:
    config = {"server": {"header_timeout_s": 1}, "store": {"url": f"sqlite:///{tmp_path}/s.db"},
              "models": [openai_model("m", fake_openai.url)]}
    gw = GatewayProcess(config, str(tmp_path))
    try:
        gw.wait_ready()
        with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as s:
            s.sendall(HEAD)
            assert s.recv(1024) == b""  # closed by the gateway (the 20 s socket timeout would raise instead)
    finally:
        gw.stop()

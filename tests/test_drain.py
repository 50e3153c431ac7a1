"""A draining gateway (SIGTERM; the old workers of a SIGHUP reload) drops no request a client sends
on a keep-alive connection (kaiyuan.server.drain, docs/scaling.md): it stops accepting, answers
every request still arriving on its open connections with ``Connection: close`` for a short grace,
lets in-flight requests finish, and only then closes idle connections.

The gateway runs as ``kaiyuan serve --workers 1`` (one process, run_server: the code every worker
runs) and is driven over raw sockets, so the test sees the headers and the connection's end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import yaml

from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from tests.http import http
from tests.test_workers import MASTER, _config, _free_port


@dataclass
class Gateway:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path


@pytest.fixture
def gateway(fake_openai: FakeOpenAI, tmp_path: Path) -> Iterator[Gateway]:
    path = tmp_path / "kaiyuan.yaml"
    path.write_text(yaml.safe_dump(_config(fake_openai, tmp_path)))
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "kaiyuan", "serve", "--config", str(path), "--port", str(port),
                                 "--workers", "1"], stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ))
    gw = Gateway(port, proc, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if http("GET", f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except OSError:
                time.sleep(0.2)
        yield gw
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _request(port: int) -> bytes:
    body = orjson.dumps({"model": "cheap", "messages": [{"role": "user", "content": "hi there"}]})
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {MASTER}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def _response(f: socket.SocketIO) -> tuple[int, dict[str, str], bytes]:
    """One response off a keep-alive connection: (status, headers lower-cased, body)."""
    reader = f
    try:
        status_line = _line(reader)
    except ConnectionResetError:
        raise AssertionError("the gateway reset the connection: the request was dropped") from None
    assert status_line, "the connection closed with no response"
    headers = {}
    while line := _line(reader):
        k, v = line.split(":", 1)
        headers[k.strip().lower()] = v.strip()
    body = _exactly(reader, int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


def _line(f: socket.SocketIO) -> str:
    out = b""
    while not out.endswith(b"\r\n"):
        ch = f.read(1)
        if not ch:
            return out.decode()
        out += ch
    return out[:-2].decode()


def _exactly(f: socket.SocketIO, n: int) -> bytes:
    out = b""
    while len(out) < n:
        piece = f.read(n - len(out))
        assert piece, "the connection closed inside a body"
        out += piece
    return out


def _connect(port: int) -> tuple[socket.socket, socket.SocketIO]:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    return s, socket.SocketIO(s, "rb")


def _wait_until_refused(port: int) -> None:
    """Until the gateway stops accepting (the drain's first step)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except (ConnectionRefusedError, ConnectionResetError):  # reset: the listening socket closed mid-handshake
            return
        time.sleep(0.01)
    raise AssertionError("the gateway kept accepting after SIGTERM")


def test_a_request_on_an_idle_keep_alive_connection_during_the_drain_is_answered(gateway: Gateway) -> None:
    s, f = _connect(gateway.port)
    s.sendall(_request(gateway.port))
    status, headers, _ = _response(f)
    assert status == 200 and headers.get("connection") != "close"  # kept alive, now idle
    gateway.proc.send_signal(signal.SIGTERM)
    _wait_until_refused(gateway.port)
    # the drain has begun: before, aiohttp's shutdown had closed this idle connection already
    s.sendall(_request(gateway.port))
    status, headers, body = _response(f)
    assert status == 200 and b"choices" in body
    assert headers.get("connection") == "close"  # the client opens its next connection elsewhere
    assert f.read(1) == b""  # and the gateway closed this one after the answer
    s.close()
    assert gateway.proc.wait(timeout=60) == 0


def test_an_answer_in_flight_at_the_drain_says_connection_close(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    fake_openai.next(Behaviour(delay_first_byte=1.5))
    s, f = _connect(gateway.port)
    s.sendall(_request(gateway.port))
    deadline = time.monotonic() + 30
    while not fake_openai.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    gateway.proc.send_signal(signal.SIGTERM)  # the upstream is still thinking
    status, headers, body = _response(f)
    assert status == 200 and b"choices" in body
    assert headers.get("connection") == "close"
    assert f.read(1) == b""
    s.close()
    assert gateway.proc.wait(timeout=60) == 0


def test_idle_connections_are_closed_after_the_grace(gateway: Gateway) -> None:
    """A connection that stays idle through the grace is closed; the gateway stops well within
    shutdown_grace_s (20 s here) instead of waiting for it."""
    s, f = _connect(gateway.port)
    s.sendall(_request(gateway.port))
    assert _response(f)[0] == 200
    gateway.proc.send_signal(signal.SIGTERM)
    assert f.read(1) == b""  # closed by the gateway, not by us
    s.close()
    assert gateway.proc.wait(timeout=60) == 0


def test_the_idle_grace_is_a_setting_with_bounds() -> None:
    import pytest

    from kaiyuan.config import ConfigError, parse_config

    assert parse_config({"models": []}).server.drain_idle_grace_s == 2.0
    assert parse_config({"models": [], "server": {"drain_idle_grace_s": 0}}).server.drain_idle_grace_s == 0
    assert parse_config({"models": [], "server": {"drain_idle_grace_s": 10}}).server.drain_idle_grace_s == 10
    for bad in (-1, 61, "soon"):
        with pytest.raises(ConfigError, match="drain_idle_grace_s"):
            parse_config({"models": [], "server": {"drain_idle_grace_s": bad}})

"""Where the console's hourly rollup runs: in a single process, in that process; under a
supervisor, in the supervisor only (kaiyuan/server/workers.py), next to the request log's writer.

Why: a pass reads the whole open hour of the log (up to 1.8 million rows at 500 req/s) every
``console.rollup_interval_s``. In every worker it took the serving core and, in the soak (issue 13),
grew each worker's RSS by a few MiB; once per machine, off the serving core, it does neither."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web

from kaiyuan.config import parse_config
from kaiyuan.console import api
from kaiyuan.observability.log_sink import ENV_LOG_SOCKET
from kaiyuan.server.app import build_gateway, create_app


@pytest.mark.parametrize(("under_supervisor", "rolls_up"), [(False, True), (True, False)])
async def test_a_supervised_worker_leaves_the_rollup_to_its_supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, under_supervisor: bool, rolls_up: bool
) -> None:
    if under_supervisor:
        monkeypatch.setenv(ENV_LOG_SOCKET, str(tmp_path / "log.sock"))  # what a supervisor sets for its workers
    else:
        monkeypatch.delenv(ENV_LOG_SOCKET, raising=False)
    cfg = parse_config({"store": {"url": f"sqlite:///{tmp_path / 'k.db'}"}, "models": []})
    app = create_app(cfg, build_gateway(cfg))
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        task = app[api.STATE_KEY].rollup._task
        assert (task is not None) is rolls_up
    finally:
        await runner.cleanup()


def test_a_slow_rollup_pass_spaces_the_next_one_out() -> None:
    """A pass re-sums the open hour, so it grows through a busy hour; the next one waits long
    enough that passes take at most a tenth of the time (and never less than the interval)."""
    from kaiyuan.console.rollup import MAX_SHARE, next_wait

    assert next_wait(30.0, 0.2) == 30.0
    for took in (4.0, 12.0, 90.0):
        wait = next_wait(30.0, took)
        assert wait >= 30.0 and took / (took + wait) <= MAX_SHARE + 1e-9

"""The supervisor's shared counters (kaiyuan.limits.shared) over a real Unix socket: how frames are
batched on the wire. Limits, denials, settles and relays across workers: tests/test_workers.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kaiyuan.limits.counters import BudgetCheck, RateCheck, Ticket
from kaiyuan.limits.shared import CounterServer, SharedCounters


async def test_admits_of_one_tick_go_out_in_one_write(tmp_path: Path) -> None:
    """Admits started in the same event-loop tick (and the settles buffered before them) reach the
    supervisor in one write: one read there, every message in order, every answer right."""
    server = CounterServer(str(tmp_path / "c.sock"))
    await server.start()
    w = SharedCounters(server.path)
    try:
        await w.connect()
        rates = [RateCheck("key:k", 30, None, 2)]
        budget = [BudgetCheck("b:0", 10_000, 0, 100, None)]
        first = await asyncio.gather(*(w.admit(rates, budget, 1, 60.0) for _ in range(2)))
        assert all(isinstance(t, Ticket) for t in first)
        reads, messages = server.reads, server.messages
        for t in first:  # both parallel slots are freed by settles buffered ahead of the next admits
            assert isinstance(t, Ticket) and w.settle_later(t, [10], 1)
        got = await asyncio.gather(*(w.admit(rates, budget, 1, 60.0) for _ in range(20)))
        assert server.reads - reads == 1 and server.messages - messages == 22
        # the settles went first (their slots were free), then two admits took both slots
        assert sum(isinstance(t, Ticket) for t in got) == 2
        assert [getattr(t, "kind", None) for t in got[2:]] == ["parallel"] * 18
        assert server.counters.budgets["b:0"] == [20, 200]
    finally:
        await w.close()
        await server.close()


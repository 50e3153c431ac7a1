"""Stopping the gateway's background tasks (metrics sync, malloc_trim, the Responses store's
writer): cancelled, and awaited so that their ``finally`` runs before shutdown goes on."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def stop(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (None: nothing to stop) and wait for it to end."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

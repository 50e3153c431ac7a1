"""The store boundary: which database errors mean "the database is unavailable", and what a caller
sees then.

Every database call the gateway makes while serving a request (key lookups, budget seeds, admin
reads and writes) goes through :func:`call`. A database that is down, restarting or unreachable
is a 503 with ``Retry-After`` in the caller's dialect (``ErrorKind.STORE_UNAVAILABLE``): the
gateway fails closed, it never serves a request it cannot authenticate or bill, and it never
shows a driver's exception. The background batch writer uses :func:`unavailable` to tell a
database that is down (keep the rows, retry) from a row the database refuses (set it aside).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from kaiyuan.errors import ErrorKind, GatewayError

T = TypeVar("T")
RETRY_AFTER_S = 5

_DOWN = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout, ConnectionError, TimeoutError)


def unavailable(e: BaseException) -> bool:
    """True when ``e`` says the database could not be reached or used, not that a row was wrong."""
    if isinstance(e, _DOWN):
        return True
    return isinstance(e, DBAPIError) and bool(e.connection_invalidated)


def unavailable_error() -> GatewayError:
    return GatewayError(
        ErrorKind.STORE_UNAVAILABLE,
        "the gateway's database is unavailable, so it cannot check keys or record spend; retry shortly",
        code="store_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def call(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking store function in a thread; a database that is down becomes a 503."""
    try:
        return await asyncio.to_thread(fn, *args)
    except Exception as e:
        if unavailable(e):
            raise unavailable_error() from None
        raise

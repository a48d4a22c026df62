"""Who may try how often: a share of the hashing queue per client address, and the
log-in throttle per account and address, counted in the database."""

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, TypeVar

import anyio.to_thread
import sqlalchemy
from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.dialects import postgresql, sqlite

from accounts.models import LogInAttempts
from accounts.passwords import hashing_limiter
from db import database

# Sign-ups and log-ins waiting for a hashing thread; past this they get a 503 at once.
HASHING_QUEUE = int(os.environ.get("PASSWORD_HASHING_QUEUE", "32"))
# Of those, how many one client address may have waiting or running; past it, a 429.
HASHING_SHARE = int(os.environ.get("PASSWORD_HASHING_SHARE", "4"))
# Log-ins per account and client address (wrong passwords) that may come within
# LOG_IN_PERIOD of each other; past that, a 429 until a period after the last one.
LOG_IN_ATTEMPTS = int(os.environ.get("LOG_IN_ATTEMPTS", "10"))
LOG_IN_PERIOD = timedelta(minutes=float(os.environ.get("LOG_IN_PERIOD_MINUTES", "15")))
# Seconds a 429 waits before it is sent: a client that ignores Retry-After then costs
# one request a second per connection, not hundreds (tests/benchmark.md).
REFUSAL_PAUSE = 1.0


def too_many_requests(detail: str, seconds: int = 1) -> HTTPException:
    """A 429 that tells the client how many seconds to wait."""
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS, detail, headers={"Retry-After": str(seconds)}
    )


async def client_address(request: Request) -> str:
    """The client's address as uvicorn reports it: behind a proxy, the proxy's own
    unless uvicorn trusts its headers (the README's Production section)."""
    return request.client.host if request.client else ""


ClientAddress = Annotated[str, Depends(client_address)]

# Client address -> its hashes waiting or running in this process.
hashing_places: Counter[str] = Counter()
T = TypeVar("T")


async def in_hashing_thread(
    client: str,
    function: Callable[..., T],
    *args: str,
    first: Callable[[], Awaitable[object]] | None = None,
) -> T:
    """Run a password hash or check on a hashing thread, after `first` if given.

    503 when the queue is full; 429 when the client's address holds its share of it,
    before `first` runs: a flood from one address writes nothing and keeps no one else
    waiting for long.
    """
    if hashing_limiter.statistics().tasks_waiting >= HASHING_QUEUE:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "Too many sign-ups and log-ins at once; retry shortly",
            headers={"Retry-After": "1"},
        )
    if hashing_places[client] >= HASHING_SHARE:
        await anyio.sleep(REFUSAL_PAUSE)
        raise too_many_requests("Too many sign-ups and log-ins from your address")
    hashing_places[client] += 1
    try:
        if first is not None:
            await first()
        return await anyio.to_thread.run_sync(function, *args, limiter=hashing_limiter)
    finally:
        hashing_places[client] -= 1
        if not hashing_places[client]:
            del hashing_places[client]


def log_in_key(client: str, username: str) -> str:
    """What log-ins are counted by: the address and the account as typed, digested."""
    return hashlib.sha256(json.dumps([client, username]).encode()).hexdigest()


async def count_log_in(key: str) -> None:
    """Count a log-in before its password is checked; 429 past LOG_IN_ATTEMPTS.

    One statement counts and reads the count, so concurrent guesses cannot pass the
    bound together. A refused log-in is not let through later than a period after
    the last one that was: it does not move the time on.
    """
    table = LogInAttempts.ormar_config.table
    now = datetime.now(UTC)
    over = table.c.last_attempt_at <= now - LOG_IN_PERIOD
    allowed = over | (table.c.attempts < LOG_IN_ATTEMPTS)
    dialect = postgresql if database.dialect.name == "postgresql" else sqlite
    upsert = dialect.insert(table).values(digest=key, attempts=1, last_attempt_at=now)
    changes = {
        "attempts": sqlalchemy.case(
            (over, 1), (allowed, table.c.attempts + 1), else_=LOG_IN_ATTEMPTS + 1
        ),
        "last_attempt_at": sqlalchemy.case(
            (allowed, sqlalchemy.literal(now, table.c.last_attempt_at.type)),
            else_=table.c.last_attempt_at,
        ),
    }
    upsert = upsert.on_conflict_do_update(index_elements=[table.c.digest], set_=changes)
    async with database.get_query_executor() as executor:
        row = await executor.fetch_one(upsert.returning(*table.c))
    assert row is not None
    if row["attempts"] > LOG_IN_ATTEMPTS:
        last = row["last_attempt_at"]  # naive from SQLite, which stores UTC
        wait = last.replace(tzinfo=last.tzinfo or UTC) + LOG_IN_PERIOD - now
        detail = "Too many log-ins for this account; retry later"
        await anyio.sleep(REFUSAL_PAUSE)  # holding the address's place in the queue
        raise too_many_requests(detail, max(1, math.ceil(wait.total_seconds())))


async def end_log_in_counts(key: str | None = None) -> None:
    """Delete every count whose period is over, and `key`'s (a right password)."""
    table = LogInAttempts.ormar_config.table
    ended = table.c.last_attempt_at <= datetime.now(UTC) - LOG_IN_PERIOD
    if key is not None:
        ended = ended | (table.c.digest == key)
    async with database.get_query_executor() as executor:
        await executor.execute(table.delete().where(ended))

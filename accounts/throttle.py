"""Who may try how often: a share of the hashing queue per client address, and the
password throttle per account (per address, per device, and in all), counted in the
database so that one bound holds for every worker and machine."""

import hashlib
import ipaddress
import json
import math
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, TypeVar

import anyio.to_thread
import sqlalchemy
from fastapi import Depends, HTTPException, Request, Response, status
from sqlalchemy.dialects import postgresql, sqlite

from accounts import passwords
from accounts.models import Devices, LogInAttempts
from accounts.passwords import hashing_limiter
from core.settings import settings
from db import Users, database

# SIGN_UPS_AND_RESETS_PER_MINUTE's period.
CLIENT_PERIOD = timedelta(minutes=1)
DEVICE_COOKIE = "device"
# Seconds a 429 waits before it is sent: a client that ignores Retry-After then costs
# one request a second per connection, not hundreds (tests/benchmark.md).
REFUSAL_PAUSE = 1.0


def too_many_requests(detail: str, seconds: int = 1) -> HTTPException:
    """A 429 that tells the client how many seconds to wait."""
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS, detail, headers={"Retry-After": str(seconds)}
    )


def parsed_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    host = host.strip()
    if host.startswith("["):  # [v6] or [v6]:port, as some proxies write it
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:  # v4:port
        host = host.partition(":")[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped  # ::ffff:a.b.c.d is a.b.c.d
    return address


def trusted(host: str) -> bool:
    address = parsed_address(host)
    return address is not None and any(
        address in net for net in settings.TRUSTED_PROXIES
    )


async def client_address(request: Request) -> str:
    """What a client is counted as: its IPv4 address, its IPv6 /64 (one machine may
    have all of it), or "unparsable", one client for every such value.

    The address is the connection's own, unless that is a trusted proxy's: then the
    nearest address in X-Forwarded-For that no trusted proxy added.
    """
    host = request.client.host if request.client else ""
    if trusted(host):
        hops = ",".join(request.headers.getlist("x-forwarded-for")).split(",")
        for hop in reversed([hop for hop in hops if hop.strip()]):
            host = hop
            if not trusted(hop):
                break
    address = parsed_address(host)
    if address is None:
        return "unparsable"
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


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
    if hashing_limiter.statistics().tasks_waiting >= settings.PASSWORD_HASHING_QUEUE:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "Too many sign-ups and log-ins at once; retry shortly",
            headers={"Retry-After": "1"},
        )
    if hashing_places[client] >= settings.PASSWORD_HASHING_SHARE:
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


def log_in_key(*parts: str) -> str:
    """What password checks are counted by, such as the client and the account as
    typed (so no email is stored, and unknown ones count alike), digested."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


async def count_attempt(
    key: str, limit: int, period: timedelta | None = None
) -> tuple[bool, datetime]:
    """Count an attempt on `key`: whether it is within `limit`, and when the last one
    let through was. Counts end a `period` (LOG_IN_PERIOD) after that.

    One statement counts and reads the count, so concurrent attempts cannot pass the
    bound together. A refused attempt does not move the time on: the count ends a
    period after the last one let through. Deletes counts whose period is over first.
    """
    table = LogInAttempts.ormar_config.table
    now = datetime.now(UTC)
    over = table.c.last_attempt_at <= now - (period or settings.LOG_IN_PERIOD)
    allowed = over | (table.c.attempts < limit)
    dialect = postgresql if database.dialect.name == "postgresql" else sqlite
    upsert = dialect.insert(table).values(digest=key, attempts=1, last_attempt_at=now)
    changes = {
        "attempts": sqlalchemy.case(
            (over, 1), (allowed, table.c.attempts + 1), else_=limit + 1
        ),
        "last_attempt_at": sqlalchemy.case(
            (allowed, sqlalchemy.literal(now, table.c.last_attempt_at.type)),
            else_=table.c.last_attempt_at,
        ),
    }
    upsert = upsert.on_conflict_do_update(index_elements=[table.c.digest], set_=changes)
    # Over whatever its period: the longest is over (indexed, a few rows each time).
    ended = table.c.last_attempt_at <= now - max(settings.LOG_IN_PERIOD, CLIENT_PERIOD)
    async with database.get_query_executor() as executor:
        await executor.execute(table.delete().where(ended))
        row = await executor.fetch_one(upsert.returning(*table.c))
    assert row is not None
    last = row["last_attempt_at"]  # naive from SQLite, which stores UTC
    return row["attempts"] <= limit, last.replace(tzinfo=last.tzinfo or UTC)


async def count_log_in(
    key: str,
    limit: int,
    period: timedelta | None = None,
    detail: str = "Too many log-ins for this account; retry later",
) -> None:
    """Count a password check (or another request) on `key` before it is made; 429
    past `limit` within `period` (LOG_IN_PERIOD)."""
    allowed, last = await count_attempt(key, limit, period)
    if not allowed:
        wait = last + (period or settings.LOG_IN_PERIOD) - datetime.now(UTC)
        await anyio.sleep(REFUSAL_PAUSE)  # holding the address's place in the queue
        raise too_many_requests(detail, max(1, math.ceil(wait.total_seconds())))


async def count_request(kind: str, client: str) -> None:
    """Count a "sign-up" or a "password reset" from `client`; 429 past its limit."""
    limit = settings.SIGN_UPS_AND_RESETS_PER_MINUTE
    detail = f"Too many {kind}s from your address; retry later"
    await count_log_in(log_in_key(kind, client), limit, CLIENT_PERIOD, detail)


async def device_cookie(request: Request) -> str | None:
    """The request's device cookie, if it sent one."""
    return request.cookies.get(DEVICE_COOKIE) or None


DeviceCookie = Annotated[str | None, Depends(device_cookie)]


def device_digest(cookie: str, user_id: int) -> str:
    """What is stored for a client's device on one account. One cookie serves every
    account the client logs in to, and the table does not tell which share a client."""
    return hashlib.sha256(json.dumps([cookie, user_id]).encode()).hexdigest()


async def known_device(cookie: str | None, user: Users | None) -> str | None:
    """The digest of the client's device on the user's account, if it is one."""
    if cookie is None:
        return None
    # Looked up for any email (an unknown one as id 0, which no account has), so
    # that it takes as long for every email.
    digest = device_digest(cookie, user.id if user else 0)
    found = await Devices.objects.filter(digest=digest).exists()
    return digest if found and user is not None else None


def new_device_cookie(request: Request, response: Response) -> str | None:
    """Give the client a device cookie of its own; its value. None to a page of
    another site (a log-in CSRF): the browser withholds from it the cookie it has,
    and would keep a new one in its place."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        return None
    value = secrets.token_urlsafe(32)
    response.set_cookie(
        DEVICE_COOKIE,
        value,
        max_age=400 * 24 * 3600,  # the longest browsers keep a cookie
        httponly=True,  # no script reads it
        samesite="strict",  # no other site's page sends it
        secure=request.url.scheme == "https",
    )
    return value


async def add_device(request: Request, response: Response, user_id: int) -> None:
    """Make the client a device of the account, as a log-in does (with a cookie of
    its own if it has none): the browser that confirmed a reset is the owner's."""
    cookie = await device_cookie(request) or new_device_cookie(request, response)
    if cookie is not None:
        digest, now = device_digest(cookie, user_id), datetime.now(UTC)
        await Devices.objects.create(digest=digest, user=user_id, last_used_at=now)


async def check_password(
    password: str, user: Users | None, account: str, client: str, cookie: str | None
) -> tuple[bool, str | None]:
    """Verify a password for `account` (its `user`, or None when there is none), after
    counting it; 429 past the bounds. What verify_password answers.

    A client whose device cookie has logged in to the account before has an allowance
    of its own. Any other is counted per address, and all of them together per
    account: many addresses get no more than LOG_IN_ATTEMPTS_PER_ACCOUNT guesses, and
    the owner's own device still logs in.
    """
    known = await known_device(cookie, user)
    # Counted for the password the account has: a new one starts its counts afresh.
    stored_hash = user.password if user else passwords.DUMMY_HASH
    allowance = ("device", known) if known else (client, account)
    mine = log_in_key(*allowance, stored_hash)
    everyone = log_in_key("any client", account, stored_hash)

    async def count() -> None:
        await count_log_in(mine, settings.LOG_IN_ATTEMPTS)
        if known is None:
            await count_log_in(everyone, settings.LOG_IN_ATTEMPTS_PER_ACCOUNT)

    valid, new_hash = await in_hashing_thread(
        client, passwords.verify_password, password, stored_hash, first=count
    )
    if valid and user is not None and user.is_active and user.is_verified:
        # This client's count starts again, and it was no guess of the account's
        # (whose count goes on: a log-in must not hand guessers more).
        table = LogInAttempts.ormar_config.table
        taken_back = table.update().where(table.c.digest == everyone)
        async with database.get_query_executor() as executor:
            await executor.execute(table.delete().where(table.c.digest == mine))
            if known is None:
                await executor.execute(taken_back.values(attempts=table.c.attempts - 1))
    return valid, new_hash

"""Who may try how often: hashing places per address, and counts in the database."""

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
from core.errors import unavailable
from core.settings import settings
from db import Users, database

CLIENT_PERIOD = timedelta(minutes=1)  # SIGN_UPS_AND_RESETS_PER_MINUTE's
DEVICE_COOKIE = "device"
# A 429 waits: a client ignoring Retry-After costs a request a second per connection.
REFUSAL_PAUSE = 1.0
TOO_MANY = "Too many log-ins for this account; retry later"


def too_many_requests(detail: str, seconds: int = 1) -> HTTPException:
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
    """The client's IPv4 address, IPv6 /64 (one machine's), or "unparsable"."""
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
    """Run `function` on a hashing thread, after `first`; 503 or 429 if queued too many."""
    if hashing_limiter.statistics().tasks_waiting >= settings.PASSWORD_HASHING_QUEUE:
        raise unavailable("Too many sign-ups and log-ins at once; retry shortly")
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


def log_in_key(*parts: str | int) -> str:
    """The digest that a count (of a client, an account as typed...) is stored as."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


async def count_attempt(
    key: str, limit: int, period: timedelta | None = None
) -> tuple[bool, datetime]:
    """Count an attempt on `key`: whether it is within `limit`, and when the last one
    let through was. One statement, so concurrent ones cannot pass the bound together."""
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
            (allowed, upsert.excluded.last_attempt_at), else_=table.c.last_attempt_at
        ),
    }
    upsert = upsert.on_conflict_do_update(index_elements=[table.c.digest], set_=changes)
    # Counts over whatever their period: the longest is over (indexed, a few rows).
    ended = table.c.last_attempt_at <= now - max(settings.LOG_IN_PERIOD, CLIENT_PERIOD)
    async with database.get_query_executor() as executor:
        await executor.execute(table.delete().where(ended))
        row = await executor.fetch_one(upsert.returning(*table.c))
    assert row is not None
    last = row["last_attempt_at"]  # naive from SQLite, which stores UTC
    return row["attempts"] <= limit, last.replace(tzinfo=last.tzinfo or UTC)


async def count_log_in(
    key: str, limit: int, period: timedelta | None = None, detail: str = TOO_MANY
) -> None:
    """count_attempt, with a 429 past `limit`."""
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
    return request.cookies.get(DEVICE_COOKIE) or None


DeviceCookie = Annotated[str | None, Depends(device_cookie)]


def device_digest(cookie: str, user_id: int) -> str:
    # One cookie serves every account: the table does not tell which share a client.
    return log_in_key(cookie, user_id)


def new_device_cookie(request: Request, response: Response) -> str | None:
    """A new device cookie's value; None to another site's page (a log-in CSRF)."""
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
    """Make the client a device of the account (the browser that confirmed a reset)."""
    cookie = await device_cookie(request) or new_device_cookie(request, response)
    if cookie is not None:
        digest, now = device_digest(cookie, user_id), datetime.now(UTC)
        await Devices.objects.create(digest=digest, user=user_id, last_used_at=now)


async def check_password(
    password: str,
    user: Users | None,
    account: str,
    client: str,
    cookie: str | None,
    held: bool = False,
) -> tuple[bool, str | None]:
    """verify_password, counted per known device, or per address and per account.
    A right one is no guess if it logs in, or if the client `held` the account's
    session or link (else the 429's delay would tell a right password from a wrong)."""
    known = None
    if cookie is not None:
        # Looked up for an unknown email too (as id 0, no account's), to take as long.
        digest = device_digest(cookie, user.id if user else 0)
        if await Devices.objects.filter(digest=digest).exists() and user is not None:
            known = digest
    # Counted for the password the account has: a new one starts its counts afresh.
    # An unknown account's key is the same in every worker (each has its own dummy).
    counted = user.password if user else ""
    allowance = ("device", known) if known else (client, account)
    mine = log_in_key(*allowance, counted)
    everyone = log_in_key("any client", account, counted)

    async def count() -> None:
        await count_log_in(mine, settings.LOG_IN_ATTEMPTS)
        if known is None:
            await count_log_in(everyone, settings.LOG_IN_ATTEMPTS_PER_ACCOUNT)

    stored_hash = user.password if user else passwords.DUMMY_HASH
    valid, new_hash = await in_hashing_thread(
        client, passwords.verify_password, password, stored_hash, first=count
    )
    if valid and user is not None and (held or user.is_active and user.is_verified):
        # Not a guess: this client's count restarts, one is taken off the account's.
        table = LogInAttempts.ormar_config.table
        taken_back = table.update().where(table.c.digest == everyone)
        async with database.get_query_executor() as executor:
            await executor.execute(table.delete().where(table.c.digest == mine))
            if known is None:
                await executor.execute(taken_back.values(attempts=table.c.attempts - 1))
    return valid, new_hash

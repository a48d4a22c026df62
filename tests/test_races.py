"""Requests that race: each write that follows a password check holds only if the
account is still what was checked. Every race is run many times in one test.

A request's window is the password hash (~0.1 s as deployed) between reading the
account and writing: `hold` keeps a request in it, right after its password check,
until the test has done what the other request does, so that each try meets the race.
That needs no slow hash: the in-process tests hash cheaply (cheap_hashing in tests/harness.py).
"""

import functools
import secrets
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import httpx
import pytest
import sqlalchemy
from anyio.abc import TaskGroup
from fastapi import APIRouter
from pwdlib import PasswordHash
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import accounts.routes
import accounts.sessions
import main
from accounts import passwords, throttle
from accounts.models import Devices, Tokens
from accounts.sessions import start_session, token_digest
from core.settings import settings
from db import DATABASE_URL, Users, database
from support import (
    PASSWORD,
    PASSWORD_MAX,
    PASSWORD_MIN,
    Server,
    SignUp,
    StartServer,
    a_password,
    faults,
    loopback,
    server_client_at,
)

pytestmark = pytest.mark.anyio

TOKEN = main.app.url_path_for("log_in")
ME = main.app.url_path_for("read_me")
USERS = main.app.url_path_for("create_user")
T = TypeVar("T")


@functools.cache
def hashes_of_password(hasher: PasswordHash) -> tuple[str, str]:
    """Two hashes of PASSWORD, for the accounts the tests create directly (one hash
    saved per account), made by `hasher`: main's active one, so that they verify at
    its cost and need no rehash at log-in. Sign-up salts each hash: an account created
    after another gets the other."""
    first, following = (hasher.hash(PASSWORD) for _ in "ab")
    return first, following


@dataclass
class Held:
    """A request running in the background that stops after its password check."""

    reached: anyio.Event = field(default_factory=anyio.Event)
    released: anyio.Event = field(default_factory=anyio.Event)
    response: httpx.Response | None = None

    def answer(self) -> httpx.Response:
        assert self.response is not None
        return self.response

    def status(self) -> int:
        return self.answer().status_code


# The Held of the request that the current task sends, if it is to be held after its
# password check, or before it commits its transaction.
HOLDING: ContextVar[Held | None] = ContextVar("HOLDING", default=None)
HOLDING_COMMIT: ContextVar[Held | None] = ContextVar("HOLDING_COMMIT", default=None)


@pytest.fixture
def holdable(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Let `hold` stop requests right after they verify a password."""
    original = throttle.in_hashing_thread

    async def in_hashing_thread(
        client: str, function: Callable[..., T], *args: str, **options: Any
    ) -> T:
        result = await original(client, function, *args, **options)
        held = HOLDING.get()
        if held is not None and function is passwords.verify_password:
            held.reached.set()
            await held.released.wait()
        return result

    monkeypatch.setattr(throttle, "in_hashing_thread", in_hashing_thread)
    yield


class CommitHeld:
    """A transaction that waits, its writes done, before it commits."""

    def __init__(self, transaction: Any, held: Held) -> None:
        self.transaction, self.held = transaction, held

    async def __aenter__(self) -> Any:
        return await self.transaction.__aenter__()

    async def __aexit__(self, *exception: Any) -> Any:
        self.held.reached.set()
        await self.held.released.wait()
        return await self.transaction.__aexit__(*exception)


class CommitHoldingDatabase:
    """main's `database`, whose transactions wait before committing in held requests."""

    def __getattr__(self, name: str) -> Any:
        return getattr(database, name)

    def transaction(self) -> Any:
        held = HOLDING_COMMIT.get()
        transaction = database.transaction()
        return transaction if held is None else CommitHeld(transaction, held)


def hold(
    tasks: TaskGroup,
    client: httpx.AsyncClient,
    method: str,
    url: str,
    holding: ContextVar[Held | None] = HOLDING,
    **options: Any,
) -> Held:
    """Send a request in the background; it waits after its password check."""
    held = Held()

    async def send() -> None:
        holding.set(held)  # this task's context only: other requests run freely
        held.response = await client.request(method, url, **options)

    tasks.start_soon(send)
    return held


async def reached(*requests: Held) -> None:
    with anyio.fail_after(10):
        for request in requests:
            await request.reached.wait()


async def account(email: str, following: bool = False) -> Users:
    """An account with PASSWORD and a proven address, created directly; `following`:
    right after another, which has the first of the two hashes."""
    stored_hash = hashes_of_password(passwords.password_hash)[following]
    return await Users.objects.create(
        email=email, password=stored_hash, is_verified=True
    )


async def session(user_id: int) -> dict[str, str]:
    """Headers of a new session of the account, as a log-in would start it."""
    token = secrets.token_urlsafe(32)
    verified = (await Users.objects.get(id=user_id)).password
    assert await start_session(user_id, verified, token_digest(token))
    return {"Authorization": f"Bearer {token}"}


async def sessions() -> set[tuple[str, int]]:
    """Every stored session: its token's digest and its account's id."""
    return {(token.digest, token.user.id) for token in await Tokens.objects.all()}


def stored(headers: dict[str, str], user_id: int) -> tuple[str, int]:
    token = headers["Authorization"].removeprefix("Bearer ")
    return token_digest(token), user_id


def issued(response: httpx.Response) -> dict[str, str]:
    """The headers of the token a log-in answered with."""
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def form(email: str, password: str = PASSWORD) -> dict[str, str]:
    return {"username": email, "password": password}


def delete_me(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> Awaitable[httpx.Response]:
    body = {"current_password": PASSWORD}
    return client.request("DELETE", ME, json=body, headers=headers)


async def test_a_log_in_whose_account_is_deleted_meanwhile_starts_no_session(
    client: httpx.AsyncClient, holdable: None
) -> None:
    for i in range(8):
        ann = await account(f"ann{i}@example.com")
        ann_session = await session(ann.id)
        async with anyio.create_task_group() as tasks:
            stale = hold(tasks, client, "POST", TOKEN, data=form(ann.email))
            await reached(stale)
            if i % 2:  # the log-in goes on while the deletion runs
                stale.released.set()
            assert (await delete_me(client, ann_session)).status_code == 204
            # On SQLite without AUTOINCREMENT, Bob would get Ann's id back.
            bob = await account(f"bob{i}@example.com", following=True)
            bob_session = await session(bob.id)
            stale.released.set()

        assert stale.status() in ({200, 401} if i % 2 else {401})
        if stale.status() == 200:  # it came first: the deletion ended its session
            assert (
                await client.get(ME, headers=issued(stale.answer()))
            ).status_code == 401
        assert await sessions() == {stored(bob_session, bob.id)}
        await Users.objects.delete(each=True)


async def test_a_change_whose_account_is_deleted_meanwhile_gets_401(
    client: httpx.AsyncClient, holdable: None
) -> None:
    for i in range(8):
        ann = await account(f"ann{i}@example.com")
        ann_sessions = [await session(ann.id), await session(ann.id)]
        # Even tries change the email, odd ones the password (which ends sessions).
        change = (
            {"email": f"new{i}@example.com"}
            if i % 2 == 0
            else {"password": a_password("p" * 9)}
        )
        body = {**change, "current_password": PASSWORD}
        async with anyio.create_task_group() as tasks:
            stale = hold(tasks, client, "PATCH", ME, json=body, headers=ann_sessions[0])
            await reached(stale)
            assert (await delete_me(client, ann_sessions[1])).status_code == 204
            # Ann's id again on SQLite without AUTOINCREMENT.
            bob = await account(f"bob{i}@example.com", following=True)
            bob_session = await session(bob.id)
            stale.released.set()

        assert stale.status() == 401
        assert await Users.objects.get(id=bob.id) == bob  # untouched
        assert (await Users.objects.get(id=bob.id)).password == bob.password
        assert (await client.get(ME, headers=bob_session)).json()["email"] == bob.email
        await Users.objects.delete(each=True)


async def test_a_log_in_that_checked_the_old_password_starts_no_session(
    client: httpx.AsyncClient, holdable: None
) -> None:
    for i in range(8):
        ann = await account(f"ann{i}@example.com")
        changer = await session(ann.id)
        body = {"password": a_password("n" * 9), "current_password": PASSWORD}
        async with anyio.create_task_group() as tasks:
            stale = hold(tasks, client, "POST", TOKEN, data=form(ann.email))
            await reached(stale)
            if i % 2:  # the log-in goes on while the change runs
                stale.released.set()
            assert (
                await client.patch(ME, json=body, headers=changer)
            ).status_code == 200
            stale.released.set()

        assert stale.status() in ({200, 401} if i % 2 else {401})
        if stale.status() == 200:  # it came first: the change ended its session
            assert (
                await client.get(ME, headers=issued(stale.answer()))
            ).status_code == 401
        # Only the session that changed the password is left.
        assert await sessions() == {stored(changer, ann.id)}
        await Users.objects.delete(each=True)


async def waiting_for_a_lock(engine: AsyncEngine) -> bool:
    async with engine.connect() as connection:
        query = "SELECT count(*) FROM pg_locks WHERE NOT granted"
        return bool(await connection.scalar(sqlalchemy.text(query)))


@pytest.mark.skipif(
    DATABASE_URL.startswith("sqlite"),
    reason="SQLite has one writer at a time: no log-in writes during another's",
)
async def test_a_log_in_during_a_password_changes_commit_starts_no_session(
    client: httpx.AsyncClient, holdable: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The change has written the new hash and ended the other sessions, and not yet
    # committed: a log-in that checked the old password must wait for the commit.
    monkeypatch.setattr(accounts.routes, "database", CommitHoldingDatabase())
    engine = create_async_engine(DATABASE_URL, poolclass=sqlalchemy.NullPool)
    body = {"password": a_password("n" * 9), "current_password": PASSWORD}
    for i in range(8):
        ann = await account(f"ann{i}@example.com")
        changer = await session(ann.id)
        async with anyio.create_task_group() as tasks:
            stale = hold(tasks, client, "POST", TOKEN, data=form(ann.email))
            await reached(stale)
            change = hold(
                tasks, client, "PATCH", ME, HOLDING_COMMIT, json=body, headers=changer
            )
            await reached(change)
            stale.released.set()
            with anyio.fail_after(10):  # it finishes, or waits for the change's lock
                while stale.response is None and not await waiting_for_a_lock(engine):
                    await anyio.sleep(0.01)
            change.released.set()

        assert (change.status(), stale.status()) == (200, 401)
        assert await sessions() == {stored(changer, ann.id)}
        await Users.objects.delete(each=True)
    await engine.dispose()


async def test_of_two_password_changes_at_once_one_wins_the_other_gets_409(
    client: httpx.AsyncClient, holdable: None
) -> None:
    for i in range(5):
        ann = await account(f"ann{i}@example.com")
        headers = [await session(ann.id), await session(ann.id)]
        passwords = [a_password(f"first-{i}-pass"), a_password(f"second-{i}-pass")]
        async with anyio.create_task_group() as tasks:
            changes = [
                hold(
                    tasks,
                    client,
                    "PATCH",
                    ME,
                    json={"password": password, "current_password": PASSWORD},
                    headers=session_headers,
                )
                for password, session_headers in zip(passwords, headers, strict=True)
            ]
            await reached(*changes)  # both checked the same current password
            for change in changes:
                change.released.set()

        # The loser's session was still valid when it was checked: a 409, not a 401.
        statuses = [change.status() for change in changes]
        assert sorted(statuses) == [200, 409]
        winner, loser = (0, 1) if statuses[0] == 200 else (1, 0)
        assert (await client.get(ME, headers=headers[winner])).status_code == 200
        assert (await client.get(ME, headers=headers[loser])).status_code == 401
        assert (
            await client.post(TOKEN, data=form(ann.email, passwords[winner]))
        ).status_code == 200
        assert (
            await client.post(TOKEN, data=form(ann.email, passwords[loser]))
        ).status_code == 401
        await Users.objects.delete(each=True)


async def test_log_ins_at_once_from_one_client_store_one_device_per_account(
    client: httpx.AsyncClient, holdable: None
) -> None:
    # A client with a device cookie (from another account) logging in to an account
    # several times at once: each log-in writes the same device.
    first = await account("first@example.com")
    assert (await client.post(TOKEN, data=form(first.email))).status_code == 200
    for i in range(8):
        ann = await account(f"ann{i}@example.com", following=True)
        async with anyio.create_task_group() as tasks:
            log_ins = [
                hold(tasks, client, "POST", TOKEN, data=form(ann.email))
                for _ in range(settings.PASSWORD_HASHING_SHARE)
            ]
            await reached(*log_ins)  # all checked, none has written
            for log_in in log_ins:
                log_in.released.set()
        assert [log_in.status() for log_in in log_ins] == [200] * len(log_ins)
        assert all("set-cookie" not in log_in.answer().headers for log_in in log_ins)
        assert await Devices.objects.filter(user=ann.id).count() == 1
        await Users.objects.delete(id=ann.id)


async def test_a_new_account_never_gets_a_deleted_ones_id(sign_up: SignUp) -> None:
    ann = await sign_up("ann@example.com")
    newest = await sign_up("bob@example.com")
    await Users.objects.delete(id=newest["id"])
    assert (await sign_up("cat@example.com"))["id"] > newest["id"] > ann["id"]


@pytest.fixture
def one_hashing_thread(
    migrated_url: str, start_server: StartServer
) -> Iterator[Server]:
    """A uvicorn process with one hashing thread: hashes are checked in arrival order.

    `main:app`, hashing as deployed: each check lasts long enough for the requests
    queued behind it to read their accounts meanwhile.
    """
    threads = {"PASSWORD_HASHING_THREADS": "1"}
    with start_server(migrated_url, env=threads) as server:
        yield server
        assert "Traceback" not in server.log(), faults(server.log())


async def accounts_with_sessions(
    database_url: str, emails: list[str]
) -> list[dict[str, str]]:
    """Accounts with PASSWORD hashed as deployed, and a session of each (its headers),
    written straight to a server's database: a sign-up and a log-in each would be 12
    hashes of ~0.13 s on its one hashing thread before the race."""
    stored_hash = PasswordHash.recommended().hash(PASSWORD)  # main's own setting
    users, tokens = Users.ormar_config.table, Tokens.ormar_config.table
    issued = [secrets.token_urlsafe(32) for _ in emails]
    now = datetime.now(UTC)
    engine = create_async_engine(database_url, poolclass=sqlalchemy.NullPool)
    try:
        async with engine.begin() as connection:
            for email, token in zip(emails, issued, strict=True):
                account = {
                    "email": email,
                    "password": stored_hash,
                    "is_active": True,
                    "is_verified": True,
                }
                user_id = await connection.scalar(
                    users.insert().values(account).returning(users.c.id)
                )
                session = {
                    "user_id": user_id,
                    "digest": token_digest(token),
                    "created_at": now,
                    "expires_at": now + settings.TOKEN_LIFETIME,
                }
                await connection.execute(tokens.insert().values(session))
    finally:
        await engine.dispose()
    return [{"Authorization": f"Bearer {token}"} for token in issued]


@pytest.mark.slow
async def test_log_ins_racing_their_accounts_deletion_never_get_a_500(
    one_hashing_thread: Server,
) -> None:
    server = one_hashing_thread
    emails = [f"user{i}@example.com" for i in range(6)]
    headers = await accounts_with_sessions(server.database_url, emails)
    # An address per account (its deletion and its log-in): twelve hashes at once
    # from one address would pass its share of the hashing queue, a 429.
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                server_client_at(server.url, loopback(i), timeout=60)
            )
            for i in range(len(emails))
        ]
        # Each account's session still works: the rows are what a log-in writes.
        for client, session_headers, email in zip(
            clients, headers, emails, strict=True
        ):
            me = await client.get(ME, headers=session_headers)
            assert me.json()["email"] == email
        deletions: list[httpx.Response] = []
        log_ins: list[httpx.Response] = []

        async def send(
            answers: list[httpx.Response], request: Awaitable[httpx.Response]
        ) -> None:
            answers.append(await request)

        # Each log-in reads its account while the deletions wait for the hashing
        # thread, and checks its password after all of them: the account is gone.
        async with anyio.create_task_group() as tasks:
            for client, session_headers in zip(clients, headers, strict=True):
                tasks.start_soon(send, deletions, delete_me(client, session_headers))
            for client, email in zip(clients, emails, strict=True):
                tasks.start_soon(send, log_ins, client.post(TOKEN, data=form(email)))

        assert [response.status_code for response in deletions] == [204] * 6
        assert {response.status_code for response in log_ins} <= {200, 401}
        for response in log_ins:  # a log-in that came first lost its session
            if response.status_code == 200:
                assert (
                    await clients[0].get(ME, headers=issued(response))
                ).status_code == 401


async def session_of(client: httpx.AsyncClient, email: str) -> dict[str, str]:
    response = await client.post(TOKEN, data=form(email))
    assert response.status_code == 200, response.text
    return issued(response)


async def test_past_the_session_bound_a_log_in_ends_the_oldest_session(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "SESSIONS_PER_USER", 3)
    await account("ann@example.com")
    bob = await session((await account("bob@example.com", following=True)).id)
    anns = [await session_of(client, "ann@example.com") for _ in range(4)]
    statuses = [(await client.get(ME, headers=headers)).status_code for headers in anns]
    assert statuses == [401, 200, 200, 200]
    assert (await client.get(ME, headers=bob)).status_code == 200  # not Ann's


SECRET = "SECRET-not-echoed"
BAD_EMAILS = [
    f"a@[IPv6:fe80::zzzz:{SECRET}]",
    f"{SECRET}@[1.2.3.999]",
    f"a@xn--{SECRET}-.example.com",  # not valid punycode (an IDNA label)
    f"a@ab--{SECRET}.example.com",  # "--" in the 3rd and 4th places: not IDNA
    f"{SECRET}",
]
TOO_LONG = SECRET * (PASSWORD_MAX // len(SECRET) + 1)
FIELDS = {"body", "email", "password", "current_password", "username"}


async def test_no_422_quotes_what_the_client_sent(client: httpx.AsyncClient) -> None:
    ann = await account("ann@example.com")
    headers = await session(ann.id)
    requests = [client.post(TOKEN, data={"username": email}) for email in BAD_EMAILS]
    requests.append(client.patch(ME, json={"email": 123}, headers=headers))
    for email in BAD_EMAILS:
        requests += [
            client.post(USERS, json={"email": email, "password": PASSWORD}),
            client.patch(
                ME, json={"email": email, "current_password": PASSWORD}, headers=headers
            ),
            client.post(
                USERS,
                json={"email": "b@example.com", "password": email[: PASSWORD_MIN - 1]},
            ),
            client.patch(
                ME,
                json={"password": TOO_LONG, "current_password": PASSWORD},
                headers=headers,
            ),
        ]
    messages: dict[str, set[str]] = {}
    for request in requests:
        response = await request
        assert response.status_code == 422
        assert SECRET not in response.text
        for error in response.json()["detail"]:
            assert set(error["loc"]) <= FIELDS, error["loc"]
            messages.setdefault(error["type"], set()).add(error["msg"])
    # Each kind of error has one message, whatever the value was.
    assert {kind: len(texts) for kind, texts in messages.items()} == dict.fromkeys(
        messages, 1
    )
    assert await Users.objects.get(id=ann.id) == ann


@pytest.mark.skipif(
    DATABASE_URL.startswith("sqlite"), reason="SQLite has one writer at a time"
)
async def test_requests_that_deadlock_get_a_503_to_retry_never_a_500(
    client: httpx.AsyncClient,
) -> None:
    # Two requests that each lock what the other waits on: PostgreSQL stops one.
    keys, locked = (8_675_309, 8_675_310), (anyio.Event(), anyio.Event())
    router = APIRouter()

    @router.post("/probe-deadlock/{first}")
    async def probe_deadlock(first: int) -> None:
        lock = sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)")
        async with database.transaction(), database.connection() as connection:
            await connection.execute(lock, {"key": keys[first]})
            locked[first].set()
            await locked[1 - first].wait()
            await connection.execute(lock, {"key": keys[1 - first]})

    before = len(main.app.router.routes)
    main.app.include_router(router)
    statuses: list[int] = []

    async def send(first: int) -> None:
        statuses.append((await client.post(f"/probe-deadlock/{first}")).status_code)

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(send, 0)
            tasks.start_soon(send, 1)
    finally:
        del main.app.router.routes[before:]
    assert sorted(statuses) == [200, 503]

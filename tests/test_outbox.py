"""The outbox: mail survives a killed server and an SMTP server that is down, two
senders never send one row twice, and what follows an answer is the same work for
every address. And a stranger's sign-up never takes an address over.

Every message goes to a real SMTP server (aiosmtpd, harness.py's smtp_server).
"""

import os
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy
from aiosmtpd.controller import Controller
from sqlalchemy.ext.asyncio import create_async_engine
from test_mail import CONFIRM, HEALTH, ME, RESET, TOKEN, USERS, VERIFY
from test_throttle import SERVE_OPTIONS

from accounts import links, outbox, passwords
from accounts.models import Links, Mails
from core.settings import settings
from db import Users, database
from support import (
    MAILBOX,
    PASSWORD,
    ClientAt,
    LoggedIn,
    LogIn,
    SignUp,
    StartServer,
    a_password,
    link_token,
    loopback,
    server_client_at,
)

pytestmark = pytest.mark.anyio

STRANGERS = a_password("strangers-s3cret")
NEW_PASSWORD = a_password("owners-new-s3cret")


def form(email: str, password: str = PASSWORD) -> dict[str, str]:
    return {"username": email, "password": password}


# No pre-hijacking ---------------------------------------------------------------


async def strangers_sign_up(stranger: httpx.AsyncClient) -> str:
    """A stranger signs up with the owner's address: the link mailed to it."""
    body = {"email": "owner@example.com", "password": STRANGERS}
    assert (await stranger.post(USERS, json=body)).status_code == 202
    return link_token(await MAILBOX.arrived("owner@example.com", 1))


async def test_a_strangers_sign_up_link_dies_when_the_owner_signs_up_and_a_reset_lets_her_in(
    client: httpx.AsyncClient, client_at: ClientAt
) -> None:
    async with client_at("192.0.2.66") as stranger:
        strangers_link = await strangers_sign_up(stranger)
        # The owner signs up later, then opens every link she gets.
        body = {"email": "owner@example.com", "password": PASSWORD}
        assert (await client.post(USERS, json=body)).status_code == 202
        notice = await MAILBOX.arrived("owner@example.com", 2)
        assert "#token=" not in notice.get_content()
        assert "reset your password" in notice.get_content()
        confirmed = await client.post(
            VERIFY, json={"token": strangers_link, "password": PASSWORD}
        )
        assert confirmed.status_code == 400
        for password in (STRANGERS, PASSWORD):
            refused = await stranger.post(
                TOKEN, data=form("owner@example.com", password)
            )
            assert refused.status_code == 401

        # The notice's way in: a reset, which proves the address.
        assert (
            await client.post(RESET, json={"email": "owner@example.com"})
        ).is_success
        token = link_token(await MAILBOX.arrived("owner@example.com", 3))
        body = {"token": token, "password": NEW_PASSWORD}
        assert (await client.post(CONFIRM, json=body)).status_code == 204
        assert (
            await client.post(
                VERIFY, json={"token": strangers_link, "password": PASSWORD}
            )
        ).status_code == 400
        refused = await stranger.post(TOKEN, data=form("owner@example.com", STRANGERS))
        assert refused.status_code == 401
    owner = await client.post(TOKEN, data=form("owner@example.com", NEW_PASSWORD))
    assert owner.status_code == 200


async def test_an_owner_who_opens_a_strangers_sign_up_link_proves_no_account(
    client: httpx.AsyncClient, client_at: ClientAt
) -> None:
    async with client_at("192.0.2.66") as stranger:
        strangers_link = await strangers_sign_up(stranger)
        # The owner never signed up, but opens the link with the password she has.
        body = {"token": strangers_link, "password": PASSWORD}
        assert (await client.post(VERIFY, json=body)).status_code == 403
        refused = await stranger.post(TOKEN, data=form("owner@example.com", STRANGERS))
        assert refused.status_code == 401


async def test_an_owner_who_opens_a_strangers_email_change_link_moves_no_account(
    client: httpx.AsyncClient, client_at: ClientAt, sign_up: SignUp, log_in: LogIn
) -> None:
    await sign_up("stranger@example.com", STRANGERS)
    headers = await log_in("stranger@example.com", STRANGERS)
    async with client_at("192.0.2.66") as stranger:
        body = {"email": "owner@example.com", "current_password": STRANGERS}
        assert (await stranger.patch(ME, json=body, headers=headers)).status_code == 202
        strangers_link = link_token(await MAILBOX.arrived("owner@example.com", 1))
        body = {"token": strangers_link, "password": PASSWORD}
        assert (await client.post(VERIFY, json=body)).status_code == 403
        refused = await stranger.post(TOKEN, data=form("owner@example.com", STRANGERS))
        assert refused.status_code == 401
        kept = await stranger.post(TOKEN, data=form("stranger@example.com", STRANGERS))
        assert kept.status_code == 200


async def test_a_strangers_sign_up_still_in_the_outbox_sends_no_link_after_the_owners(
    client: httpx.AsyncClient,
    client_at: ClientAt,
    monkeypatch: pytest.MonkeyPatch,
    free_port: Callable[[], int],
) -> None:
    working = settings.SMTP_URL
    monkeypatch.setattr(settings, "SMTP_URL", f"smtp://127.0.0.1:{free_port()}")
    monkeypatch.setattr(outbox, "FIRST_RETRY", 0.05)
    async with client_at("192.0.2.66") as stranger:
        body = {"email": "owner@example.com", "password": STRANGERS}
        assert (await stranger.post(USERS, json=body)).status_code == 202
    body = {"email": "owner@example.com", "password": PASSWORD}
    assert (await client.post(USERS, json=body)).status_code == 202
    monkeypatch.setattr(settings, "SMTP_URL", working)  # both go out now
    mailed = [await MAILBOX.arrived("owner@example.com", i) for i in (1, 2)]
    assert {m["Subject"] for m in mailed} == {
        "Someone tried to sign up with your address"
    }


# Pruning ----------------------------------------------------------------------------


async def test_a_sign_up_removes_unverified_accounts_past_their_links_and_no_id_returns(
    client: httpx.AsyncClient, sign_up: SignUp
) -> None:
    body = {"email": "late@example.com", "password": PASSWORD}
    assert (await client.post(USERS, json=body)).status_code == 202
    await MAILBOX.arrived("late@example.com", 1)
    await sign_up("kept@example.com")  # verified: kept, however old
    late = await Users.objects.get(email="late@example.com")
    long_ago = datetime.now(UTC) - 2 * links.ADDRESS_LIFETIME
    await Users.objects.update(each=True, created_at=long_ago)
    await Links.objects.update(each=True, expires_at=datetime.now(UTC))

    await sign_up("new@example.com")
    assert await Users.objects.filter(email="late@example.com").count() == 0
    assert await Users.objects.filter(email="kept@example.com").count() == 1
    assert (await client.post(USERS, json=body)).status_code == 202
    again = await Users.objects.get(email="late@example.com")
    newest = await Users.objects.get(email="new@example.com")
    assert again.id > newest.id > late.id


# Sending --------------------------------------------------------------------------


async def test_senders_at_once_send_each_mail_once(
    client: httpx.AsyncClient, sign_up: SignUp
) -> None:
    """The app's sender and three more, on one database, over rows posted at once."""
    addresses = [f"many{i}@example.com" for i in range(40)]
    async with anyio.create_task_group() as senders:
        for _ in range(3):
            senders.start_soon(outbox.send_all)
        async with anyio.create_task_group() as requests:
            for address in addresses:
                requests.start_soon(outbox.post, "password", address)
        for address in addresses:
            await MAILBOX.arrived(address, 1)
        await sign_up("marker@example.com")  # mailed after all of them
        senders.cancel_scope.cancel()
    assert all(len(MAILBOX.to(address)) == 1 for address in addresses)
    assert await Mails.objects.count() == 0


@contextmanager
def statements_run() -> Iterator[list[str]]:
    """The SQL of each statement the app runs meanwhile (its sender's too), but the
    sender's looks for mail that is due, of which there are more when the machine
    is slow."""
    run: list[str] = []
    tables = ("INSERT", "UPDATE", "DELETE", "SELECT users", "SELECT mails", "WITH")
    claim = str(
        sqlalchemy.select(Mails.ormar_config.table.c.id).compile(database.engine)
    )

    def noted(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # Not a connection's set-up, nor the test's own counting.
        if statement.startswith(tables) and claim not in statement:
            run.append(statement)

    engine = database.engine.sync_engine
    sqlalchemy.event.listen(engine, "before_cursor_execute", noted)
    try:
        yield run
    finally:
        sqlalchemy.event.remove(engine, "before_cursor_execute", noted)


async def accounts(*emails: str) -> None:
    stored_hash = passwords.hash_password(PASSWORD)
    for email in emails:
        await Users.objects.create(email=email, password=stored_hash, is_verified=True)


async def work_of(request: Callable[[str], Any], email: str) -> Counter[str]:
    """The statements that a request for `email`, and sending its mail, run."""
    with statements_run() as run:
        await request(email)
        await MAILBOX.arrived(email, 1)
        with anyio.fail_after(10):  # its row deleted: the sender is done with it
            while await Mails.objects.count():
                await anyio.sleep(0.01)
    return Counter(run)


async def test_a_reset_for_a_known_and_an_unknown_address_does_the_same_work(
    client: httpx.AsyncClient,
) -> None:
    await accounts("known@example.com")

    async def reset(email: str) -> None:
        assert (await client.post(RESET, json={"email": email})).status_code == 202

    known = await work_of(reset, "known@example.com")
    assert known == await work_of(reset, "nobody@example.com")
    assert len(MAILBOX.to("known@example.com")) == len(MAILBOX.to("nobody@example.com"))


async def test_an_email_change_to_a_free_and_a_taken_address_does_the_same_work(
    client: httpx.AsyncClient, ann: LoggedIn
) -> None:
    await accounts("taken@example.com")

    async def change(email: str) -> None:
        body = {"email": email, "current_password": PASSWORD}
        assert (await client.patch(ME, json=body, headers=ann.headers)).is_success

    free = await work_of(change, "free@example.com")
    assert free == await work_of(change, "taken@example.com")


async def test_a_sign_up_for_a_new_and_a_taken_address_does_the_same_work(
    client: httpx.AsyncClient,
) -> None:
    await accounts("taken@example.com")

    async def sign_up(email: str) -> None:
        body = {"email": email, "password": PASSWORD}
        assert (await client.post(USERS, json=body)).status_code == 202

    new = await work_of(sign_up, "new@example.com")
    assert new == await work_of(sign_up, "taken@example.com")


# Real servers ----------------------------------------------------------------------


@pytest.mark.slow
async def test_a_sign_up_answered_before_a_sigkill_is_mailed_after_a_restart(
    migrated_url: str, start_server: StartServer, free_port: Callable[[], int]
) -> None:
    port = free_port()  # no SMTP server yet: nothing is sent before the kill
    smtp_url = {"SMTP_URL": f"smtp://127.0.0.1:{port}"}
    with start_server(migrated_url, *SERVE_OPTIONS, env=smtp_url) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            body = {"email": "ann@example.com", "password": PASSWORD}
            assert (await client.post(USERS, json=body)).status_code == 202
        # Killed between tries (one under way would hold the row for outbox.LEASE).
        with anyio.fail_after(30):
            while "(verify) not sent, try 1" not in server.log():
                await anyio.sleep(0.01)
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
    smtp = Controller(MAILBOX, hostname="127.0.0.1", port=port)
    smtp.start()
    try:
        with start_server(migrated_url, *SERVE_OPTIONS, env=smtp_url) as server:
            token = link_token(await MAILBOX.arrived("ann@example.com", 1))
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                verified = await client.post(
                    VERIFY, json={"token": token, "password": PASSWORD}
                )
                assert verified.status_code == 204
                assert (
                    await client.post(TOKEN, data=form("ann@example.com"))
                ).is_success
    finally:
        smtp.stop()
    assert len(MAILBOX.to("ann@example.com")) == 1


async def follow_on_seconds(server_url: str, i: int, request: dict[str, Any]) -> float:
    """Make `request` on a connection of its own (from an address of its own), then
    time the request that follows it on that connection."""
    async with server_client_at(server_url, loopback(i % 200), timeout=30) as client:
        assert (await client.request(**request)).status_code == 202
        started = time.perf_counter()
        assert (await client.get(HEALTH)).status_code == 200
        return time.perf_counter() - started


async def assert_follow_ons_alike(
    server_url: str,
    first: Callable[[int], dict[str, Any]],
    second: Callable[[int], dict[str, Any]],
) -> None:
    """The medians of what follows `first(i)` and `second(i)`, taken in turns, within
    0.85-1.18 of each other; the mail of each is waited for. A busy machine's noise
    fades as rounds are added and a difference stays: up to ROUNDS * LOOKS are taken."""
    seconds: tuple[list[float], list[float]] = ([], [])
    for i in range(ROUNDS * LOOKS):
        order = [(0, first), (1, second)][:: 1 if i % 2 else -1]
        for side, request in order:
            seconds[side].append(await follow_on_seconds(server_url, i, request(i)))
            await MAILBOX.arrived(request(i)["json"]["email"], 1)
        if (i + 1) % ROUNDS:
            continue
        ratio = statistics.median(seconds[0]) / statistics.median(seconds[1])
        if 0.85 <= ratio <= 1.18:
            return
    pytest.fail(f"what follows differs: medians {ratio:.2f} to 1 after {i + 1} rounds")


async def make_accounts(database_url: str, emails: list[str]) -> None:
    """Accounts with PASSWORD and proven addresses, written to a server's database."""
    engine = create_async_engine(database_url)
    stored_hash = passwords.hash_password(PASSWORD)
    rows = [
        {"email": e, "password": stored_hash, "is_active": True, "is_verified": True}
        for e in emails
    ]
    async with engine.begin() as connection:
        await connection.execute(Users.ormar_config.table.insert(), rows)
    await engine.dispose()


ROUNDS, LOOKS = 40, 5  # a comparison's rounds at each look, and its looks at most


@pytest.mark.slow
async def test_what_follows_a_reset_takes_as_long_for_a_known_and_an_unknown_address(
    migrated_url: str, start_server: StartServer
) -> None:
    await make_accounts(
        migrated_url, [f"known{i}@example.com" for i in range(ROUNDS * LOOKS)]
    )
    with start_server(migrated_url, *SERVE_OPTIONS) as server:
        await assert_follow_ons_alike(
            server.url,
            lambda i: {
                "method": "POST",
                "url": RESET,
                "json": {"email": f"known{i}@example.com"},
            },
            lambda i: {
                "method": "POST",
                "url": RESET,
                "json": {"email": f"nobody{i}@example.com"},
            },
        )


@pytest.mark.slow
async def test_what_follows_an_email_change_takes_as_long_for_a_free_and_a_taken_address(
    migrated_url: str, start_server: StartServer
) -> None:
    await make_accounts(
        migrated_url,
        ["ann@example.com", *(f"taken{i}@example.com" for i in range(ROUNDS * LOOKS))],
    )
    with start_server(migrated_url, *SERVE_OPTIONS) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            logged_in = await client.post(TOKEN, data=form("ann@example.com"))
            headers = {"Authorization": f"Bearer {logged_in.json()['access_token']}"}

        def change(email: str) -> dict[str, Any]:
            body = {"email": email, "current_password": PASSWORD}
            return {"method": "PATCH", "url": ME, "json": body, "headers": headers}

        await assert_follow_ons_alike(
            server.url,
            lambda i: change(f"free{i}@example.com"),
            lambda i: change(f"taken{i}@example.com"),
        )

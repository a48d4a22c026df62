"""Mail and the links in it: sign-up proves the address, password reset, email change,
the mail caps, and what a stranger learns (nothing: the same answers in the same time).

Every message goes to a real SMTP server (aiosmtpd, smtp_server in tests/harness.py) or, as
without SMTP_URL, to the log; none is stubbed out.
"""

import logging
import re
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import anyio
import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword
from test_throttle import SERVE_OPTIONS

from accounts import links, outbox, passwords, throttle
from accounts.models import Devices, Links, LogInAttempts, Mails, Tokens
from core.settings import settings
from db import Users
from main import app
from support import (
    MAILBOX,
    PASSWORD,
    PASSWORD_MAX,
    PASSWORD_MIN,
    ClientAt,
    LoggedIn,
    LogIn,
    Server,
    SignUp,
    StartServer,
    a_password,
    common_passwords,
    imported_again,
    link_token,
    loopback,
)

pytestmark = pytest.mark.anyio

url = app.url_path_for
USERS, ME, TOKEN = url("create_user"), url("read_me"), url("log_in")
VERIFY, HEALTH = url("verify_email"), url("health")
RESET, CONFIRM = url("request_password_reset"), url("reset_password")
NEW_PASSWORD = a_password("a-new-s3cret")
BAD_LINK = {"detail": "Invalid or expired link"}
ROUNDS, TRIES = 60, 3  # of each request in a time comparison; comparisons


def answer(response: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    """What a client sees of a response, byte for byte."""
    return response.status_code, response.headers.multi_items(), response.content


def form(email: str, password: str = PASSWORD) -> dict[str, str]:
    return {"username": email, "password": password}


async def link_to(address: str, count: int = 1) -> str:
    """The token in the `count`th message to `address`, once it has come."""
    return link_token(await MAILBOX.arrived(address, count))


async def request_reset(client: httpx.AsyncClient, email: str) -> httpx.Response:
    return await client.post(RESET, json={"email": email})


async def reset(
    client: httpx.AsyncClient, token: str, password: str = NEW_PASSWORD
) -> httpx.Response:
    return await client.post(CONFIRM, json={"token": token, "password": password})


async def mail_settled(client: httpx.AsyncClient, sign_up: SignUp) -> None:
    """Wait until mail sent before this has come: a reset link to an account of its
    own comes after them (each goes out as soon as its request is answered)."""
    await sign_up("marker@example.com")
    await request_reset(client, "marker@example.com")
    await MAILBOX.arrived("marker@example.com", 2)


Timed = Callable[[int], Awaitable[str | None]]


async def time_ratio(first: Timed, second: Timed, numbers: range) -> float:
    """The median over each i in `numbers` of the seconds of `first(i)` over those of
    `second(i)`, the two taken back to back (which goes first alternates), so that a
    busy moment of the machine falls on both of a pair.

    In-process, a request's time includes its background task (the look-up). Each
    returns the address it mails, if any: its mail is waited for before the next, so
    that the sending, which no request waits for, falls on neither."""
    ratios = []
    for i in numbers:
        order = [(0, first), (1, second)][:: 1 if i % 2 else -1]
        seconds = [0.0, 0.0]
        for kind, request in order:
            started = time.perf_counter()
            mailed = await request(i)
            seconds[kind] = time.perf_counter() - started
            if mailed:
                await MAILBOX.arrived(mailed, 1)
        ratios.append(seconds[0] / seconds[1])
    return statistics.median(ratios)


async def assert_same_time(first: Timed, second: Timed) -> None:
    """`first` and `second` take the same time, within 20 %, in one of TRIES
    measurements of ROUNDS each (i: a number of its own in each): more work on one
    side shows in every one (a look-up before the answer measured 0.7 on a
    prototype), a busy moment of the machine in one."""
    ratios = []
    for attempt in range(TRIES):
        numbers = range(attempt * ROUNDS, (attempt + 1) * ROUNDS)
        ratios.append(await time_ratio(first, second, numbers))
        print(f"\ntime ratio {ratios[-1]:.2f}")
        if 0.8 < ratios[-1] < 1.25:
            return
    raise AssertionError(f"time ratios {ratios}")


# The same answer, in the same time, for every address ----------------------------


async def test_sign_up_answers_alike_for_a_new_an_unverified_and_a_taken_address(
    client: httpx.AsyncClient, sign_up: SignUp, log_in: LogIn
) -> None:
    await sign_up("taken@example.com")
    answers = []
    for email, password in [
        ("new@example.com", PASSWORD),
        ("new@example.com", a_password("another-s3cret")),  # not verified yet
        ("taken@example.com", a_password("another-s3cret")),
    ]:
        body = {"email": email, "password": password}
        answers.append(answer(await client.post(USERS, json=body)))
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][0] == 202

    notices = [await MAILBOX.arrived(f"{a}@example.com", 2) for a in ("new", "taken")]
    for notice in notices:
        assert notice["Subject"] == "Someone tried to sign up with your address"
        assert "#token=" not in notice.get_content()
        assert "reset your password" in notice.get_content()
    # The unverified account's first link died with the second sign-up (either may
    # be a stranger's), or was sent as a notice; both keep their first password.
    first = (await MAILBOX.arrived("new@example.com", 1)).get_content()
    if "#token=" in first:
        token = first.split("#token=")[1].split()[0]
        assert (
            await client.post(VERIFY, json={"token": token, "password": PASSWORD})
        ).json() == BAD_LINK
    await log_in("taken@example.com")
    for email in ("new@example.com", "taken@example.com"):
        user = await Users.objects.get(email=email)
        assert passwords.verify_password(PASSWORD, user.password)[0]


async def test_each_sign_up_spends_one_hash_in_the_request(
    client: httpx.AsyncClient, sign_up: SignUp, monkeypatch: pytest.MonkeyPatch
) -> None:
    await sign_up("taken@example.com")
    hashed: list[str] = []
    hash_password = passwords.hash_password

    def counted(password: str) -> str:
        hashed.append(password)
        return hash_password(password)

    monkeypatch.setattr(passwords, "hash_password", counted)
    for email in ("new@example.com", "new@example.com", "taken@example.com"):
        body = {"email": email, "password": PASSWORD}
        assert (await client.post(USERS, json=body)).status_code == 202
    assert len(hashed) == 3


async def accounts(name: str) -> None:
    """Accounts `{name}{i}@example.com` with PASSWORD and proven addresses, made
    directly, one for each request that assert_same_time may make: each request is
    the first for its address, as a stranger's probe is."""
    stored_hash = passwords.hash_password(PASSWORD)
    for i in range(TRIES * ROUNDS):
        email = f"{name}{i}@example.com"
        await Users.objects.create(email=email, password=stored_hash, is_verified=True)


@pytest.mark.slow  # a timing comparison
async def test_new_and_taken_sign_ups_take_the_same_time(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        settings, "SIGN_UPS_AND_RESETS_PER_MINUTE", 10**6
    )  # one client sends all
    await accounts("taken")

    async def sign_up_as(email: str) -> str:
        await client.post(USERS, json={"email": email, "password": PASSWORD})
        return email  # a link, or a notice

    await assert_same_time(
        lambda i: sign_up_as(f"new{i}@example.com"),
        lambda i: sign_up_as(f"taken{i}@example.com"),
    )


async def unverified_and_wrong_log_ins(
    client: httpx.AsyncClient, sign_up: SignUp
) -> tuple[httpx.Response, httpx.Response]:
    """A log-in to an account whose address is not proven yet, and one with a wrong
    password to an account whose address is."""
    await sign_up("ann@example.com")
    body = {"email": "new@example.com", "password": PASSWORD}
    assert (await client.post(USERS, json=body)).status_code == 202
    unverified = await client.post(TOKEN, data=form("new@example.com"))
    wrong = await client.post(
        TOKEN, data=form("ann@example.com", a_password("wrong-password"))
    )
    return unverified, wrong


async def test_an_unverified_log_in_gets_the_wrong_passwords_401(
    client: httpx.AsyncClient, sign_up: SignUp
) -> None:
    unverified, wrong = await unverified_and_wrong_log_ins(client, sign_up)
    assert answer(unverified) == answer(wrong)
    assert unverified.status_code == 401


@pytest.mark.slow  # a timing comparison
async def test_an_unverified_log_in_gets_the_wrong_passwords_401_in_the_same_time(
    client: httpx.AsyncClient, sign_up: SignUp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "LOG_IN_ATTEMPTS", 1000)  # none refused
    unverified, wrong = await unverified_and_wrong_log_ins(client, sign_up)
    assert answer(unverified) == answer(wrong)

    async def log_in_unverified(i: int) -> None:
        await client.post(TOKEN, data=form("new@example.com"))
        return None

    async def log_in_wrong(i: int) -> None:
        await client.post(
            TOKEN, data=form("ann@example.com", a_password("wrong-password"))
        )
        return None

    await assert_same_time(log_in_unverified, log_in_wrong)


async def test_a_reset_answers_alike_for_every_address_and_mails_only_an_account(
    client: httpx.AsyncClient, sign_up: SignUp
) -> None:
    await sign_up("ann@example.com")
    known = await request_reset(client, "Ann@Example.com")
    unknown = await request_reset(client, "nobody@example.com")
    assert answer(known) == answer(unknown)
    assert known.status_code == 202
    message = await MAILBOX.arrived("ann@example.com", 2)
    assert message["Subject"] == "Reset your password"
    link = f"{settings.PUBLIC_URL}/reset-password#token={link_token(message)}"
    assert link in message.get_content().splitlines()
    # An unknown address is told that no account has it (and is sent one mail).
    notice = await MAILBOX.arrived("nobody@example.com", 1)
    assert notice["Subject"] == "Someone asked to reset a password"
    assert "#token=" not in notice.get_content()
    await mail_settled(client, sign_up)
    assert len(MAILBOX.to("nobody@example.com")) == 1


@pytest.mark.slow  # a timing comparison
async def test_known_and_unknown_resets_take_the_same_time(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        settings, "SIGN_UPS_AND_RESETS_PER_MINUTE", 10**6
    )  # one client sends all
    await accounts("known")

    async def reset_for(email: str) -> str | None:
        await request_reset(client, email)
        return email if email.startswith("known") else None

    await assert_same_time(
        lambda i: reset_for(f"known{i}@example.com"),
        lambda i: reset_for(f"nobody{i}@example.com"),
    )


@pytest.mark.slow  # a timing comparison
async def test_an_email_change_to_a_taken_address_takes_the_same_time(
    client: httpx.AsyncClient, ann: LoggedIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "LOG_IN_ATTEMPTS", 1000)  # each checks a password
    await accounts("taken")

    async def change_to(email: str) -> str:
        change = {"email": email, "current_password": PASSWORD}
        assert (await client.patch(ME, json=change, headers=ann.headers)).is_success
        return email  # a link, or a notice

    await assert_same_time(
        lambda i: change_to(f"free{i}@example.com"),
        lambda i: change_to(f"taken{i}@example.com"),
    )
    notice = MAILBOX.to("taken0@example.com")[0]
    assert notice["Subject"] == "Someone tried to move an account to your address"
    assert "#token=" not in notice.get_content()


# Links: used once, for a while, until the account changes -------------------------


async def at_once(client_at: ClientAt, path: str, body: dict[str, str]) -> list[int]:
    """Ten of the same request at once, each from an address of its own (a reset
    hashes: within each address's share of the queue); their statuses."""
    statuses: list[int] = []

    async def send(i: int) -> None:
        async with client_at(loopback(i)) as own:
            statuses.append((await own.post(path, json=body)).status_code)

    async with anyio.create_task_group() as tasks:
        for i in range(10):
            tasks.start_soon(send, i)
    return sorted(statuses)


async def test_a_link_is_used_once_even_by_requests_at_once(
    client: httpx.AsyncClient, client_at: ClientAt, sign_up: SignUp
) -> None:
    for round in range(5):
        await sign_up(f"ann{round}@example.com")
        await request_reset(client, f"ann{round}@example.com")
        body = {"email": f"new{round}@example.com", "password": PASSWORD}
        await client.post(USERS, json=body)
        reset_token = await link_to(f"ann{round}@example.com", 2)
        verify_token = await link_to(f"new{round}@example.com")

        body = {"token": reset_token, "password": NEW_PASSWORD}
        assert await at_once(client_at, CONFIRM, body) == [204] + [400] * 9
        body = {"token": verify_token, "password": PASSWORD}
        assert await at_once(client_at, VERIFY, body) == [204] + [400] * 9


async def test_a_bad_used_or_expired_token_is_a_400(
    client: httpx.AsyncClient, sign_up: SignUp
) -> None:
    await sign_up("ann@example.com")
    await request_reset(client, "ann@example.com")
    token = await link_to("ann@example.com", 2)
    await Links.objects.update(each=True, expires_at=datetime.now(UTC))
    await request_reset(client, "ann@example.com")
    live = await link_to("ann@example.com", 3)
    for bad in ["", "not-a-token", "x" * 64, token]:
        assert (await reset(client, bad)).json() == BAD_LINK
        response = await client.post(VERIFY, json={"token": bad, "password": PASSWORD})
        assert (response.status_code, response.json()) == (400, BAD_LINK)
    # A reset link proves no address, and verify-email does not use it up.
    assert (
        await client.post(VERIFY, json={"token": live, "password": PASSWORD})
    ).status_code == 400
    assert (await reset(client, live)).status_code == 204
    assert (await reset(client, live)).status_code == 400  # used


async def test_links_live_an_hour_for_a_reset_and_a_day_to_prove_an_address(
    client: httpx.AsyncClient, ann: LoggedIn
) -> None:
    before = datetime.now(UTC)
    await client.post(USERS, json={"email": "new@example.com", "password": PASSWORD})
    await request_reset(client, "ann@example.com")
    change = {"email": "moved@example.com", "current_password": PASSWORD}
    await client.patch(ME, json=change, headers=ann.headers)
    for address, count in [("new", 1), ("ann", 2), ("moved", 1)]:
        await MAILBOX.arrived(f"{address}@example.com", count)
    lifetimes = {
        link.purpose: link.expires_at.replace(tzinfo=UTC) - before
        for link in await Links.objects.all()
    }
    for purpose, lifetime in [
        ("reset", links.RESET_LIFETIME),
        ("verify", links.ADDRESS_LIFETIME),
        ("email", links.ADDRESS_LIFETIME),
    ]:
        assert lifetime <= lifetimes[purpose] < lifetime + timedelta(seconds=30)


async def test_every_link_dies_when_the_password_changes(
    client: httpx.AsyncClient, ann: LoggedIn
) -> None:
    await request_reset(client, "ann@example.com")
    change = {"email": "moved@example.com", "current_password": PASSWORD}
    await client.patch(ME, json=change, headers=ann.headers)
    reset_token = await link_to("ann@example.com", 2)
    move_token = await link_to("moved@example.com")

    change = {"password": NEW_PASSWORD, "current_password": PASSWORD}
    assert (await client.patch(ME, json=change, headers=ann.headers)).status_code == 200
    assert (await reset(client, reset_token)).json() == BAD_LINK
    assert (
        await client.post(VERIFY, json={"token": move_token, "password": PASSWORD})
    ).json() == BAD_LINK
    notice = await MAILBOX.arrived("ann@example.com", 3)
    assert notice["Subject"] == "Your password was changed"
    assert (await client.get(ME, headers=ann.headers)).json() == ann.user


async def test_a_reset_ends_every_session_other_device_and_other_link(
    client: httpx.AsyncClient, ann: LoggedIn, client_at: ClientAt
) -> None:
    await request_reset(client, "ann@example.com")
    await request_reset(client, "ann@example.com")
    first, second = (
        await link_to("ann@example.com", 2),
        await link_to("ann@example.com", 3),
    )
    async with client_at("192.0.2.20") as phone:  # another device of ann's
        assert (await phone.post(TOKEN, data=form("ann@example.com"))).is_success
    mine = throttle.device_digest(client.cookies["device"], ann.user["id"])
    assert await Devices.objects.count() == 2

    response = await reset(client, first)
    assert (response.status_code, response.content) == (204, b"")  # no log-in
    assert "set-cookie" not in response.headers  # its device cookie, kept
    assert (await client.get(ME, headers=ann.headers)).status_code == 401
    assert await Tokens.objects.count() == 0
    assert [device.digest for device in await Devices.objects.all()] == [mine]
    assert (await reset(client, second)).json() == BAD_LINK
    assert (await client.post(TOKEN, data=form("ann@example.com"))).status_code == 401
    new = await client.post(TOKEN, data=form("ann@example.com", NEW_PASSWORD))
    assert new.status_code == 200
    notice = await MAILBOX.arrived("ann@example.com", 4)
    assert notice["Subject"] == "Your password was changed"


async def test_a_refused_new_password_is_a_422_that_leaves_the_token_usable(
    client: httpx.AsyncClient, sign_up: SignUp
) -> None:
    await sign_up("ann@example.com")
    await request_reset(client, "ann@example.com")
    token = await link_to("ann@example.com", 2)
    for refused in (
        *common_passwords(1),
        "x" * (PASSWORD_MIN - 1),
        "x" * (PASSWORD_MAX + 1),
    ):
        assert (await reset(client, token, refused)).status_code == 422
    assert (await reset(client, token)).status_code == 204


async def test_an_email_change_link_dies_when_the_email_changes(
    client: httpx.AsyncClient, ann: LoggedIn
) -> None:
    for address in ("first", "second"):
        change = {"email": f"{address}@example.com", "current_password": PASSWORD}
        await client.patch(ME, json=change, headers=ann.headers)
    await request_reset(client, "ann@example.com")
    first, second = (
        await link_to("first@example.com"),
        await link_to("second@example.com"),
    )
    reset_token = await link_to("ann@example.com", 2)

    assert (
        await client.post(VERIFY, json={"token": second, "password": PASSWORD})
    ).status_code == 204
    # The old address's links go with it: the other change's, the reset's.
    assert (
        await client.post(VERIFY, json={"token": first, "password": PASSWORD})
    ).json() == BAD_LINK
    assert (await reset(client, reset_token)).json() == BAD_LINK
    assert (await client.get(ME, headers=ann.headers)).json()["email"] == (
        "second@example.com"
    )


async def test_a_confirmed_change_to_an_address_taken_meanwhile_is_a_400(
    client: httpx.AsyncClient, ann: LoggedIn, sign_up: SignUp
) -> None:
    change = {"email": "bob@example.com", "current_password": PASSWORD}
    await client.patch(ME, json=change, headers=ann.headers)
    token = await link_to("bob@example.com")
    await sign_up("bob@example.com")
    assert (
        await client.post(VERIFY, json={"token": token, "password": PASSWORD})
    ).json() == BAD_LINK
    assert (await client.get(ME, headers=ann.headers)).json() == ann.user


async def test_a_strangers_password_and_links_do_not_survive_the_owners_reset(
    client: httpx.AsyncClient, client_at: ClientAt
) -> None:
    async with client_at("192.0.2.66") as stranger:
        body = {
            "email": "owner@example.com",
            "password": a_password("strangers-s3cret"),
        }
        assert (await stranger.post(USERS, json=body)).status_code == 202
        assert (await request_reset(stranger, "owner@example.com")).status_code == 202
        # The owner arrives: a notice, not a new account or password.
        body = {"email": "owner@example.com", "password": PASSWORD}
        assert (await client.post(USERS, json=body)).status_code == 202
        await MAILBOX.arrived("owner@example.com", 3)
        mailed = MAILBOX.to("owner@example.com")
        [notice] = [m for m in mailed if "#token=" not in m.get_content()]
        assert "reset your" in notice.get_content()
        strangers_links = [link_token(m) for m in mailed if m is not notice]

        await request_reset(client, "owner@example.com")
        assert (await reset(client, await link_to("owner@example.com", 4))).is_success
        for token in strangers_links:
            assert (
                await client.post(VERIFY, json={"token": token, "password": PASSWORD})
            ).status_code == 400
            assert (await reset(stranger, token)).status_code == 400
        owners_first = form("owner@example.com", PASSWORD)  # set nothing at sign-up
        assert (await stranger.post(TOKEN, data=owners_first)).status_code == 401
        refused = form("owner@example.com", a_password("strangers-s3cret"))
        assert (await stranger.post(TOKEN, data=refused)).status_code == 401
    owner = await client.post(TOKEN, data=form("owner@example.com", NEW_PASSWORD))
    assert owner.status_code == 200  # the reset proved the address


# The mail cap ---------------------------------------------------------------------


async def test_three_mails_per_kind_reach_an_address_and_no_more(
    client: httpx.AsyncClient, ann: LoggedIn, sign_up: SignUp
) -> None:
    cap = links.MAILS_PER_KIND
    new = {"email": "x@example.com", "password": PASSWORD}
    move = {"email": "moved@example.com", "current_password": PASSWORD}
    for path, method, body, headers in [
        (USERS, "POST", new, {}),
        (RESET, "POST", {"email": "ann@example.com"}, {}),
        (ME, "PATCH", move, ann.headers),  # a logged-in stranger's
    ]:
        answers = [
            answer(await client.request(method, path, json=body, headers=headers))
            for _ in range(2 * cap)
        ]
        assert answers == [answers[0]] * len(answers)  # the same answer each time
    await mail_settled(client, sign_up)
    # A sign-up's new account gets its link, then notices, up to the cap in all.
    assert len(MAILBOX.to("x@example.com")) == cap
    assert len(MAILBOX.to("ann@example.com")) == 1 + cap  # her own sign-up's link
    assert len(MAILBOX.to("moved@example.com")) == cap

    # A period after the last mail let through, one more may go.
    over = datetime.now(UTC) - settings.LOG_IN_PERIOD - timedelta(seconds=1)
    await LogInAttempts.objects.update(each=True, last_attempt_at=over)
    await request_reset(client, "ann@example.com")
    await MAILBOX.arrived("ann@example.com", 2 + cap)


# Sending --------------------------------------------------------------------------


async def test_links_start_with_public_url_whatever_the_host_header(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "PUBLIC_URL", "https://app.example.com")
    body = {"email": "ann@example.com", "password": PASSWORD}
    headers = {"Host": "evil.example", "X-Forwarded-Host": "evil.example"}
    assert (await client.post(USERS, json=body, headers=headers)).status_code == 202
    message = await MAILBOX.arrived("ann@example.com", 1)
    token = link_token(message)
    assert (
        f"https://app.example.com/verify-email#token={token}" in message.get_content()
    )
    assert "evil" not in message.as_string()
    assert len(token) == 43  # 256 random bits, URL-safe base64
    assert await Links.objects.filter(digest=token).count() == 0  # a digest is kept


async def test_without_smtp_url_each_message_is_written_whole_to_the_log(
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # (A real server's start-up warning: the slow tests at the end.)
    caplog.set_level(logging.WARNING, logger="accounts.mail")
    monkeypatch.setattr(settings, "SMTP_URL", "")
    body = {"email": "ann@example.com", "password": PASSWORD}
    assert (await client.post(USERS, json=body)).status_code == 202
    with anyio.fail_after(10):
        while "#token=" not in caplog.text:
            await anyio.sleep(0.01)
    assert "To: ann@example.com" in caplog.text
    assert "Subject: Confirm your email address" in caplog.text
    token = caplog.text.split("#token=")[1].split()[0]
    assert (
        await client.post(VERIFY, json={"token": token, "password": PASSWORD})
    ).status_code == 204
    assert MAILBOX.to("ann@example.com") == []


async def test_with_smtp_down_each_try_is_logged_at_once_and_the_mail_comes_later(
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    free_port: Callable[[], int],
) -> None:
    caplog.set_level(logging.INFO)
    working = settings.SMTP_URL
    monkeypatch.setattr(settings, "SMTP_URL", f"smtp://127.0.0.1:{free_port()}")
    monkeypatch.setattr(outbox, "FIRST_RETRY", 0.05)
    body = {"email": "ann@example.com", "password": PASSWORD}
    assert (await client.post(USERS, json=body)).status_code == 202
    assert (await client.get(HEALTH)).status_code == 200
    with anyio.fail_after(10):  # each try's failure, as it fails
        while caplog.text.count("not sent") < 3:
            await anyio.sleep(0.01)
    for tries, delay in [(1, 0.05), (2, 0.1), (3, 0.2)]:  # ever longer
        assert re.search(
            rf"Mail \d+ \(verify\) not sent, try {tries}, next in {delay} s",
            caplog.text,
        )
    assert "token" not in caplog.text

    monkeypatch.setattr(settings, "SMTP_URL", working)  # mail works again
    token = await link_to("ann@example.com")
    assert (
        await client.post(VERIFY, json={"token": token, "password": PASSWORD})
    ).status_code == 204
    assert (await client.post(TOKEN, data=form("ann@example.com"))).status_code == 200
    assert len(MAILBOX.to("ann@example.com")) == 1
    assert await Links.objects.count() == 0  # the failed tries' links went too


async def test_mail_is_tried_while_its_link_would_live_then_given_up(
    client: httpx.AsyncClient,
    sign_up: SignUp,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    free_port: Callable[[], int],
) -> None:
    await sign_up("ann@example.com")
    monkeypatch.setattr(settings, "SMTP_URL", f"smtp://127.0.0.1:{free_port()}")
    monkeypatch.setattr(outbox, "FIRST_RETRY", 0.05)
    monkeypatch.setattr(links, "RESET_LIFETIME", timedelta(seconds=0.5))
    assert (await request_reset(client, "ann@example.com")).status_code == 202
    with anyio.fail_after(10):  # then the row goes
        while "given up" not in caplog.text or await Mails.objects.count():
            await anyio.sleep(0.01)
    assert re.search(r"Mail \d+ \(reset\) not sent, try \d, given up", caplog.text)
    assert await Links.objects.count() == 0


class Flaky:
    """An SMTP handler that refuses its first message for now (451), as a busy
    server does, then takes them into MAILBOX."""

    def __init__(self) -> None:
        self.refused = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        if not self.refused:
            self.refused += 1
            return "451 Try again later"
        return await MAILBOX.handle_DATA(server, session, envelope)


def authenticator(logins: list[tuple[bytes, bytes]]) -> Callable[..., AuthResult]:
    def authenticate(
        server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        logins.append((data.login, data.password))
        return AuthResult(success=True)

    return authenticate


async def test_a_refused_send_is_retried_and_credentials_are_the_urls(
    client: httpx.AsyncClient,
    sign_up: SignUp,
    monkeypatch: pytest.MonkeyPatch,
    free_port: Callable[[], int],
) -> None:
    logins: list[tuple[bytes, bytes]] = []
    port = free_port()
    server = Controller(
        Flaky(),
        hostname="127.0.0.1",
        port=port,
        authenticator=authenticator(logins),
        auth_require_tls=False,  # a test server without a certificate
    )
    server.start()
    try:
        await sign_up("ann@example.com")
        monkeypatch.setattr(
            settings, "SMTP_URL", f"smtp://mailer:p%40ss@127.0.0.1:{port}"
        )
        monkeypatch.setattr(outbox, "FIRST_RETRY", 0.01)
        await request_reset(client, "ann@example.com")
        message: EmailMessage = await MAILBOX.arrived("ann@example.com", 2)
    finally:
        server.stop()
    assert message["Subject"] == "Reset your password"
    assert len(MAILBOX.to("ann@example.com")) == 2  # sent once
    assert logins and set(logins) == {(b"mailer", b"p@ss")}


@pytest.mark.parametrize(
    ("name", "value"),
    [("SMTP_URL", "http://mail.example.com"), ("PUBLIC_URL", "app.example.com")],
)
def test_a_setting_that_is_no_url_stops_the_app_at_start_up(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        imported_again("accounts/mail.py")


async def test_no_token_reaches_the_log_when_mail_is_sent(
    client: httpx.AsyncClient, sign_up: SignUp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await sign_up("ann@example.com")
    await request_reset(client, "ann@example.com")
    token = await link_to("ann@example.com", 2)
    assert (await reset(client, token)).status_code == 204
    assert caplog.records and token not in caplog.text


async def test_a_password_change_ends_the_links_still_in_the_outbox(
    client: httpx.AsyncClient,
    ann: LoggedIn,
    sign_up: SignUp,
    monkeypatch: pytest.MonkeyPatch,
    free_port: Callable[[], int],
) -> None:
    working = settings.SMTP_URL
    monkeypatch.setattr(settings, "SMTP_URL", f"smtp://127.0.0.1:{free_port()}")
    monkeypatch.setattr(outbox, "FIRST_RETRY", 0.05)
    change = {"email": "moved@example.com", "current_password": PASSWORD}
    assert (await client.patch(ME, json=change, headers=ann.headers)).status_code == 202
    assert (await request_reset(client, "ann@example.com")).status_code == 202
    change = {"password": NEW_PASSWORD, "current_password": PASSWORD}
    assert (await client.patch(ME, json=change, headers=ann.headers)).status_code == 200
    monkeypatch.setattr(settings, "SMTP_URL", working)
    notice = await MAILBOX.arrived("ann@example.com", 2)  # after her sign-up's link
    assert notice["Subject"] == "Your password was changed"
    await mail_settled(client, sign_up)
    assert len(MAILBOX.to("ann@example.com")) == 2
    assert MAILBOX.to("moved@example.com") == []


# Real servers ----------------------------------------------------------------------


async def log_match(server: Server, pattern: str) -> re.Match[str]:
    """The first match of `pattern` in the server's output, once it is there."""
    with anyio.fail_after(30):
        while not (found := re.search(pattern, server.log())):
            await anyio.sleep(0.05)
    return found


@pytest.mark.slow
async def test_without_smtp_url_the_server_writes_each_message_to_its_output(
    migrated_url: str, start_server: StartServer
) -> None:
    with start_server(migrated_url, *SERVE_OPTIONS, env={"SMTP_URL": ""}) as server:
        assert "SMTP_URL is not set: mail is written here, not sent" in server.log()
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            body = {"email": "ann@example.com", "password": PASSWORD}
            assert (await client.post(USERS, json=body)).status_code == 202
            # What a developer copies from the output of `pipenv run serve`.
            token = (await log_match(server, r"#token=([A-Za-z0-9_-]+)"))[1]
            assert (
                await client.post(VERIFY, json={"token": token, "password": PASSWORD})
            ).status_code == 204
            assert (await client.post(TOKEN, data=form("ann@example.com"))).is_success
    log = server.log()
    assert "To: ann@example.com\nSubject: Confirm your email address" in log
    assert f"{settings.PUBLIC_URL}/verify-email#token={token}" in log
    assert PASSWORD not in log and "Traceback" not in log


@pytest.mark.slow
async def test_with_smtp_down_a_server_answers_and_a_reset_brings_the_owner_in_later(
    migrated_url: str, start_server: StartServer, free_port: Callable[[], int]
) -> None:
    port = free_port()  # nothing listens there yet
    smtp_url = {"SMTP_URL": f"smtp://127.0.0.1:{port}"}
    with start_server(migrated_url, *SERVE_OPTIONS, env=smtp_url) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            body = {"email": "ann@example.com", "password": PASSWORD}
            assert (await client.post(USERS, json=body)).status_code == 202
            assert (await client.get(HEALTH)).status_code == 200
            refused = form("ann@example.com")
            assert (await client.post(TOKEN, data=refused)).status_code == 401

            smtp = Controller(MAILBOX, hostname="127.0.0.1", port=port)
            smtp.start()  # mail works again
            try:
                assert (await request_reset(client, "ann@example.com")).is_success
                with anyio.fail_after(30):
                    while not (
                        mailed := [
                            m
                            for m in MAILBOX.to("ann@example.com")
                            if m["Subject"] == "Reset your password"
                        ]
                    ):
                        await anyio.sleep(0.05)
            finally:
                smtp.stop()
            assert (await reset(client, link_token(mailed[0]))).status_code == 204
            new = form("ann@example.com", NEW_PASSWORD)
            assert (await client.post(TOKEN, data=new)).status_code == 200
    log = server.log()
    assert "#token=" not in log and "Traceback" not in log
    assert not re.search(r'HTTP/1\.1" 5\d\d', log)

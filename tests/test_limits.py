"""Limits a stranger cannot run past, and counts that end: sign-ups and reset requests
per client address, the counts each request adds deleted once their period is over,
and a reset (or a password change) that lets the owner in whatever guesses came
before it."""

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import anyio
import httpx
import pytest

import main
from accounts import passwords, throttle
from accounts.models import Devices, LogInAttempts
from core.settings import settings
from db import Users
from support import (
    MAILBOX,
    PASSWORD,
    ClientAt,
    LoggedIn,
    SignUp,
    a_password,
    link_token,
)

pytestmark = pytest.mark.anyio

url = main.app.url_path_for
USERS, TOKEN, ME = url("create_user"), url("log_in"), url("read_me")
RESET, CONFIRM = url("request_password_reset"), url("reset_password")
WRONG = a_password("wrong-password")
NEW_PASSWORD = a_password("a-new-s3cret")


def sign_up_body(i: int) -> dict[str, str]:
    return {"email": f"new{i}@example.com", "password": PASSWORD}


def reset_body(i: int) -> dict[str, str]:
    return {"email": f"someone{i}@example.com"}


# Each limited request: its path, its body (for an address of its own by number),
# the setting that limits it.
LIMITED: dict[str, tuple[str, Callable[[int], dict[str, str]], str]] = {
    "sign-up": (USERS, sign_up_body, "SIGN_UPS_AND_RESETS_PER_MINUTE"),
    "password reset": (RESET, reset_body, "SIGN_UPS_AND_RESETS_PER_MINUTE"),
}


@pytest.fixture(autouse=True)
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    """429s at once: these tests count them."""
    monkeypatch.setattr(throttle, "REFUSAL_PAUSE", 0)


def form(email: str, password: str = WRONG) -> dict[str, str]:
    return {"username": email, "password": password}


# Sign-ups and reset requests per client ----------------------------------------------


@pytest.mark.parametrize("kind", LIMITED)
async def test_past_its_limit_a_client_gets_429_unhashed_and_others_go_on(
    client: httpx.AsyncClient,
    client_at: ClientAt,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    path, body, setting = LIMITED[kind]
    limit = getattr(settings, setting)
    hashed: list[str] = []
    hash_password = passwords.hash_password

    def counted(password: str) -> str:
        hashed.append(password)
        return hash_password(password)

    monkeypatch.setattr(passwords, "hash_password", counted)
    statuses = [
        (await client.post(path, json=body(i))).status_code for i in range(limit)
    ]
    assert statuses == [202] * limit
    hashes = len(hashed)

    refused = await client.post(path, json=body(limit))
    assert refused.status_code == 429, refused.text
    assert "from your address" in refused.json()["detail"]
    assert 1 <= int(refused.headers["retry-after"]) <= throttle.CLIENT_PERIOD.seconds
    assert len(hashed) == hashes  # counted before any hashing: never queued
    # Another address, and the other kind of request, are not refused for it.
    async with client_at("192.0.2.30") as other:
        assert (await other.post(path, json=body(limit))).status_code == 202
    [other_kind] = set(LIMITED) - {kind}
    other_path, other_body, _ = LIMITED[other_kind]
    assert (await client.post(other_path, json=other_body(limit))).status_code == 202

    # A period after the last one let through, the client may again.
    ago = datetime.now(UTC) - throttle.CLIENT_PERIOD
    key = throttle.log_in_key(kind, "127.0.0.1")
    await LogInAttempts.objects.filter(digest=key).update(last_attempt_at=ago)
    assert (await client.post(path, json=body(limit + 1))).status_code == 202


async def test_resets_at_once_from_one_client_get_no_more_than_its_limit_through(
    client: httpx.AsyncClient,
) -> None:
    # Read-then-write counting would let most of them through.
    path, body, _ = LIMITED["password reset"]
    limit = settings.SIGN_UPS_AND_RESETS_PER_MINUTE

    async def send(i: int, statuses: list[int]) -> None:
        statuses.append((await client.post(path, json=body(i))).status_code)

    for round in range(3):
        await LogInAttempts.objects.delete(each=True)
        statuses: list[int] = []
        async with anyio.create_task_group() as tasks:
            for i in range(3 * limit):
                tasks.start_soon(send, i, statuses)
        assert sorted(statuses) == [202] * limit + [429] * 2 * limit, f"round {round}"


# Counts deleted where counts are added -------------------------------------------------


async def add_a_count(client: httpx.AsyncClient, kind: str) -> None:
    """One request that adds a count of `kind`."""
    if kind == "log-in":
        response = await client.post(TOKEN, data=form("nobody@example.com"))
    else:
        path, body, _ = LIMITED[kind]
        response = await client.post(path, json=body(0))
    assert response.status_code in (202, 401), response.text


@pytest.mark.parametrize("kind", ["log-in", *LIMITED])
@pytest.mark.parametrize(
    ("log_in_minutes", "client_minutes"), [(15, 1), (0.5, 1)], ids=["longer", "shorter"]
)
async def test_a_count_added_deletes_every_count_over_and_no_count_still_on(
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    log_in_minutes: float,
    client_minutes: float,
) -> None:
    # Counts of both periods share the table (log-ins and mail caps: LOG_IN_PERIOD;
    # sign-ups and resets per client: CLIENT_PERIOD), whichever is the longer.
    periods = timedelta(minutes=log_in_minutes), timedelta(minutes=client_minutes)
    monkeypatch.setattr(settings, "LOG_IN_PERIOD_MINUTES", log_in_minutes)
    monkeypatch.setattr(throttle, "CLIENT_PERIOD", periods[1])
    now = datetime.now(UTC)
    second = timedelta(seconds=1)
    over, maybe_on = "0" * 64, "1" * 64  # digests no key has
    # Over, whatever its period; and over only if its period is the shorter.
    await LogInAttempts.objects.create(
        digest=over, attempts=1, last_attempt_at=now - max(periods) - second
    )
    await LogInAttempts.objects.create(
        digest=maybe_on, attempts=1, last_attempt_at=now - min(periods) - second
    )

    await add_a_count(client, kind)
    counts = {row.digest for row in await LogInAttempts.objects.all()}
    assert over not in counts
    assert maybe_on in counts


async def test_a_log_in_count_outlives_the_sign_ups_that_prune_the_table(
    client: httpx.AsyncClient, sign_up: SignUp
) -> None:
    await sign_up("ann@example.com")
    for _ in range(settings.LOG_IN_ATTEMPTS):
        await client.post(TOKEN, data=form("ann@example.com"))
    # Past a client period, not past a log-in period: still a count.
    ago = datetime.now(UTC) - min(throttle.CLIENT_PERIOD, settings.LOG_IN_PERIOD)
    await LogInAttempts.objects.update(each=True, last_attempt_at=ago)
    await add_a_count(client, "sign-up")
    right = form("ann@example.com", PASSWORD)
    assert (await client.post(TOKEN, data=right)).status_code == 429


# A reset lets its owner in at once ---------------------------------------------------


async def reset_from(browser: httpx.AsyncClient, email: str) -> httpx.Response:
    """Ask for a reset link, and set NEW_PASSWORD with it, from `browser`."""
    mailed = len(MAILBOX.to(email))
    assert (await browser.post(RESET, json={"email": email})).status_code == 202
    token = link_token(await MAILBOX.arrived(email, mailed + 1))
    return await browser.post(CONFIRM, json={"token": token, "password": NEW_PASSWORD})


async def test_a_reset_during_a_guessing_flood_lets_the_owner_in_at_once(
    client: httpx.AsyncClient, ann: LoggedIn, client_at: ClientAt
) -> None:
    # `client` is ann's browser: the `ann` fixture logged in with it. Guessers use
    # every address's allowance until the account's is gone.
    per_address = settings.LOG_IN_ATTEMPTS
    addresses = settings.LOG_IN_ATTEMPTS_PER_ACCOUNT // per_address
    statuses = []
    for a in range(addresses):
        async with client_at(f"198.51.100.{a}") as guesser:
            for _ in range(per_address):
                response = await guesser.post(TOKEN, data=form("ann@example.com"))
                statuses.append(response.status_code)
    assert statuses == [401] * (addresses * per_address)
    async with client_at("203.0.113.1") as fresh:
        right = form("ann@example.com", PASSWORD)
        assert (await fresh.post(TOKEN, data=right)).status_code == 429

    assert (await reset_from(client, "ann@example.com")).status_code == 204
    new = form("ann@example.com", NEW_PASSWORD)
    assert (await client.post(TOKEN, data=new)).status_code == 200
    for address in ("203.0.113.2", "198.51.100.0"):  # fresh, and a guesser's
        async with client_at(address) as elsewhere:
            assert (await elsewhere.post(TOKEN, data=new)).status_code == 200, address


async def test_a_password_change_ends_the_counts_of_guesses_at_the_old_one(
    client: httpx.AsyncClient,
    ann: LoggedIn,
    client_at: ClientAt,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One address's guesses use the account's allowance too.
    monkeypatch.setattr(
        settings, "LOG_IN_ATTEMPTS_PER_ACCOUNT", settings.LOG_IN_ATTEMPTS
    )
    async with client_at("198.51.100.1") as guesser:
        for _ in range(settings.LOG_IN_ATTEMPTS):
            await guesser.post(TOKEN, data=form("ann@example.com"))
        right = form("ann@example.com", PASSWORD)
        assert (await guesser.post(TOKEN, data=right)).status_code == 429

    change = {"password": NEW_PASSWORD, "current_password": PASSWORD}
    assert (await client.patch(ME, json=change, headers=ann.headers)).status_code == 200
    new = form("ann@example.com", NEW_PASSWORD)
    for address in ("198.51.100.1", "203.0.113.3"):
        async with client_at(address) as elsewhere:
            assert (await elsewhere.post(TOKEN, data=new)).status_code == 200, address


async def test_the_browser_that_confirms_a_reset_logs_in_as_the_accounts_device(
    client: httpx.AsyncClient,
    sign_up: SignUp,
    client_at: ClientAt,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settings, "LOG_IN_ATTEMPTS_PER_ACCOUNT", 3)  # fewer guesses
    ann = await sign_up("ann@example.com")
    async with client_at("192.0.2.40") as browser:  # never logged in to it
        response = await reset_from(browser, "ann@example.com")
        assert response.status_code == 204
        cookie = response.cookies["device"]
        assert "HttpOnly" in response.headers["set-cookie"]
        [device] = await Devices.objects.all()
        assert device.digest == throttle.device_digest(cookie, ann["id"])

        # Guesses from everywhere use the account's allowance for clients without
        # a device: the browser still logs in.
        for i in range(settings.LOG_IN_ATTEMPTS_PER_ACCOUNT):
            async with client_at(f"198.51.100.{i}") as guesser:
                await guesser.post(TOKEN, data=form("ann@example.com"))
        new = form("ann@example.com", NEW_PASSWORD)
        async with client_at("203.0.113.4") as newcomer:
            assert (await newcomer.post(TOKEN, data=new)).status_code == 429
        response = await browser.post(TOKEN, data=new)
        assert response.status_code == 200
        assert "set-cookie" not in response.headers  # the cookie it has
    assert (await Users.objects.get(id=ann["id"])).is_verified

"""Log-in, log-out and bearer tokens, through the real app on a migrated database."""

import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

import main
from accounts import passwords, sessions
from accounts.models import Tokens
from core.settings import settings
from db import Users
from support import (
    PASSWORD,
    PROJECT_DIR,
    LoggedIn,
    LogIn,
    SignUp,
    a_password,
    imported_again,
)

pytestmark = pytest.mark.anyio

TOKEN = main.app.url_path_for("log_in")
ME = main.app.url_path_for("read_me")
USERS = main.app.url_path_for("create_user")
NOT_AUTHENTICATED = {"detail": "Not authenticated"}


def form(email: str, password: str = PASSWORD) -> dict[str, str]:
    return {"username": email, "password": password}


def bearer(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


async def test_log_in_answers_a_bearer_token_kept_only_as_a_digest(
    client: httpx.AsyncClient, sign_up: SignUp
) -> None:
    user = await sign_up("ann@example.com")
    response = await client.post(TOKEN, data=form("Ann@Example.com"))
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body == {"access_token": body["access_token"], "token_type": "bearer"}

    [stored] = await Tokens.objects.filter(user=user["id"]).all()
    assert stored.digest == hashlib.sha256(body["access_token"].encode()).hexdigest()
    assert body["access_token"] not in str(await Tokens.objects.values())
    headers = {"Authorization": f"Bearer {body['access_token']}"}
    assert (await client.get(ME, headers=headers)).json() == user


async def test_unknown_email_wrong_password_and_inactive_get_one_401(
    client: httpx.AsyncClient, sign_up: SignUp
) -> None:
    ann = await sign_up("ann@example.com")
    await sign_up("off@example.com")
    await Users.objects.filter(email="off@example.com").update(is_active=False)

    answers = [
        await client.post(TOKEN, data=form("nobody@example.com")),
        await client.post(TOKEN, data=form("ann\x00@example.com")),  # found by fuzzing
        await client.post(
            TOKEN, data=form("ann@example.com", a_password("wrong-password"))
        ),
        await client.post(TOKEN, data=form("off@example.com")),
    ]
    for response in answers:
        assert response.status_code == 401
        assert response.json() == NOT_AUTHENTICATED
        assert response.headers["www-authenticate"] == "Bearer"
    assert await Tokens.objects.count() == 0
    assert (await Users.objects.get(id=ann["id"])).is_active


# Text that UTF-8 cannot encode: a lone surrogate, as some codecs decode bytes to.
LONE_SURROGATE = "\ud800aaaaaaaa"


def multipart(charset: str, **fields: str) -> dict[str, Any]:
    """A multipart/form-data body, its fields encoded with `charset`, which the
    Content-Type names."""
    content = b"".join(
        b'--b\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
        % (name.encode(), value.encode(charset))
        for name, value in fields.items()
    )
    content_type = f"multipart/form-data; charset={charset}; boundary=b"
    return {
        "content": content + b"--b--\r\n",
        "headers": {"content-type": content_type},
    }


@pytest.mark.parametrize("charset", ["unicode_escape", "utf-7"])
async def test_a_password_utf8_cannot_encode_is_a_wrong_password_at_log_in(
    client: httpx.AsyncClient,
    sign_up: SignUp,
    monkeypatch: pytest.MonkeyPatch,
    charset: str,
) -> None:
    # Starlette decodes a multipart field with the codec its charset names: these
    # two make a lone surrogate of it (argon2 could not encode that: a 500).
    assert LONE_SURROGATE.encode(charset).decode(charset) == LONE_SURROGATE
    await sign_up("ann@example.com")
    checked: list[str] = []
    verify_password = passwords.verify_password

    def spy(password: str, stored_hash: str) -> tuple[bool, str | None]:
        checked.append(password)
        return verify_password(password, stored_hash)

    monkeypatch.setattr(passwords, "verify_password", spy)
    odd_email = f"ann{LONE_SURROGATE}@example.com"
    answers = [
        await client.post(TOKEN, **multipart(charset, **form(email, password)))
        for email, password in [
            ("ann@example.com", LONE_SURROGATE),
            (odd_email, LONE_SURROGATE),
            ("ann@example.com", PASSWORD),  # the same codec, a right password
        ]
    ]
    assert [response.status_code for response in answers] == [401, 401, 200]
    assert answers[0].json() == answers[1].json() == NOT_AUTHENTICATED
    assert checked == [LONE_SURROGATE, LONE_SURROGATE, PASSWORD]


async def test_a_password_utf8_cannot_encode_is_a_422_in_json(
    client: httpx.AsyncClient, ann: LoggedIn
) -> None:
    # JSON's "\ud800" escape is a lone surrogate too (httpx would not send it raw).
    bodies = [
        ("POST", USERS, {"email": "bob@example.com", "password": LONE_SURROGATE}),
        ("PATCH", ME, {"password": LONE_SURROGATE, "current_password": PASSWORD}),
        ("PATCH", ME, {"email": "bob@example.com", "current_password": LONE_SURROGATE}),
        ("DELETE", ME, {"current_password": LONE_SURROGATE}),
    ]
    for method, path, body in bodies:
        response = await client.request(
            method,
            path,
            content=json.dumps(body),
            headers={"content-type": "application/json", **ann.headers},
        )
        assert response.status_code == 422, (body, response.text)
        [error] = response.json()["detail"]
        assert error["loc"][-1] in {"password", "current_password"}
    assert (await client.get(ME, headers=ann.headers)).json() == ann.user
    assert (await client.post(TOKEN, data=form("ann@example.com"))).status_code == 200


def test_any_text_hashes_and_other_text_as_utf_8() -> None:
    hashed = passwords.hash_password(LONE_SURROGATE)
    assert passwords.verify_password(LONE_SURROGATE, hashed) == (True, None)
    assert not passwords.verify_password("\ud801aaaaaaaa", hashed)[0]
    # Hashes made from text before (argon2 encodes it as UTF-8) still verify.
    made_before = passwords.password_hash.hash("pässwört-€-𝄞")
    assert passwords.verify_password("pässwört-€-𝄞", made_before) == (True, None)


@pytest.mark.real_hashing
async def test_an_unknown_email_costs_a_real_password_check(
    client: httpx.AsyncClient, sign_up: SignUp, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Timing without a clock: the dummy hash is what gets verified, and it is a real
    # hash of the current parameters (a malformed one would return at once).
    await sign_up("ann@example.com")
    checked: list[str] = []
    verify_and_update = passwords.password_hash.verify_and_update

    def spy(password: bytes, stored_hash: str) -> tuple[bool, str | None]:
        checked.append(stored_hash)
        return verify_and_update(password, stored_hash)

    monkeypatch.setattr(passwords.password_hash, "verify_and_update", spy)
    await client.post(TOKEN, data=form("nobody@example.com"))
    await client.post(TOKEN, data=form("ann@example.com", a_password("wrong-password")))

    stored = (await Users.objects.get(email="ann@example.com")).password
    assert checked == [passwords.DUMMY_HASH, stored]
    hasher = passwords.password_hash.current_hasher
    assert hasher.identify(passwords.DUMMY_HASH)
    assert not hasher.check_needs_rehash(passwords.DUMMY_HASH)
    assert (
        passwords.DUMMY_HASH.split("$")[:4] == stored.split("$")[:4]
    )  # same parameters


@pytest.mark.real_hashing
async def test_log_in_upgrades_a_hash_made_with_older_parameters(
    client: httpx.AsyncClient, ann: LoggedIn, log_in: LogIn
) -> None:
    user = ann.user
    weak = PasswordHash([Argon2Hasher(time_cost=1, memory_cost=8192)]).hash(PASSWORD)
    await Users.objects.filter(id=user["id"]).update(password=weak)

    await log_in("ann@example.com")

    stored = (await Users.objects.get(id=user["id"])).password
    assert stored != weak
    assert not passwords.password_hash.current_hasher.check_needs_rehash(stored)
    assert passwords.password_hash.verify(PASSWORD, stored)


async def test_every_bad_token_gets_the_same_401(
    client: httpx.AsyncClient, ann: LoggedIn, log_in: LogIn
) -> None:
    expired = bearer(ann.headers)
    await Tokens.objects.filter(digest=sessions.token_digest(expired)).update(
        expires_at=datetime.now(UTC) - timedelta(seconds=1)
    )
    revoked = await log_in("ann@example.com")
    assert (await client.delete(TOKEN, headers=revoked)).status_code == 204

    for authorization in [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic YW5uOnBhc3M=",
        "Bearer not-a-token",
        "Bearer " + "x" * 4000,
        f"Bearer {expired}",
        revoked["Authorization"],
    ]:
        headers = {} if authorization is None else {"Authorization": authorization}
        for method, url in [("GET", ME), ("PATCH", ME), ("DELETE", TOKEN)]:
            response = await client.request(method, url, headers=headers)
            assert response.status_code == 401, (authorization, url)
            assert response.json() == NOT_AUTHENTICATED
            assert response.headers["www-authenticate"] == "Bearer"


async def test_log_out_ends_only_the_presented_token(
    client: httpx.AsyncClient, ann: LoggedIn, log_in: LogIn
) -> None:
    phone = ann.headers
    laptop = await log_in("ann@example.com")

    response = await client.delete(TOKEN, headers=phone)
    assert response.status_code == 204
    assert (await client.get(ME, headers=phone)).status_code == 401
    assert (await client.get(ME, headers=laptop)).status_code == 200


async def test_an_inactive_accounts_tokens_stop_working(
    client: httpx.AsyncClient, ann: LoggedIn
) -> None:
    await Users.objects.filter(id=ann.user["id"]).update(is_active=False)
    assert (await client.get(ME, headers=ann.headers)).status_code == 401

    await Users.objects.filter(id=ann.user["id"]).update(is_active=True)
    assert (await client.get(ME, headers=ann.headers)).status_code == 200


async def test_log_in_deletes_every_accounts_expired_tokens(
    sign_up: SignUp, log_in: LogIn
) -> None:
    ann = await sign_up("ann@example.com")
    bob = await sign_up("bob@example.com")
    for user in (ann, bob):
        await log_in(user["email"])
    await Tokens.objects.update(each=True, expires_at=datetime.now(UTC))

    await log_in("ann@example.com")

    # Bob may never log in again: his expired session goes too.
    assert await Tokens.objects.filter(user=ann["id"]).count() == 1
    assert await Tokens.objects.filter(user=bob["id"]).count() == 0


async def test_tokens_expire_after_the_configured_lifetime(
    sign_up: SignUp, log_in: LogIn
) -> None:
    await sign_up("ann@example.com")
    before = datetime.now(UTC)
    await log_in("ann@example.com")
    [token] = await Tokens.objects.all()
    lifetime = token.expires_at - token.created_at
    assert lifetime == settings.TOKEN_LIFETIME == timedelta(hours=24)
    assert token.created_at.replace(tzinfo=UTC) >= before - timedelta(seconds=1)


@pytest.mark.real_hashing
async def test_past_the_queue_bound_sign_up_and_log_in_answer_503_at_once(
    client: httpx.AsyncClient,
    ann: LoggedIn,
    monkeypatch: pytest.MonkeyPatch,
    hashing_threads_busy: Callable[[], None],
) -> None:
    headers = ann.headers
    monkeypatch.setattr(settings, "PASSWORD_HASHING_QUEUE", 2)
    limiter = passwords.hashing_limiter

    statuses: list[int] = []

    async def create(email: str) -> None:
        body = {"email": email, "password": PASSWORD}
        statuses.append((await client.post(USERS, json=body)).status_code)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(create, "queued1@example.com")
        tasks.start_soon(create, "queued2@example.com")
        while limiter.statistics().tasks_waiting < 2:
            await anyio.sleep(0.01)

        with anyio.fail_after(5):  # answered without waiting for a thread
            for response in [
                await client.post(
                    USERS, json={"email": "x@example.com", "password": PASSWORD}
                ),
                await client.post(TOKEN, data=form("ann@example.com")),
            ]:
                assert response.status_code == 503
                assert response.headers["retry-after"] == "1"
                assert "detail" in response.json()
            assert (await client.get(ME, headers=headers)).status_code == 200
        hashing_threads_busy()  # the queued sign-ups go on

    assert statuses == [202, 202]
    assert await Users.objects.filter(email="x@example.com").count() == 0


def run_main(cpus: set[int], code: str, **env: str) -> "subprocess.Popen[str]":
    """Run `code` after importing main in a process pinned to `cpus`."""
    code = f"import os; os.sched_setaffinity(0, {cpus}); from accounts import passwords; {code}"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=PROJECT_DIR,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        text=True,
    )


def printed(process: "subprocess.Popen[str]") -> list[int]:
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    return [int(line) for line in stdout.split()]


@pytest.mark.slow
def test_hashing_threads_follow_the_cpus_the_process_may_use() -> None:
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        pytest.skip("needs two CPUs to tell one from the other")
    one, two = set(available[:1]), set(available[:2])
    # Two processes at once, not one per figure: each spends ~0.7 s importing main.
    default = run_main(
        two,
        "print(passwords.HASHING_THREADS, passwords.usable_cpus());"
        f" os.sched_setaffinity(0, {one}); print(passwords.usable_cpus())",
    )
    overridden = run_main(
        two, "print(passwords.HASHING_THREADS)", PASSWORD_HASHING_THREADS="4"
    )
    # One core stays with the event loop; a setting overrides the count.
    assert printed(default) == [1, 2, 1]
    assert printed(overridden) == [4]


def test_hashing_threads_follow_the_cpus_in_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        pytest.skip("needs two CPUs to tell one from the other")
    monkeypatch.delenv("PASSWORD_HASHING_THREADS", raising=False)
    # This thread's CPUs, which is what accounts/passwords.py reads; no thread starts meanwhile.
    try:
        os.sched_setaffinity(0, available[:2])
        again = imported_again("accounts/passwords.py")
        assert again.HASHING_THREADS == 1  # a core for the loop
        os.sched_setaffinity(0, available[:1])
        assert passwords.usable_cpus() == 1
    finally:
        os.sched_setaffinity(0, available)
    monkeypatch.setenv("PASSWORD_HASHING_THREADS", "4")
    assert imported_again("accounts/passwords.py").HASHING_THREADS == 4


async def test_no_password_in_any_log_line(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = a_password("never-log-this-s3cret")
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", USERS, {"json": {"email": "ann@example.com", "password": secret}}),
        ("POST", USERS, {"json": {"email": "ann@example.com", "password": secret}}),
        ("POST", USERS, {"json": {"email": "bad", "password": secret}}),
        ("POST", USERS, {"content": f'{{"email": NaN, "password": "{secret}"}}'}),
        ("POST", TOKEN, {"data": form("ann@example.com", secret)}),
        ("POST", TOKEN, {"data": form("nobody@example.com", secret)}),
    ]
    for method, url, options in requests:
        response = await client.request(method, url, **options)
        assert secret not in response.text
    assert caplog.records  # the app's and the libraries' loggers were captured
    assert secret not in caplog.text

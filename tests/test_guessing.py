"""Password guessing through real servers: `current_password` counted like a log-in,
X-Forwarded-For believed from TRUSTED_PROXIES only, one bound per account across
addresses and workers with the owner's device let through, common passwords refused,
CORS_ORIGINS checked at start-up, the device cookie as a browser receives it, and a
log-in CSRF in headless Chromium that leaves the owner's device cookie as it was.

Every server is uvicorn with the options the README gives, serving main.app with cheap
hashing (tests/cheap_server.py: the counts are the subject here, not argon2's cost);
clients send from other loopback addresses, which uvicorn reports as other clients.
"""

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import pytest
from harness import copy_of, running_server
from selenium import webdriver
from selenium.webdriver.support.ui import WebDriverWait
from test_docs_page import headless_chromium
from test_throttle import SERVE_OPTIONS

import main
from support import (
    PASSWORD,
    PROJECT_DIR,
    Server,
    a_password,
    common_passwords,
    faults,
    log_in_on,
    server_client_at,
    sign_up_on,
    sign_up_with,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TOKEN = main.app.url_path_for("log_in")
ME = main.app.url_path_for("read_me")
WRONG = a_password("wrong-password")
# Passwords refused as common (zxcvbn's list), within the length bounds.
COMMON = common_passwords(2)
TIMEOUT = 60  # seconds per request: a safety net on a busy machine, never a measure
# The module's server runs with these: a valid setting starts (see the last tests).
FRONT_ENDS = "https://app.example.com,https://admin.example.com:8443"
COMMON_PASSWORD = {
    "type": "common_password",
    "loc": ["body", "password"],
    "msg": "This password is one of the most common; choose another",
}


# main.app with cheap hashing, run with the README's options.
CHEAP, CHEAP_APP = (*SERVE_OPTIONS, "--app-dir", "tests"), "cheap_server:app"


def form(email: str, password: str = WRONG) -> dict[str, str]:
    return {"username": email, "password": password}


def client_at(url: str, address: str, **options: Any) -> httpx.AsyncClient:
    return server_client_at(url, address, timeout=TIMEOUT, **options)


async def log_ins(
    client: httpx.AsyncClient,
    email: str,
    forwarded: Sequence[str | None],
    password: str = WRONG,
) -> list[int]:
    """One log-in after another, each with its X-Forwarded-For (None: none): statuses."""
    statuses = []
    for value in forwarded:
        headers = {} if value is None else {"X-Forwarded-For": value}
        response = await client.post(TOKEN, data=form(email, password), headers=headers)
        statuses.append(response.status_code)
    return statuses


def assert_refused(response: httpx.Response) -> None:
    """A 429 that tells the client when to come back."""
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1


def serve(
    template_url: str, tmp_path_factory: pytest.TempPathFactory, name: str, **env: str
) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp(name)
    with (
        copy_of(template_url, directory, name) as database_url,
        running_server(
            database_url, directory / "server.log", *CHEAP, env=env, app=CHEAP_APP
        ) as server,
    ):
        yield server
    assert "Traceback" not in server.log(), faults(server.log())


@pytest.fixture(scope="module")
def server(
    template_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One server for the tests marked `on_the_server`, each with accounts and
    addresses of its own. Its tests share one worker (xdist_group)."""
    yield from serve(
        template_url, tmp_path_factory, "guessing", CORS_ORIGINS=FRONT_ENDS
    )


@pytest.fixture(scope="module")
def proxied(
    template_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server behind a proxy at 127.0.0.2, for the tests marked `behind_a_proxy`."""
    yield from serve(
        template_url, tmp_path_factory, "guessing_proxy", TRUSTED_PROXIES="127.0.0.2"
    )


on_the_server = pytest.mark.xdist_group("guessing_server")
behind_a_proxy = pytest.mark.xdist_group("guessing_proxy")


# current_password --------------------------------------------------------------------


@on_the_server
async def test_current_password_guesses_with_a_stolen_token_are_throttled(
    server: Server,
) -> None:
    email = "ann@example.com"
    async with client_at(server.url, "127.0.0.10") as owner:
        await sign_up_on(owner, email)
        stolen = await log_in_on(owner, email)

    async with client_at(server.url, "127.0.0.11", headers=stolen) as thief:

        async def change(guess: str) -> httpx.Response:
            body = {"email": email, "current_password": guess}
            return await thief.patch(ME, json=body)

        async def delete(guess: str) -> httpx.Response:
            return await thief.request("DELETE", ME, json={"current_password": guess})

        answers = [
            await (change, delete)[i % 2](a_password(f"guess-number-{i}"))
            for i in range(10)
        ]
        assert [answer.status_code for answer in answers] == [403] * 10
        assert answers[0].json() == {"detail": "Wrong current password"}
        assert_refused(await change("guess-number-10"))

        # Past the allowance, whatever comes from this address for this account: the
        # other route, the right password, a log-in (the same allowance). Together,
        # so that their pauses overlap.
        for refused in await asyncio.gather(
            delete("guess-number-11"),
            change(PASSWORD),
            thief.post(TOKEN, data=form(email, PASSWORD)),
        ):
            assert_refused(refused)
        assert (await thief.get(ME)).json()["email"] == email  # nothing changed

    async with client_at(server.url, "127.0.0.12") as elsewhere:  # no device cookie
        assert await log_ins(elsewhere, email, [None], PASSWORD) == [200]


# X-Forwarded-For -----------------------------------------------------------------------


@on_the_server
async def test_a_made_up_x_forwarded_for_is_ignored_by_default(server: Server) -> None:
    made_up = [
        "10.0.0.1",
        "anything-1",
        "2001:db8::1",
        "10.0.0.2, 10.0.0.3",
        "::ffff:10.0.0.4",
        "anything-2",
        "192.0.2.5",
        "127.0.0.1",
        "2001:db8:ffff::1",
        "unknown",
        "10.0.0.6, 127.0.0.2",
        "198.51.100.7",
    ]
    async with client_at(server.url, "127.0.0.2") as client:
        await sign_up_on(client, "bob@example.com")
        statuses = await log_ins(client, "bob@example.com", made_up[:10])
        # The last two together, so that their pauses overlap.
        last = await asyncio.gather(
            *(log_ins(client, "bob@example.com", [value]) for value in made_up[10:])
        )
    assert statuses == [401] * 10
    assert last == [[429], [429]]


@behind_a_proxy
async def test_a_trusted_proxy_s_forwarded_addresses_are_counted_each(
    proxied: Server,
) -> None:
    async with (
        client_at(proxied.url, "127.0.0.2") as proxy,
        client_at(proxied.url, "127.0.0.3") as elsewhere,  # no proxy
    ):
        for email in ("gil@example.com", "hal@example.com"):
            await sign_up_on(proxy, email)
        # The proxy appends the address it saw to what the client sent, if anything:
        # only the last hop is believed.
        one_client = [
            f"198.51.100.{i}, 10.0.0.1" if i % 2 else "10.0.0.1" for i in range(11)
        ]
        made_up = [f"10.0.1.{i}" for i in range(11)]
        through_the_proxy, not_through_it = await asyncio.gather(
            log_ins(proxy, "gil@example.com", one_client),
            log_ins(elsewhere, "hal@example.com", made_up),  # counted as 127.0.0.3
        )
        assert through_the_proxy == [401] * 10 + [429]
        assert not_through_it == [401] * 10 + [429]

        others = await asyncio.gather(
            log_ins(proxy, "gil@example.com", ["10.0.0.2"]),  # another client
            # The addresses 127.0.0.3 named were not charged, and naming a refused
            # one from there is no refusal either: that is 127.0.0.3's own count.
            log_ins(proxy, "hal@example.com", ["10.0.1.0"]),
            log_ins(elsewhere, "gil@example.com", ["10.0.0.1"]),
        )
    assert list(others) == [[401]] * 3


@behind_a_proxy
async def test_through_the_proxy_a_v6_64_mapped_v4_and_unparsable_are_one_each(
    proxied: Server,
) -> None:
    accounts = ("ida@example.com", "jo@example.com", "kim@example.com")
    one_64 = [
        f"2001:db8:1:2::{i + 1:x}" if i % 2 else f"2001:db8:1:2:{i:x}:ffff:0:{i:x}"
        for i in range(11)
    ]
    mapped = ["::ffff:10.0.0.9" if i % 2 else "10.0.0.9" for i in range(11)]
    unparsable = [f"junk-{i}" for i in range(11)]
    async with client_at(proxied.url, "127.0.0.2") as proxy:
        for email in accounts:
            await sign_up_on(proxy, email)
        statuses = await asyncio.gather(
            *(
                log_ins(proxy, email, forwarded)
                for email, forwarded in zip(
                    accounts, (one_64, mapped, unparsable), strict=True
                )
            )
        )
        assert list(statuses) == [[401] * 10 + [429]] * 3
        assert await log_ins(proxy, accounts[0], ["2001:db8:1:3::1"]) == [401]


# One bound per account ---------------------------------------------------------------


async def test_many_addresses_share_one_bound_per_account_the_owner_s_device_not(
    migrated_url: str, tmp_path: Path
) -> None:
    email = "lee@example.com"
    log = tmp_path / "server.log"
    options = (*CHEAP, "--workers", "2")
    with running_server(migrated_url, log, *options, app=CHEAP_APP) as server:
        deadline = time.monotonic() + TIMEOUT
        while server.log().count("Application startup complete") < 2:  # both workers
            assert time.monotonic() < deadline, server.log()
            await anyio.sleep(0.1)
        # The owner's client keeps its cookies, from before the attack.
        async with client_at(server.url, "127.0.1.1") as owner:
            await sign_up_on(owner, email)
            await log_in_on(owner, email)
            assert "device" in owner.cookies
            statuses: list[int] = []
            at_once = anyio.Semaphore(8)  # within the queue and each address's share

            async def guess(address: str) -> None:
                async with at_once, client_at(server.url, address) as client:
                    # A connection of its own, so that both workers take some.
                    response = await client.post(TOKEN, data=form(email))
                    statuses.append(response.status_code)

            async with anyio.create_task_group() as tasks:
                for _ in range(2):
                    for i in range(1, 61):
                        tasks.start_soon(guess, f"127.0.1.{i}")

            # From 127.0.1.1, one of the attack's: the device gets in, not the address.
            assert await log_ins(owner, email, [None], PASSWORD) == [200]
        async with client_at(server.url, "127.0.2.1") as stranger:
            assert_refused(await stranger.post(TOKEN, data=form(email, PASSWORD)))
    # (The owner's own log-in before was no guess: it is not one of the 100.)
    assert sorted(statuses) == [401] * 100 + [429] * 20
    assert "Traceback" not in server.log(), faults(server.log())


# Common passwords --------------------------------------------------------------------


@on_the_server
async def test_common_passwords_are_refused_without_quoting_and_not_stored(
    server: Server,
) -> None:
    email = "cay@example.com"
    async with client_at(server.url, "127.0.0.20") as client:
        for common in (*COMMON, COMMON[0].upper()):
            body = {"email": email, "password": common}
            response = await client.post("/users", json=body)
            assert response.status_code == 422
            # A fixed message (that quotes "password" as a word and the field's name).
            assert response.json() == {"detail": [COMMON_PASSWORD]}
            assert common not in response.text or common in str(COMMON_PASSWORD)
        await sign_up_on(client, email)  # the email is still free
        headers = await log_in_on(client, email)

        body = {"password": COMMON[1], "current_password": PASSWORD}
        response = await client.patch(ME, json=body, headers=headers)
        assert response.status_code == 422
        assert response.json() == {"detail": [COMMON_PASSWORD]}
        assert COMMON[1] not in response.text
        assert await log_ins(client, email, [None], COMMON[1]) == [401]
        assert await log_ins(client, email, [None], PASSWORD) == [200]


# What a browser sees -----------------------------------------------------------------


@on_the_server
async def test_the_device_cookie_is_httponly_samesite_strict_and_not_secure_on_http(
    server: Server,
) -> None:
    async with client_at(server.url, "127.0.0.21") as browser:
        await sign_up_on(browser, "dee@example.com")
        response = await browser.post(TOKEN, data=form("dee@example.com", PASSWORD))
        assert response.status_code == 200
        [set_cookie] = response.headers.get_list("set-cookie")
        cookie, *attributes = (part.strip() for part in set_cookie.split(";"))
        name, _, value = cookie.partition("=")
        assert (name, len(value) >= 32) == ("device", True)
        parsed = {}
        for attribute in attributes:
            key, _, setting = attribute.partition("=")
            parsed[key.lower()] = setting
        assert "httponly" in parsed
        assert parsed["samesite"].lower() == "strict"
        assert int(parsed["max-age"]) > 0
        assert parsed["path"] == "/"
        assert "secure" not in parsed, set_cookie  # plain http: it would not be kept

        # The client sends it back, and the device is known: no new cookie.
        again = await browser.post(TOKEN, data=form("dee@example.com", PASSWORD))
        assert again.status_code == 200
        assert "set-cookie" not in again.headers


@pytest.fixture
def chromium() -> Iterator[webdriver.Chrome]:
    with headless_chromium() as driver:
        yield driver


def device_cookies(browser: webdriver.Chrome) -> list[str]:
    """The values of the device cookies the browser keeps for its page's site."""
    return [c["value"] for c in browser.get_cookies() if c["name"] == "device"]


@on_the_server
def test_a_log_in_csrf_in_a_browser_leaves_it_the_owner_s_device_cookie(
    server: Server, chromium: webdriver.Chrome
) -> None:
    owner, attacker = "fay@example.com", "gus@example.com"
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as api:
        for email in (owner, attacker):
            sign_up_with(api, email)
    # The owner logs in from a page of the API's own origin.
    chromium.get(f"{server.url}/health")
    log_in = """const [username, password, done] = arguments;
        fetch("/auth/token", {method: "POST", body: new URLSearchParams({username, password})})
            .then((response) => done(response.status));"""
    assert chromium.execute_async_script(log_in, owner, PASSWORD) == 200
    [cookie] = device_cookies(chromium)

    # Another site's page (a data: URL is an origin of its own) logs the browser in
    # to the attacker's account, as a top-level form post: the browser sends no
    # SameSite=Strict cookie with it, and would keep one that the answer sets.
    fields = {"username": attacker, "password": PASSWORD}
    inputs = "".join(f'<input name="{k}" value="{v}">' for k, v in fields.items())
    page = (
        f'<form method="post" action="{server.url}{TOKEN}">{inputs}</form>'
        "<script>document.forms[0].submit()</script>"
    )
    chromium.get("data:text/html," + quote(page))
    WebDriverWait(chromium, TIMEOUT).until(
        lambda browser: "access_token" in browser.page_source
    )  # logged in to the attacker's account

    chromium.get(f"{server.url}/health")
    assert device_cookies(chromium) == [cookie]
    assert chromium.execute_async_script(log_in, owner, PASSWORD) == 200


# CORS_ORIGINS at start-up ------------------------------------------------------------


def test_a_cors_origins_value_that_is_no_origin_stops_the_app_at_start_up(
    free_port: Callable[[], int],
) -> None:
    # One value through uvicorn; tests/test_cors.py checks others in-process.
    origins = "*"
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "main:app", "--port", str(free_port())]
        + list(SERVE_OPTIONS),
        cwd=PROJECT_DIR,
        env={**os.environ, "CORS_ORIGINS": origins},  # and the test database's URL
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "validation error for Settings\nCORS_ORIGINS" in output
    assert "not an origin" in output
    assert "Application startup complete" not in output


@on_the_server
async def test_cors_origins_with_a_port_start_the_app(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as browser:
        for origin, allowed in [
            *((origin, True) for origin in FRONT_ENDS.split(",")),
            ("https://admin.example.com", False),  # another port is another origin
        ]:
            preflight = {
                "Origin": origin,
                "Access-Control-Request-Method": "PATCH",
                "Access-Control-Request-Headers": "authorization",
            }
            response = await browser.options(ME, headers=preflight)
            assert response.status_code == (200 if allowed else 400)
            assert response.headers.get("access-control-allow-origin") == (
                origin if allowed else None
            )


@on_the_server
def test_a_listed_origin_calls_the_api_with_a_bearer_token(server: Server) -> None:
    front_end = FRONT_ENDS.split(",")[0]
    preflight = {
        "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        allowed = client.options(ME, headers={"Origin": front_end, **preflight})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == front_end
        assert "PATCH" in allowed.headers["access-control-allow-methods"]
        assert "Authorization" in allowed.headers["access-control-allow-headers"]

        evil = {"Origin": "https://evil.example", **preflight}
        other = client.options(ME, headers=evil)
        assert other.status_code == 400
        assert "access-control-allow-origin" not in other.headers

        sign_up_with(client, "cors@example.com")
        answer = client.post(TOKEN, data=form("cors@example.com", PASSWORD))
        token = answer.json()["access_token"]
        headers = {"Origin": front_end, "Authorization": f"Bearer {token}"}
        me = client.get(ME, headers=headers)
        assert me.json()["email"] == "cors@example.com"
        assert me.headers["access-control-allow-origin"] == front_end

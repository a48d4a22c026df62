"""The README's walk-through of /docs, in a real browser against a real server: sign up
with "Try it out", **Authorize**, read the account. Every request the page makes goes to
the server: Swagger UI comes from the app itself, not from a CDN.

The browser is Chromium or Chrome, driven through the chromedriver installed beside it
(Debian: `apt-get install chromium chromium-driver`); nothing is downloaded.
"""

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from support import PASSWORD, Server, StartServer

pytestmark = pytest.mark.slow

Browser = webdriver.Chrome

# Headless, and none of Chromium's own traffic (updates, sync, first-run pages): what is
# left is the page's. --no-sandbox lets it run as root, as CI does here.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,2000",
)
TIMEOUT = 30  # seconds for anything the page waits on: argon2 on a busy machine


@contextmanager
def headless_chromium(logs: tuple[str, ...] = ("performance",)) -> Iterator[Browser]:
    """Headless Chromium (or Chrome, at CHROME_BIN) through the chromedriver installed
    beside it, keeping the `logs` named ("browser": its console; "performance": every
    request of its pages)."""
    chromedriver = shutil.which("chromedriver")
    if chromedriver is None:
        pytest.skip(
            "no chromedriver: install Debian's chromium and chromium-driver"
            " (apt-get install chromium chromium-driver), or Chrome and its chromedriver"
        )
    options = webdriver.ChromeOptions()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", dict.fromkeys(logs, "ALL"))
    # chromedriver starts the browser it finds, unless CHROME_BIN names one (GitHub's
    # runners set it to their Chrome, which their chromedriver matches).
    if "CHROME_BIN" in os.environ:
        options.binary_location = os.environ["CHROME_BIN"]
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser() -> Iterator[Browser]:
    with headless_chromium() as driver:
        yield driver


@pytest.fixture
def server(migrated_url: str, start_server: StartServer) -> Iterator[Server]:
    """The app as the README's quickstart serves it: no SMTP_URL (mail goes to the
    output)."""
    with start_server(migrated_url, env={"SMTP_URL": ""}) as server:
        yield server


def page_requests(browser: Browser) -> list[str]:
    """The URLs that the browser's pages requested since the last call."""
    requested = []
    for entry in browser.get_log("performance"):  # type: ignore[no-untyped-call]
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requested.append(message["params"]["request"]["url"])
    return requested


def elsewhere(requested: list[str], server: Server) -> list[str]:
    """Those of the URLs that are not the server's (an inline `data:` image is none)."""
    server_address = urlsplit(server.url).netloc
    return [
        url
        for url in requested
        if urlsplit(url).scheme not in ("data", "blob")
        and urlsplit(url).netloc != server_address
    ]


@contextmanager
def screenshot_on_failure(
    browser: Browser, server: Server, path: Path
) -> Iterator[None]:
    """On a failure, save what the user would have seen; tell what the page requested
    elsewhere and what the server printed."""
    try:
        yield
    except BaseException as error:
        browser.save_screenshot(path)
        error.add_note(f"The page then: {path}")
        error.add_note(
            f"Requested elsewhere: {elsewhere(page_requests(browser), server)}"
        )
        error.add_note(f"The server's output:\n{server.log()}")
        raise


# Swagger UI, as a user works it -------------------------------------------------------


def declared_success(document: dict[str, Any], method: str, path: str) -> str:
    """The 2xx status that the OpenAPI document declares for an operation."""
    responses = document["paths"][path][method]["responses"]
    [code] = [str(code) for code in responses if code.startswith("2")]
    return code


def shown(scope: Browser | WebElement, selector: str) -> WebElement:
    """The element `selector` finds in `scope`, once the page shows it."""

    def visible(scope: Browser | WebElement) -> WebElement | Literal[False]:
        found = scope.find_elements(By.CSS_SELECTOR, selector)
        return found[0] if found and found[0].is_displayed() else False

    return WebDriverWait(scope, TIMEOUT).until(visible, f"the page shows no {selector}")


def try_it_out(
    browser: Browser, method: str, path: str, body: dict[str, str] | None = None
) -> tuple[str, str]:
    """Open an operation, "Try it out" with this JSON body, "Execute"; return the
    status and the response body that the page shows."""
    selector = f'.opblock-{method}:has(.opblock-summary-path[data-path="{path}"])'
    block = shown(browser, selector)
    shown(block, ".opblock-summary-control").click()
    shown(block, ".try-out__btn").click()
    if body is not None:
        editor = shown(block, "textarea.body-param__text")
        editor.send_keys(Keys.CONTROL, "a")  # the example body, replaced
        editor.send_keys(json.dumps(body))
    shown(block, ".execute").click()
    answer = shown(block, ".live-responses-table tbody .response")
    status = answer.find_element(By.CSS_SELECTOR, ".response-col_status").text
    text = answer.find_elements(By.CSS_SELECTOR, ".highlight-code pre")  # none: a 204
    return status, text[0].text if text else ""


def authorize(browser: Browser, email: str, password: str) -> None:
    """**Authorize** with the OAuth2 form's username and password, then close it."""
    shown(browser, ".auth-wrapper .authorize").click()
    shown(browser, "#oauth_username").send_keys(email)
    shown(browser, "#oauth_password").send_keys(password)
    shown(browser, ".auth-btn-wrapper .authorize").click()
    outcome = shown(browser, ".auth-container h6, .auth-container .errors")
    assert outcome.text == "Authorized"  # or the error the form shows
    shown(browser, ".auth-btn-wrapper .btn-done").click()
    WebDriverWait(browser, TIMEOUT).until(
        lambda browser: not browser.find_elements(By.CSS_SELECTOR, ".dialog-ux"),
        "the Authorize form stays open",
    )


def confirm_email(browser: Browser, server: Server, document: dict[str, Any]) -> None:
    """Where sign-up sends a verification link: take its token from the server's
    output (where the message goes without SMTP_URL), confirm it with "Try it out"."""
    deadline = time.monotonic() + TIMEOUT
    while not (link := re.search(r"#token=([A-Za-z0-9_-]+)", server.log())):
        assert time.monotonic() < deadline, (
            "no verification link in the server's output"
        )
        time.sleep(0.1)
    path = "/auth/verify-email"
    body = {"token": link[1], "password": PASSWORD}
    status, _ = try_it_out(browser, "post", path, body)
    assert status == declared_success(document, "post", path)


# The tests ----------------------------------------------------------------------------


def test_the_readme_walk_through_of_docs(
    browser: Browser, server: Server, tmp_path: Path
) -> None:
    document = httpx.get(f"{server.url}/openapi.json").json()
    email = "docs-walk-through@example.com"
    with screenshot_on_failure(browser, server, tmp_path / "docs.png"):
        browser.get(f"{server.url}/docs")
        body = {"email": email, "password": PASSWORD}
        status, _ = try_it_out(browser, "post", "/users", body)
        assert status == declared_success(document, "post", "/users")
        if "/auth/verify-email" in document["paths"]:
            confirm_email(browser, server, document)
        authorize(browser, email, PASSWORD)
        status, account = try_it_out(browser, "get", "/users/me")
        assert status == declared_success(document, "get", "/users/me")
        assert json.loads(account)["email"] == email
        requested = page_requests(browser)
        assert (
            f"{server.url}/users/me" in requested
        )  # the log holds the page's requests
        assert elsewhere(requested, server) == []

"""The pages that mailed links open (/verify-email, /reset-password): what they are
served with in-process (a Content-Security-Policy that lets their own inline script
and style run, and nothing else), and what they do in headless Chromium against a
real server without SMTP_URL, from the links it writes to its output."""

import base64
import hashlib
import re
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from urllib.parse import urlsplit

import httpx
import pytest
from harness import copy_of, running_server
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from test_docs_page import elsewhere, headless_chromium, page_requests

from core.settings import settings
from main import app
from support import MAILBOX, PASSWORD, Server, SignUp, a_password, common_passwords

url = app.url_path_for
PAGES = {"verify": url("verify_email_page"), "reset": url("reset_password_page")}
NEW_PASSWORD = a_password("a-new-s3cret")
TIMEOUT = 30  # seconds for anything the page waits on, on a busy machine


class Parsed(HTMLParser):
    """A page's inline scripts and styles, and every attribute of its elements."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.inline: dict[str, list[str]] = {"script": [], "style": []}
        self.attributes: list[tuple[str, str, str | None]] = []
        self.open: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.attributes += [(tag, name, value) for name, value in attrs]
        self.open = tag if tag in self.inline else None

    def handle_data(self, data: str) -> None:
        if self.open:
            self.inline[self.open].append(data)
            self.open = None


def source(content: str) -> str:
    digest = base64.b64encode(hashlib.sha256(content.encode()).digest()).decode()
    return f"'sha256-{digest}'"


# In-process ------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("page", PAGES.values())
async def test_a_page_may_run_its_own_inline_script_and_style_and_nothing_else(
    client: httpx.AsyncClient, page: str
) -> None:
    response = await client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    policy = {
        directive.split()[0]: directive.split()[1:]
        for directive in response.headers["content-security-policy"].split(";")
    }
    parsed = Parsed(response.text)
    assert policy["default-src"] == ["'none'"]
    for tag in ("script", "style"):
        assert parsed.inline[tag], f"no inline {tag}"
        assert policy[f"{tag}-src"] == [source(text) for text in parsed.inline[tag]]
    assert policy["connect-src"] == ["'self'"]  # the API, and nothing else
    assert policy["form-action"] == policy["frame-ancestors"] == ["'none'"]
    # Nothing from elsewhere, and nothing inline that the hashes do not cover.
    assert [
        (tag, name)
        for tag, name, _ in parsed.attributes
        if name in ("src", "style") or name.startswith("on")
    ] == []
    assert {value for tag, name, value in parsed.attributes if name == "href"} == {
        "docs"
    }  # the API's documentation, beside the page


@pytest.mark.anyio
@pytest.mark.parametrize("page", PAGES.values())
async def test_a_page_is_kept_in_no_cache_frame_or_referer(
    client: httpx.AsyncClient, page: str
) -> None:
    response = await client.get(page)
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.anyio
async def test_mailed_links_lead_to_the_pages(
    client: httpx.AsyncClient, sign_up: SignUp
) -> None:
    await sign_up("ann@example.com")
    await client.post(url("request_password_reset"), json={"email": "ann@example.com"})
    signed_up, reset = [await MAILBOX.arrived("ann@example.com", n) for n in (1, 2)]
    base = urlsplit(settings.PUBLIC_URL).path
    for message, page in ((signed_up, PAGES["verify"]), (reset, PAGES["reset"])):
        [link] = re.findall(r"\S+#token=\S+", message.get_content())
        assert urlsplit(link).path == base + page


# In Chromium, against a server that writes its mail to its output -------------------


@pytest.fixture(scope="module")
def server(
    template_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server without SMTP_URL, as the quickstart runs it, hashing cheaply."""
    directory = tmp_path_factory.mktemp("pages")
    with (
        copy_of(template_url, directory, "pages") as database_url,
        running_server(
            database_url,
            directory / "server.log",
            "--app-dir",
            "tests",
            env={"SMTP_URL": ""},
            app="cheap_server:app",
        ) as server,
    ):
        yield server


@pytest.fixture(scope="module")
def chromium() -> Iterator[webdriver.Chrome]:
    """Headless Chromium that records its console and every request of its pages."""
    with headless_chromium(("browser", "performance")) as driver:
        yield driver


def mailed_link(server: Server, email: str, page: str) -> str:
    """The link to `page` in the newest message to `email` in the server's output."""
    pattern = rf"To: {re.escape(email)}\n.*?(\S+{page}#token=[\w-]+)"
    deadline = time.monotonic() + TIMEOUT
    while not (found := re.findall(pattern, server.log(), flags=re.DOTALL)):
        assert time.monotonic() < deadline, f"no link to {page} for {email}"
        time.sleep(0.1)
    return str(found[-1])


def opened(chromium: webdriver.Chrome, server: Server, link: str) -> None:
    """Open a link as its address's owner would, in a page of its own. Without
    PUBLIC_URL, links name the app's default address; this server listens on a port
    of its own."""
    parts = urlsplit(link)
    chromium.get("about:blank")  # not a jump within the page it may show
    chromium.get(f"{server.url}{parts.path}#{parts.fragment}")
    try:
        WebDriverWait(chromium, TIMEOUT).until(
            lambda browser: "#" not in browser.current_url
        )
    except TimeoutException:
        refused = refused_by_the_policy(chromium, server)
        raise AssertionError(f"its script did not run; refused: {refused}") from None


def submitted(chromium: webdriver.Chrome) -> str:
    """Submit the page's form; the result it shows."""
    chromium.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    result = chromium.find_element(By.ID, "result")
    WebDriverWait(chromium, TIMEOUT).until(
        lambda _: result.text, "the page shows no result"
    )
    text: str = result.text
    return text


def refused_by_the_policy(chromium: webdriver.Chrome, server: Server) -> list[str]:
    """What the page's policy blocked (console messages), and what it requested
    elsewhere, since the last call."""
    console = chromium.get_log("browser")  # type: ignore[no-untyped-call]
    blocked = [
        e["message"] for e in console if "Content Security Policy" in e["message"]
    ]
    return blocked + elsewhere(page_requests(chromium), server)


def signed_up(server: Server, email: str) -> None:
    """An account through the API; its mailed link is left unopened."""
    body = {"email": email, "password": PASSWORD}
    assert httpx.post(f"{server.url}{url('create_user')}", json=body).status_code == 202


def log_in(server: Server, email: str, password: str) -> int:
    form = {"username": email, "password": password}
    return httpx.post(f"{server.url}{url('log_in')}", data=form).status_code


@pytest.mark.slow
def test_the_mailed_link_confirms_the_address_in_a_browser_once(
    server: Server, chromium: webdriver.Chrome
) -> None:
    signed_up(server, "vic@example.com")
    link = mailed_link(server, "vic@example.com", PAGES["verify"])
    opened(chromium, server, link)
    assert log_in(server, "vic@example.com", PASSWORD) == 401  # opening is no click
    password = chromium.find_element(By.ID, "password")
    password.send_keys(NEW_PASSWORD)  # not the account's
    assert "Wrong password" in submitted(chromium)
    assert log_in(server, "vic@example.com", PASSWORD) == 401
    password.clear()
    password.send_keys(PASSWORD)
    assert "confirmed" in submitted(chromium)
    assert chromium.find_element(By.ID, "result").get_attribute("class") == "done"
    assert log_in(server, "vic@example.com", PASSWORD) == 200
    assert chromium.find_element(By.LINK_TEXT, "the API's documentation")

    opened(chromium, server, link)  # used
    chromium.find_element(By.ID, "password").send_keys(PASSWORD)
    assert "invalid, used or expired" in submitted(chromium)
    assert chromium.find_element(By.ID, "result").get_attribute("class") == "failed"
    assert refused_by_the_policy(chromium, server) == []


@pytest.mark.slow
def test_the_mailed_link_sets_a_new_password_in_a_browser_that_then_logs_in(
    server: Server, chromium: webdriver.Chrome
) -> None:
    signed_up(server, "wes@example.com")
    token = urlsplit(mailed_link(server, "wes@example.com", PAGES["verify"])).fragment
    verify = f"{server.url}{url('verify_email')}"
    body = {"token": token.split("=")[1], "password": PASSWORD}
    assert httpx.post(verify, json=body).status_code == 204
    reset = f"{server.url}{url('request_password_reset')}"
    assert httpx.post(reset, json={"email": "wes@example.com"}).status_code == 202
    opened(chromium, server, mailed_link(server, "wes@example.com", PAGES["reset"]))

    password = chromium.find_element(By.ID, "password")
    password.send_keys(common_passwords(1)[0])
    assert "one of the most common" in submitted(chromium)  # the API's own words
    password.clear()
    password.send_keys(NEW_PASSWORD)
    assert "password is set" in submitted(chromium)
    assert log_in(server, "wes@example.com", NEW_PASSWORD) == 200
    assert log_in(server, "wes@example.com", PASSWORD) == 401
    # The browser is the account's device now.
    assert [c["name"] for c in chromium.get_cookies()] == ["device"]
    assert refused_by_the_policy(chromium, server) == []


@pytest.mark.slow
@pytest.mark.parametrize("fragment", ["#token=" + "x" * 43, ""], ids=["bad", "none"])
def test_a_link_with_a_bad_token_or_none_tells_so(
    server: Server, chromium: webdriver.Chrome, fragment: str
) -> None:
    opened(chromium, server, f"{server.url}{PAGES['reset']}{fragment}")
    if fragment:
        chromium.find_element(By.ID, "password").send_keys(NEW_PASSWORD)
        assert "invalid, used or expired" in submitted(chromium)
    else:
        result = chromium.find_element(By.ID, "result")
        assert "no token" in result.text
        assert not chromium.find_element(By.ID, "reset").is_displayed()
    assert refused_by_the_policy(chromium, server) == []

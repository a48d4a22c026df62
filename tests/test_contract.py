"""The OpenAPI document is the contract: every answer is declared, with its shape, and
nothing a client sends gets a 5xx or has its values echoed back."""

import json
import math
import os
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import APIRouter, Body, Form
from fastapi.routing import iter_route_contexts
from harness import hold_outbox
from pydantic import BaseModel
from sqlalchemy import make_url

import accounts.routes as account_routes
import main
from accounts import CurrentUser, passwords, throttle
from accounts.models import Links, LogInAttempts
from accounts.sessions import token_digest
from core import errors
from core.settings import settings
from db import DATABASE_URL, Users, database
from support import (
    PASSWORD,
    PASSWORD_MAX,
    PROJECT_DIR,
    LoggedIn,
    Server,
    SignUp,
    a_password,
    common_passwords,
    faults,
    sign_up_with,
)

pytestmark = pytest.mark.anyio

SECRET = a_password("do-not-echo-s3cret")
TOO_LONG = SECRET * (PASSWORD_MAX // len(SECRET) + 1)  # a password past its bound
[COMMON] = common_passwords(1)


def declared_codes() -> dict[str, set[int]]:
    """operationId -> the status codes its route declares in the OpenAPI document."""
    codes: dict[str, set[int]] = {}
    for methods in main.app.openapi()["paths"].values():
        for operation in methods.values():
            codes[operation["operationId"]] = {int(c) for c in operation["responses"]}
    return codes


def test_operation_ids_are_the_function_names() -> None:
    # A rule over every route, the ones users add included: clients generated from
    # the document get `create_user()`, not `create_user_users_post()`.
    paths = main.app.openapi()["paths"]
    checked = 0
    for route in iter_route_contexts(main.app.routes):  # included routers' too
        for method in route.methods or set():
            operation = paths.get(route.path_format, {}).get(method.lower())
            if operation:  # not the docs' own pages, nor HEAD
                assert route.endpoint
                assert operation["operationId"] == route.endpoint.__name__
                checked += 1
    assert checked == sum(len(methods) for methods in paths.values())


def test_every_error_is_declared_with_the_detail_shape() -> None:
    document = main.app.openapi()
    for methods in document["paths"].values():
        for operation in methods.values():
            for code, response in operation["responses"].items():
                if int(code) < 400:
                    continue
                schema = response["content"]["application/json"]["schema"]
                name = schema["$ref"].rsplit("/", 1)[-1]
                properties = document["components"]["schemas"][name]["properties"]
                assert set(properties) == {"detail"}, (operation["operationId"], code)


def test_a_users_route_declares_only_its_own_answers_and_gets_the_shared_ones() -> None:
    # A route as FastAPI's docs write one, on a router of its own: its own 404 only.
    router = APIRouter()

    # A path no user's resource will have: the user's own paths stay as they are.
    path = "/tutorial-test-probes/{probe_id}"
    paths_before = main.app.openapi()["paths"]

    @router.patch(path, responses={404: {"description": "No such probe"}})
    async def update_tutorial_test_probe(
        probe_id: int, text: Annotated[str, Body(embed=True)], me: CurrentUser
    ) -> None: ...

    routes_before = len(main.app.router.routes)
    main.app.include_router(router)
    main.app.openapi_schema = None
    try:
        operation = main.app.openapi()["paths"][path]["patch"]
        codes = {"200", "400", "401", "404", "413", "422", "500", "503"}
        assert set(operation["responses"]) == codes
        assert operation["responses"]["404"]["description"] == "No such probe"
        test_every_error_is_declared_with_the_detail_shape()
    finally:
        del main.app.router.routes[routes_before:]
        main.app.openapi_schema = None
    assert main.app.openapi()["paths"] == paths_before


@pytest.mark.slow  # a process
def test_a_users_router_module_imports_on_its_own(tmp_path: Path) -> None:
    # What a resource of the user's needs from the template, imported without main.py.
    (tmp_path / "tutorial_test_probes").mkdir()
    (tmp_path / "tutorial_test_probes" / "routes.py").write_text(
        "from accounts import CurrentUser\nfrom db import BaseMeta, Users\n"
    )
    check = "import sys, tutorial_test_probes.routes; assert 'main' not in sys.modules"
    subprocess.run(
        [sys.executable, "-c", check],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)},
        check=True,
    )


@asynccontextmanager
async def unreachable_database() -> AsyncIterator[None]:
    """The app's database, swapped for one that cannot be reached, then restored."""
    url = make_url(DATABASE_URL)
    if url.get_backend_name() == "sqlite":
        unreachable = url.set(database="/nonexistent/directory/db.sqlite")
    else:
        unreachable = url.set(host="127.0.0.1", port=9)  # nothing listens there
    original = database._url
    patch = pytest.MonkeyPatch()
    await hold_outbox(patch)  # a connection it held at the disconnect would stay open
    await database.disconnect()
    database._url = unreachable.render_as_string(hide_password=False)
    await database.connect()
    try:
        yield
    finally:
        await database.disconnect()
        # aiosqlite's thread for a failed connect reports its end to this event loop
        # later: wait for it, or it finds the loop closed and fails the next test.
        with anyio.fail_after(5):
            while any("_connection_worker" in t.name for t in threading.enumerate()):
                await anyio.sleep(0.01)
        database._url = original
        await database.connect()
        patch.undo()


def validate(response: httpx.Response) -> None:
    """The body has the shape that the document declares for its status code."""
    body: Any = response.json() if response.content else None
    if response.status_code == 422:
        assert all(set(e) == {"type", "loc", "msg"} for e in body["detail"])
    elif response.status_code >= 400:
        assert set(body) == {"detail"} and isinstance(body["detail"], str)
    assert SECRET not in response.text


url = main.app.url_path_for
ANN_ID = "ann-id"  # in a path: replaced with ann's id
JSON = {"content-type": "application/json"}
OVER_THE_LIMIT = "x" * (settings.MAX_BODY_SIZE + 1)
BIG = {"email": "ann@example.com", "password": OVER_THE_LIMIT}
NOT_UTF8 = b"\x80"
AS_ANN = {"as_ann": True}  # the request carries ann's bearer token
QUEUE_FULL = {"outage": "queue"}  # no room in the hashing queue
SHARE_TAKEN = {"outage": "share"}  # this address holds its share of the queue
PAST_LIMIT = {"outage": "limit"}  # this address has sent its sign-ups and resets
DATABASE_DOWN = {"outage": "database"}  # the database cannot be reached
# The password changes between its check and the write that depends on it.
CHANGED_MEANWHILE = {"outage": "changed"}
RIGHT = {"current_password": PASSWORD}
LINK_TOKEN = "a-mailed-links-token"  # stored for ann, as a link of the flag's purpose
VERIFY_LINK, RESET_LINK = {"link": "verify"}, {"link": "reset"}


def case(
    name: str,
    operation: str,
    code: int,
    method: str,
    path: str,
    *flags: dict[str, Any],
    **options: Any,
) -> Any:
    """One request and the one status code it must get, as a test of its own."""
    setup: dict[str, Any] = {"as_ann": False, "outage": None, "link": None}
    for flag in flags:
        setup |= flag
    return pytest.param(
        operation, code, method, path, options, setup, id=f"{operation}-{code}-{name}"
    )


# Every code of every route the template has, provoked. Routes a user adds are not
# here, and need not be: the fuzzer checks that they answer only what they declare.
CASES = [
    case("new", "create_user", 202, "POST", url("create_user"),
         json={"email": "new@example.com", "password": SECRET}),
    case("taken", "create_user", 202, "POST", url("create_user"),
         json={"email": "ann@example.com", "password": SECRET}),
    case("bad-email", "create_user", 422, "POST", url("create_user"),
         json={"email": "x", "password": SECRET}),
    case("too-big", "create_user", 413, "POST", url("create_user"), json=BIG),
    case("not-utf8", "create_user", 400, "POST", url("create_user"),
         content=NOT_UTF8, headers=JSON),
    case("queue-full", "create_user", 503, "POST", url("create_user"), QUEUE_FULL,
         json={"email": "q@example.com", "password": SECRET}),
    case("share-taken", "create_user", 429, "POST", url("create_user"), SHARE_TAKEN,
         json={"email": "q@example.com", "password": SECRET}),
    case("past-limit", "create_user", 429, "POST", url("create_user"), PAST_LIMIT,
         json={"email": "q@example.com", "password": SECRET}),
    case("right", "log_in", 200, "POST", url("log_in"),
         data={"username": "ann@example.com", "password": PASSWORD}),
    case("wrong", "log_in", 401, "POST", url("log_in"),
         data={"username": "ann@example.com", "password": SECRET}),
    case("no-password", "log_in", 422, "POST", url("log_in"),
         data={"username": "ann@example.com"}),
    case("too-big", "log_in", 413, "POST", url("log_in"),
         data={"username": "a", "password": OVER_THE_LIMIT}),
    case("bad-multipart", "log_in", 400, "POST", url("log_in"),
         content=b"--x\r\n", headers={"content-type": "multipart/form-data"}),
    case("queue-full", "log_in", 503, "POST", url("log_in"), QUEUE_FULL,
         data={"username": "ann@example.com", "password": PASSWORD}),
    case("share-taken", "log_in", 429, "POST", url("log_in"), SHARE_TAKEN,
         data={"username": "ann@example.com", "password": PASSWORD}),
    case("right", "verify_email", 204, "POST", url("verify_email"), VERIFY_LINK,
         json={"token": LINK_TOKEN, "password": PASSWORD}),
    case("wrong-purpose", "verify_email", 400, "POST", url("verify_email"),
         RESET_LINK, json={"token": LINK_TOKEN, "password": PASSWORD}),
    case("wrong-password", "verify_email", 403, "POST", url("verify_email"),
         VERIFY_LINK, json={"token": LINK_TOKEN, "password": SECRET}),
    case("no-token", "verify_email", 422, "POST", url("verify_email"), json={}),
    case("too-big", "verify_email", 413, "POST", url("verify_email"),
         json={"token": OVER_THE_LIMIT, "password": PASSWORD}),
    case("share-taken", "verify_email", 429, "POST", url("verify_email"), VERIFY_LINK,
         SHARE_TAKEN, json={"token": LINK_TOKEN, "password": PASSWORD}),
    case("database-down", "verify_email", 503, "POST", url("verify_email"),
         DATABASE_DOWN, json={"token": LINK_TOKEN, "password": PASSWORD}),
    case("any", "request_password_reset", 202, "POST",
         url("request_password_reset"), json={"email": "ann@example.com"}),
    case("past-limit", "request_password_reset", 429, "POST",
         url("request_password_reset"), PAST_LIMIT, json={"email": "a@example.com"}),
    case("not-utf8", "request_password_reset", 400, "POST",
         url("request_password_reset"), content=NOT_UTF8, headers=JSON),
    case("bad-email", "request_password_reset", 422, "POST",
         url("request_password_reset"), json={"email": SECRET}),
    case("too-big", "request_password_reset", 413, "POST",
         url("request_password_reset"), json=BIG),
    case("database-down", "request_password_reset", 503, "POST",
         url("request_password_reset"), DATABASE_DOWN,
         json={"email": "ann@example.com"}),
    case("right", "reset_password", 204, "POST", url("reset_password"), RESET_LINK,
         json={"token": LINK_TOKEN, "password": SECRET}),
    case("unknown-token", "reset_password", 400, "POST", url("reset_password"),
         json={"token": LINK_TOKEN, "password": SECRET}),
    case("common-password", "reset_password", 422, "POST", url("reset_password"),
         RESET_LINK, json={"token": LINK_TOKEN, "password": COMMON}),
    case("too-big", "reset_password", 413, "POST", url("reset_password"), json=BIG),
    case("queue-full", "reset_password", 503, "POST", url("reset_password"),
         RESET_LINK, QUEUE_FULL, json={"token": LINK_TOKEN, "password": SECRET}),
    case("share-taken", "reset_password", 429, "POST", url("reset_password"),
         RESET_LINK, SHARE_TAKEN, json={"token": LINK_TOKEN, "password": SECRET}),
    case("logged-in", "log_out", 204, "DELETE", url("log_out"), AS_ANN),
    case("anonymous", "log_out", 401, "DELETE", url("log_out")),
    case("database-down", "log_out", 503, "DELETE", url("log_out"), AS_ANN,
         DATABASE_DOWN),
    case("logged-in", "read_me", 200, "GET", url("read_me"), AS_ANN),
    case("anonymous", "read_me", 401, "GET", url("read_me")),
    case("database-down", "read_me", 503, "GET", url("read_me"), AS_ANN,
         DATABASE_DOWN),
    case("no-change", "update_me", 200, "PATCH", url("update_me"), AS_ANN, json={}),
    case("anonymous", "update_me", 401, "PATCH", url("update_me"), json={}),
    case("no-current-password", "update_me", 422, "PATCH", url("update_me"), AS_ANN,
         json={"email": "b@example.com"}),
    case("wrong-current-password", "update_me", 403, "PATCH", url("update_me"),
         AS_ANN, json={"email": "b@example.com", "current_password": SECRET}),
    case("email", "update_me", 202, "PATCH", url("update_me"), AS_ANN,
         json={"email": "bob@example.com", "current_password": PASSWORD}),
    case("changed-meanwhile", "update_me", 409, "PATCH", url("update_me"), AS_ANN,
         CHANGED_MEANWHILE, json={"password": SECRET, "current_password": PASSWORD}),
    case("too-big", "update_me", 413, "PATCH", url("update_me"), AS_ANN, json=BIG),
    case("not-utf8", "update_me", 400, "PATCH", url("update_me"), AS_ANN,
         content=NOT_UTF8, headers=JSON),
    case("queue-full", "update_me", 503, "PATCH", url("update_me"), AS_ANN,
         QUEUE_FULL, json={"password": SECRET, "current_password": PASSWORD}),
    case("share-taken", "update_me", 429, "PATCH", url("update_me"), AS_ANN,
         SHARE_TAKEN, json={"password": SECRET, "current_password": PASSWORD}),
    case("right-password", "delete_me", 204, "DELETE", url("delete_me"), AS_ANN,
         json=RIGHT),
    case("anonymous", "delete_me", 401, "DELETE", url("delete_me"), json=RIGHT),
    case("wrong-password", "delete_me", 403, "DELETE", url("delete_me"), AS_ANN,
         json={"current_password": SECRET}),
    case("changed-meanwhile", "delete_me", 409, "DELETE", url("delete_me"), AS_ANN,
         CHANGED_MEANWHILE, json=RIGHT),
    case("no-password", "delete_me", 422, "DELETE", url("delete_me"), AS_ANN,
         json={}),
    case("too-big", "delete_me", 413, "DELETE", url("delete_me"), AS_ANN, json=BIG),
    case("not-utf8", "delete_me", 400, "DELETE", url("delete_me"), AS_ANN,
         content=NOT_UTF8, headers=JSON),
    case("share-taken", "delete_me", 429, "DELETE", url("delete_me"), AS_ANN,
         SHARE_TAKEN, json=RIGHT),
    case("database-down", "delete_me", 503, "DELETE", url("delete_me"), AS_ANN,
         DATABASE_DOWN, json=RIGHT),
    case("up", "health", 200, "GET", url("health")),
    case("database-down", "health", 503, "GET", url("health"), DATABASE_DOWN),
]  # fmt: skip


def test_the_table_provokes_every_code_the_templates_routes_declare() -> None:
    provoked: dict[str, set[int]] = defaultdict(set)
    for param in CASES:
        operation, code = param.values[:2]
        provoked[operation].add(code)
    # Every route declares 500, a bug's answer: the table provokes none.
    declared = {op: codes - {500} for op, codes in declared_codes().items()}
    assert {operation: declared.get(operation) for operation in provoked} == provoked


@pytest.mark.parametrize(
    ("operation", "code", "method", "path", "options", "setup"), CASES
)
async def test_each_case_gets_exactly_its_code(
    client: httpx.AsyncClient,
    ann: LoggedIn,
    sign_up: SignUp,
    monkeypatch: pytest.MonkeyPatch,
    operation: str,
    code: int,
    method: str,
    path: str,
    options: dict[str, Any],
    setup: dict[str, Any],
) -> None:
    await sign_up("bob@example.com")
    path = path.replace(f"/{ANN_ID}", f"/{ann.user['id']}")
    if setup["as_ann"]:
        options = options | {"headers": options.get("headers", {}) | ann.headers}
    if setup["link"]:
        await Links.objects.create(
            digest=token_digest(LINK_TOKEN),
            user=ann.user["id"],
            purpose=setup["link"],
            email="ann@example.com",
            expires_at=datetime.now(UTC) + timedelta(hours=1),
        )
    if setup["outage"] == "queue":
        monkeypatch.setattr(settings, "PASSWORD_HASHING_QUEUE", 0)
    if setup["outage"] == "share":
        monkeypatch.setattr(settings, "PASSWORD_HASHING_SHARE", 0)
        monkeypatch.setattr(throttle, "REFUSAL_PAUSE", 0)  # the 429 at once
    if setup["outage"] == "limit":
        monkeypatch.setattr(settings, "SIGN_UPS_AND_RESETS_PER_MINUTE", 0)
        monkeypatch.setattr(settings, "SIGN_UPS_AND_RESETS_PER_MINUTE", 0)
        monkeypatch.setattr(throttle, "REFUSAL_PAUSE", 0)  # the 429 at once
    if setup["outage"] == "changed":
        check = account_routes.check_current_password

        async def then_changed(user: Users, password: str, *client: Any) -> None:
            await check(user, password, *client)
            await Users.objects.filter(id=user.id).update(password=passwords.DUMMY_HASH)

        monkeypatch.setattr(account_routes, "check_current_password", then_changed)
    if setup["outage"] == "database":
        async with unreachable_database():
            response = await client.request(method, path, **options)
    else:
        response = await client.request(method, path, **options)
    assert response.status_code == code, response.text
    validate(response)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", f'{{"email": NaN, "password": "{SECRET}"}}'),
        (
            "application/json",
            f'{{"email": "a@example.com", "password": Infinity, "x": "{SECRET}"}}',
        ),
        ("application/json", f'{{"email": "{SECRET}@", "password": "{SECRET}"}}'),
        (
            "application/json",
            f'{{"email": ["{SECRET}"], "password": {{"{SECRET}": 1}}}}',
        ),
        (
            "application/json",
            f'{{"email": "a@example.com", "password": "{TOO_LONG}"}}',
        ),
        ("application/json", f'"{SECRET}"'),
        ("application/json", f'{{"email": "{SECRET}'),
        ("application/json", "[" * 5000 + "]" * 5000),
        ("application/json", b"\x80\x81"),
        (
            "application/json; charset=utf-16",
            f'{{"password": "{SECRET}"}}'.encode("utf-16"),
        ),
        ("text/plain", f'{{"email": "a@example.com", "password": "{SECRET}"}}'),
        (
            "application/x-www-form-urlencoded",
            f"email=a%40example.com&password={SECRET}",
        ),
        ("multipart/form-data; boundary=x", f"--x\r\n{SECRET}"),
        ("application/xml", f"<email>{SECRET}</email>"),
    ],
)
async def test_hostile_bodies_get_a_4xx_that_echoes_nothing(
    client: httpx.AsyncClient, content_type: str, body: str | bytes
) -> None:
    for path in (main.app.url_path_for("create_user"), main.app.url_path_for("log_in")):
        response = await client.post(
            path, content=body, headers={"content-type": content_type}
        )
        assert response.status_code in {400, 401, 413, 422}, response.text
        validate(response)


async def test_a_chunked_body_over_the_limit_gets_413(
    client: httpx.AsyncClient,
) -> None:
    chunks_sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal chunks_sent
        for _ in range(1000):  # 16 MB if it were all read
            chunks_sent += 1
            yield b" " * 16384

    response = await client.post(
        main.app.url_path_for("create_user"),
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json() == {"detail": "Request body too large"}
    assert chunks_sent < 1000  # answered before the whole body was read


async def test_a_value_the_database_cannot_store_gets_422_not_500(
    client: httpx.AsyncClient,
) -> None:
    # A route a user adds that stores text as sent (the tutorial's post title, say):
    # PostgreSQL refuses a NUL character in text, and so does the app on SQLite.
    async def store_text(text: Annotated[str, Body(embed=True)]) -> None:
        await Users.objects.filter(id=0).update(email=text)

    main.app.add_api_route("/stored-text", store_text, methods=["POST"])
    try:
        response = await client.post("/stored-text", json={"text": "a\u0000b"})
    finally:
        main.app.router.routes.pop()
    assert response.status_code == 422
    assert response.json() == {
        "detail": [
            {"type": "unstorable", "loc": ["body", "text"], "msg": errors.UNSTORABLE}
        ]
    }


# A path no user's resource will have.
PROBE_PATH = "/tutorial-test-probe"


class ProbeCount(BaseModel):
    attempts: int


def probe_router() -> APIRouter:
    """Routes as a user may write them: plain `int`s, no bounds of their own."""
    router = APIRouter(prefix=PROBE_PATH)

    @router.post("/counts", status_code=201)
    async def create_probe_count(body: ProbeCount) -> None:
        # LogInAttempts.attempts: an INTEGER column, 32 bits on PostgreSQL.
        await LogInAttempts.objects.create(
            digest=PROBE_PATH, attempts=body.attempts, last_attempt_at=datetime.now(UTC)
        )

    @router.post("/form-counts", status_code=201)
    async def create_probe_form_count(attempts: Annotated[int, Form()]) -> None:
        await create_probe_count(ProbeCount(attempts=attempts))

    @router.get("/users")
    async def list_probe_users(offset: int = 0, limit: int = 100) -> int:
        return len(await Users.objects.offset(offset).limit(limit).all())

    @router.get("/users/{user_id}")
    async def read_probe_user(user_id: int) -> bool:
        return await Users.objects.filter(id=user_id).exists()

    @router.post("/users/count")
    async def count_probe_users(ids: Annotated[list[int], Body(embed=True)]) -> int:
        return await Users.objects.filter(id__in=ids).count()

    @router.get("/pages/{page}")
    async def read_probe_page(page: int) -> int:
        # A number computed from the one sent: the 422 cannot point at it.
        return len(await Users.objects.offset(page * 2**16).all())

    @router.get("/exp/{power}")
    async def probe_overflow(power: int) -> float:
        return math.exp(power)  # OverflowError, but not the database's

    return router


@pytest.fixture
def probe_routes() -> Iterator[None]:
    before = len(main.app.router.routes)
    main.app.include_router(probe_router())
    try:
        yield
    finally:
        del main.app.router.routes[before:]


HUGE = 2**70  # past 64 bits: no column of either database holds it


@pytest.mark.parametrize(
    ("method", "path", "options", "loc"),
    [
        ("POST", "/counts", {"json": {"attempts": HUGE}}, ["body", "attempts"]),
        ("POST", "/counts", {"json": {"attempts": -HUGE}}, ["body", "attempts"]),
        ("POST", "/counts", {"json": {"attempts": str(HUGE)}}, ["body", "attempts"]),
        ("POST", "/form-counts", {"data": {"attempts": HUGE}}, ["body", "attempts"]),
        ("GET", "/users", {"params": {"offset": HUGE}}, ["query", "offset"]),
        # One the fuzzer sent, past 64 bits.
        (
            "GET",
            "/users",
            {"params": {"offset": 2505486097221904040267350016}},
            ["query", "offset"],
        ),
        ("GET", f"/users/{HUGE}", {}, ["path", "user_id"]),
        ("POST", "/users/count", {"json": {"ids": [1, HUGE]}}, ["body", "ids", 1]),
        ("GET", f"/pages/{2**48}", {}, []),
    ],
)
async def test_a_number_the_database_cannot_store_gets_422_naming_it(
    client: httpx.AsyncClient,
    probe_routes: None,
    method: str,
    path: str,
    options: dict[str, Any],
    loc: list[str | int],
) -> None:
    response = await client.request(method, PROBE_PATH + path, **options)
    assert response.status_code == 422, response.text
    assert response.json() == {
        "detail": [{"type": "out_of_range", "loc": loc, "msg": errors.OUT_OF_RANGE}]
    }
    validate(response)


async def test_a_number_past_32_bits_is_refused_by_an_integer_column_on_both(
    client: httpx.AsyncClient, probe_routes: None
) -> None:
    # SQLite would store it; PostgreSQL refuses it, and the app does on either.
    body = {"attempts": 2**40}
    response = await client.post(f"{PROBE_PATH}/counts", json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "attempts"]


async def test_an_overflow_that_is_not_the_databases_stays_a_500(
    client: httpx.AsyncClient, probe_routes: None
) -> None:
    with pytest.raises(OverflowError):  # the test client raises what the app does
        await client.get(f"{PROBE_PATH}/exp/1000")


async def test_a_declared_length_over_the_limit_gets_413_unread(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        main.app.url_path_for("log_in"),
        content=b"x" * (settings.MAX_BODY_SIZE + 1),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 413
    assert response.json() == {"detail": "Request body too large"}


FUZZER_SEED = 2026
# What FastAPI promises of any route: the codes, content types and shapes it declares
# (not formats: pydantic writes a naive datetime, as SQLite gives one back, with no
# offset, which `format: date-time` asks for), and no 5xx.
FASTAPIS_PROMISES = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
]


@pytest.mark.slow
@pytest.mark.xdist_group("shared_server")
def test_an_openapi_fuzzer_finds_no_undeclared_answer(
    shared_server: Server, tmp_path: Path
) -> None:
    """schemathesis, driven by /openapi.json, against a real server, on the same
    cases every run (a seed, deterministic generation): a red run is reproducible.

    The template's routes get every check but `positive_data_acceptance`
    (email_validator refuses special-use domains such as `.test` that the schema's
    `format: email` allows) and `allow_header_conformance` (Starlette lists only one
    route's methods in a 405). The user's routes are held to what FastAPI promises:
    declared codes, content types and shapes, no 5xx (pydantic's lax mode reads
    `false` as 0 for an `int`, which `negative_data_rejection` would call a bug).
    `delete_me` and `log_out` would end the fuzzer's own session.
    """
    server = shared_server
    log_before = server.log_size()  # the shared server's log so far
    with httpx.Client(base_url=server.url) as client:
        sign_up_with(client, "fuzz@example.com")
        form = {"username": "fuzz@example.com", "password": PASSWORD}
        token = client.post("/auth/token", data=form).json()["access_token"]
    templates = {param.values[0] for param in CASES}
    users = sorted(set(declared_codes()) - templates)
    config = [
        f"seed = {FUZZER_SEED}",
        "[generation]",
        "deterministic = true",
        'database = "none"',  # no cases replayed from an earlier run
        "[checks]",
        "positive_data_acceptance.enabled = false",
        "allow_header_conformance.enabled = false",
    ]
    if users:
        config += ["[[operations]]", f"include-operation-id = {json.dumps(users)}"]
        config += ["checks.enabled = false"]
        config += [f"checks.{check}.enabled = true" for check in FASTAPIS_PROMISES]
        config += ["checks.response_schema_conformance.validate-formats = false"]
    (tmp_path / "schemathesis.toml").write_text("\n".join(config) + "\n")
    command = [str(Path(sys.executable).with_name("st"))]
    command += ["--config-file", str(tmp_path / "schemathesis.toml"), "run"]
    command += [f"{server.url}/openapi.json", "--max-examples", "10"]
    command += ["--header", f"Authorization: Bearer {token}"]
    command += [
        "--exclude-operation-id",
        "delete_me",
        "--exclude-operation-id",
        "log_out",
    ]
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-6000:]  # with curl reproductions
    assert not faults(server.log(log_before)), faults(server.log(log_before))


def test_the_docs_authorize_button_logs_in_at_the_token_route() -> None:
    # Swagger UI's password flow posts the form to tokenUrl, relative to /docs.
    [scheme] = main.app.openapi()["components"]["securitySchemes"].values()
    token_url = scheme["flows"]["password"]["tokenUrl"]
    assert httpx.URL("http://host/docs").join(token_url).path == (
        main.app.url_path_for("log_in")
    )

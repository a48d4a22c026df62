"""The OpenAPI document is the contract: every answer is declared, with its shape, and
nothing a client sends gets a 5xx or has its values echoed back."""

import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import make_url

import main
from conftest import PASSWORD, TEST_DATABASE_URL, log_in, migrate, sign_up, start_server
from db import Users, database
from main import DUMMY_HASH

pytestmark = pytest.mark.anyio

SECRET = "do-not-echo-s3cret"


def declared_codes() -> dict[str, set[int]]:
    """operationId -> the status codes its route declares in the OpenAPI document."""
    codes: dict[str, set[int]] = {}
    for methods in main.app.openapi()["paths"].values():
        for operation in methods.values():
            codes[operation["operationId"]] = {int(c) for c in operation["responses"]}
    return codes


def test_operation_ids_are_the_function_names() -> None:
    assert set(declared_codes()) == {
        "create_user",
        "log_in",
        "log_out",
        "read_me",
        "update_me",
        "delete_me",
        "health",
    }


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


@asynccontextmanager
async def unreachable_database() -> AsyncIterator[None]:
    """The app's database, swapped for one that cannot be reached, then restored."""
    url = make_url(TEST_DATABASE_URL)
    if url.get_backend_name() == "sqlite":
        unreachable = url.set(database="/nonexistent/directory/db.sqlite")
    else:
        unreachable = url.set(host="127.0.0.1", port=9)  # nothing listens there
    original = database._url
    await database.disconnect()
    database._url = unreachable.render_as_string(hide_password=False)
    await database.connect()
    try:
        yield
    finally:
        await database.disconnect()
        database._url = original
        await database.connect()


def validate(response: httpx.Response) -> None:
    """The body has the shape that the document declares for its status code."""
    body: Any = response.json() if response.content else None
    if response.status_code == 422:
        assert all(set(e) == {"type", "loc", "msg"} for e in body["detail"])
    elif response.status_code >= 400:
        assert set(body) == {"detail"} and isinstance(body["detail"], str)
    assert SECRET not in response.text


async def test_each_route_answers_exactly_the_codes_it_declares(
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await sign_up(client, "ann@example.com")
    await sign_up(client, "bob@example.com")
    me = await log_in(client, "ann@example.com")
    url = main.app.url_path_for
    json_type = {"content-type": "application/json"}
    big = {"email": "ann@example.com", "password": "x" * 20000}
    not_utf8 = b"\x80"
    right = {"current_password": PASSWORD}
    answered: dict[str, set[int]] = defaultdict(set)

    async def call(operation: str, method: str, path: str, **options: Any) -> None:
        response = await client.request(method, path, **options)
        validate(response)
        answered[operation].add(response.status_code)

    cases: list[tuple[str, str, str, dict[str, Any]]] = [
        (
            "create_user",
            "POST",
            url("create_user"),
            {"json": {"email": "new@example.com", "password": SECRET}},
        ),
        (
            "create_user",
            "POST",
            url("create_user"),
            {"json": {"email": "ann@example.com", "password": SECRET}},
        ),
        (
            "create_user",
            "POST",
            url("create_user"),
            {"json": {"email": "x", "password": SECRET}},
        ),
        ("create_user", "POST", url("create_user"), {"json": big}),
        (
            "create_user",
            "POST",
            url("create_user"),
            {"content": not_utf8, "headers": json_type},
        ),
        (
            "log_in",
            "POST",
            url("log_in"),
            {"data": {"username": "ann@example.com", "password": PASSWORD}},
        ),
        (
            "log_in",
            "POST",
            url("log_in"),
            {"data": {"username": "ann@example.com", "password": SECRET}},
        ),
        ("log_in", "POST", url("log_in"), {"data": {"username": "ann@example.com"}}),
        (
            "log_in",
            "POST",
            url("log_in"),
            {"data": {"username": "a", "password": "x" * 20000}},
        ),
        (
            "log_in",
            "POST",
            url("log_in"),
            {
                "content": b"--x\r\n",
                "headers": {"content-type": "multipart/form-data"},
            },
        ),
        ("read_me", "GET", url("read_me"), {"headers": me}),
        ("read_me", "GET", url("read_me"), {}),
        ("update_me", "PATCH", url("update_me"), {"json": {}, "headers": me}),
        ("update_me", "PATCH", url("update_me"), {"json": {}}),
        (
            "update_me",
            "PATCH",
            url("update_me"),
            {"json": {"email": "b@example.com"}, "headers": me},
        ),
        (
            "update_me",
            "PATCH",
            url("update_me"),
            {
                "json": {"email": "b@example.com", "current_password": SECRET},
                "headers": me,
            },
        ),
        (
            "update_me",
            "PATCH",
            url("update_me"),
            {
                "json": {"email": "bob@example.com", "current_password": PASSWORD},
                "headers": me,
            },
        ),
        ("update_me", "PATCH", url("update_me"), {"json": big, "headers": me}),
        (
            "update_me",
            "PATCH",
            url("update_me"),
            {"content": not_utf8, "headers": me | json_type},
        ),
        ("health", "GET", url("health"), {}),
        ("log_out", "DELETE", url("log_out"), {}),
    ]
    for case in cases:
        await call(case[0], case[1], case[2], **case[3])
    wrong = {"current_password": "wrong-password"}
    await call("delete_me", "DELETE", url("delete_me"), json=wrong, headers=me)
    await call("delete_me", "DELETE", url("delete_me"), json={}, headers=me)
    await call("delete_me", "DELETE", url("delete_me"), json=big, headers=me)
    await call(
        "delete_me",
        "DELETE",
        url("delete_me"),
        content=not_utf8,
        headers=me | json_type,
    )

    # 503: too many hashes waiting; 429: this address holds its share of them.
    hashing: list[tuple[str, str, str, dict[str, Any]]] = [
        (
            "create_user",
            "POST",
            url("create_user"),
            {"json": {"email": "q@example.com", "password": SECRET}},
        ),
        (
            "log_in",
            "POST",
            url("log_in"),
            {"data": {"username": "ann@example.com", "password": PASSWORD}},
        ),
        (
            "update_me",
            "PATCH",
            url("update_me"),
            {"json": {"password": SECRET, **right}, "headers": me},
        ),
        ("delete_me", "DELETE", url("delete_me"), {"json": right, "headers": me}),
    ]
    for setting in ("HASHING_QUEUE", "HASHING_SHARE"):
        monkeypatch.setattr(main, "REFUSAL_PAUSE", 0)  # 429s at once
        monkeypatch.setattr(main, setting, 0)
        for case in hashing:
            await call(case[0], case[1], case[2], **case[3])
        monkeypatch.undo()
    # Then a database that cannot be reached.
    async with unreachable_database():
        for operation, method, path in [
            ("read_me", "GET", url("read_me")),
            ("delete_me", "DELETE", url("delete_me")),
            ("log_out", "DELETE", url("log_out")),
            ("health", "GET", url("health")),
        ]:
            await call(operation, method, path, headers=me, json=right)

    await call("log_out", "DELETE", url("log_out"), headers=me)
    me = await log_in(client, "ann@example.com")

    # 409: the password changed between its check and the deletion.
    async def password_changed_meanwhile(
        user: Users, password: str, client: str
    ) -> None:
        await Users.objects.filter(id=user.id).update(password=DUMMY_HASH)

    monkeypatch.setattr(main, "check_current_password", password_changed_meanwhile)
    await call("delete_me", "DELETE", url("delete_me"), json=right, headers=me)
    monkeypatch.undo()
    bob = await log_in(client, "bob@example.com")
    await call("delete_me", "DELETE", url("delete_me"), json=right, headers=bob)
    await call("delete_me", "DELETE", url("delete_me"), json=right, headers=bob)

    assert answered == declared_codes()


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
            f'{{"email": "a@example.com", "password": "{SECRET * 9}"}}',
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


async def test_a_declared_length_over_the_limit_gets_413_unread(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        main.app.url_path_for("log_in"),
        content=b"x" * (main.MAX_BODY_SIZE + 1),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 413
    assert response.json() == {"detail": "Request body too large"}


def test_an_openapi_fuzzer_finds_no_undeclared_answer(
    empty_database_url: str, tmp_path: Path
) -> None:
    """schemathesis, driven by /openapi.json, against a real server.

    Left out: `positive_data_acceptance` (email_validator refuses special-use domains
    such as `.test` that the schema's `format: email` allows) and
    `allow_header_conformance` (Starlette lists only one route's methods in a 405).
    `delete_me` and `log_out` would end the fuzzer's own session.
    """
    migrate(empty_database_url)
    with start_server(empty_database_url, tmp_path / "server.log") as server:
        with httpx.Client(base_url=server.url) as client:
            body = {"email": "fuzz@example.com", "password": PASSWORD}
            assert client.post("/users", json=body).status_code == 201
            form = {"username": "fuzz@example.com", "password": PASSWORD}
            token = client.post("/auth/token", data=form).json()["access_token"]
        command = [str(Path(sys.executable).with_name("st")), "run"]
        command += [f"{server.url}/openapi.json", "--max-examples", "10"]
        command += ["--header", f"Authorization: Bearer {token}", "--checks", "all"]
        command += [
            "--exclude-checks",
            "positive_data_acceptance,allow_header_conformance",
        ]
        command += [
            "--exclude-operation-id",
            "delete_me",
            "--exclude-operation-id",
            "log_out",
        ]
        result = subprocess.run(
            command, cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stdout[-6000:]
        assert " 500 " not in server.log()


def test_the_docs_authorize_button_logs_in_at_the_token_route() -> None:
    # Swagger UI's password flow posts the form to tokenUrl, relative to /docs.
    [scheme] = main.app.openapi()["components"]["securitySchemes"].values()
    token_url = scheme["flows"]["password"]["tokenUrl"]
    assert httpx.URL("http://host/docs").join(token_url).path == (
        main.app.url_path_for("log_in")
    )

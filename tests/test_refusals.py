"""A user's own resource, written as FastAPI's docs write one: whatever its schema lets
through, a value that its columns cannot take is a 422 naming the field (never a 500),
on SQLite as on PostgreSQL; reads are not checked; a bug's 500 is JSON."""

import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import ormar
import pytest
import sqlalchemy
from fastapi import APIRouter
from fastapi.exceptions import ResponseValidationError
from pydantic import BaseModel
from sqlalchemy import make_url

import main
from core import errors
from db import DATABASE_URL, database

pytestmark = pytest.mark.anyio

# A table and a path no user's resource will have, in metadata of their own: the
# app's models and migrations stay as they are.
probe_config = ormar.OrmarConfig(database=database, metadata=sqlalchemy.MetaData())


class TutorialTestProbes(ormar.Model):
    ormar_config = probe_config.copy(tablename="tutorial_test_probes")

    id: int = ormar.Integer(primary_key=True)
    name: str = ormar.String(max_length=16)  # NOT NULL
    small: int | None = ormar.SmallInteger(nullable=True)
    count: int | None = ormar.Integer(nullable=True)
    big: int | None = ormar.BigInteger(nullable=True)


PATH = "/tutorial-test-probes"
COLUMNS = TutorialTestProbes.ormar_config.table.c
NAME_LENGTH = int(cast(sqlalchemy.String, COLUMNS.name.type).length or 0)
# Each integer column and its bits on PostgreSQL.
INTEGERS = {"small": 16, "count": 32, "big": 64}
SENT = "do-not-log-this"  # in each value refused: no log line may quote it
TOO_LONG = SENT * (NAME_LENGTH // len(SENT) + 1)


class ProbeCreate(BaseModel):  # unbounded: `str` and `int`, as users write them
    name: str
    small: int | None = None
    count: int | None = None
    big: int | None = None


class ProbeUpdate(BaseModel):
    name: str | None = None
    small: int | None = None
    count: int | None = None
    big: int | None = None


def probe_router() -> APIRouter:
    router = APIRouter(prefix=PATH)

    @router.post("", status_code=201)
    async def create_tutorial_test_probe(body: ProbeCreate) -> int:
        return (await TutorialTestProbes.objects.create(**body.model_dump())).id

    @router.patch("/{probe_id}")  # QuerySet.update
    async def update_tutorial_test_probe(probe_id: int, body: ProbeUpdate) -> None:
        changes = body.model_dump(exclude_unset=True)
        await TutorialTestProbes.objects.filter(id=probe_id).update(**changes)

    @router.put("/{probe_id}")  # Model.update, on the loaded row
    async def replace_tutorial_test_probe(probe_id: int, body: ProbeUpdate) -> None:
        probe = await TutorialTestProbes.objects.get(id=probe_id)
        await probe.update(**body.model_dump(exclude_unset=True))

    @router.get("")
    async def count_tutorial_test_probes(count: int) -> int:
        return await TutorialTestProbes.objects.filter(count=count).count()

    @router.get("/bug")
    async def tutorial_test_bug() -> None:
        raise RuntimeError(SENT)

    @router.get("/bad-answer")
    async def tutorial_test_bad_answer() -> int:
        return cast(int, SENT)  # not the int it declares

    return router


@pytest.fixture
async def probes(client: httpx.AsyncClient) -> AsyncIterator[int]:
    """The probe table and routes, with one row; gives its id."""
    async with database.engine.begin() as connection:
        await connection.run_sync(probe_config.metadata.create_all)
    before = len(main.app.router.routes)
    main.app.include_router(probe_router())
    try:
        yield (await TutorialTestProbes.objects.create(name="first")).id
    finally:
        del main.app.router.routes[before:]
        async with database.engine.begin() as connection:
            await connection.run_sync(probe_config.metadata.drop_all)


async def stored(probe_id: int) -> dict[str, Any]:
    return (await TutorialTestProbes.objects.get(id=probe_id)).model_dump()


def refused(kind: str, field: str) -> list[dict[str, Any]]:
    """A 422's detail for one value sent in the body, of any message."""
    return [{"type": kind, "loc": ["body", field], "msg": ...}]


def detail_of(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 422, response.text
    detail: list[dict[str, Any]] = response.json()["detail"]
    return [error | {"msg": ...} for error in detail]


@pytest.mark.parametrize("method", ["POST", "PATCH", "PUT"])
async def test_a_string_past_its_column_is_a_422_naming_it(
    client: httpx.AsyncClient,
    probes: int,
    caplog: pytest.LogCaptureFixture,
    method: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    before = await stored(probes)
    path = PATH if method == "POST" else f"{PATH}/{probes}"
    response = await client.request(method, path, json={"name": TOO_LONG})
    assert detail_of(response) == refused("string_too_long", "name")
    assert await stored(probes) == before
    assert await TutorialTestProbes.objects.count() == 1
    assert SENT not in response.text
    assert caplog.records and SENT not in caplog.text


@pytest.mark.parametrize("method", ["PATCH", "PUT"])
async def test_null_for_a_not_null_column_is_a_422_naming_it(
    client: httpx.AsyncClient, probes: int, method: str
) -> None:
    before = await stored(probes)
    response = await client.request(method, f"{PATH}/{probes}", json={"name": None})
    assert detail_of(response) == refused("string_type", "name")
    assert await stored(probes) == before


@pytest.mark.parametrize(("field", "bits"), INTEGERS.items())
@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_an_integer_past_its_columns_type_is_a_422_on_either_database(
    client: httpx.AsyncClient,
    probes: int,
    caplog: pytest.LogCaptureFixture,
    method: str,
    field: str,
    bits: int,
) -> None:
    # SQLite stores any integer up to 64 bits in any integer column; PostgreSQL's
    # smallint, integer and bigint refuse what is past their bits, and so does the app.
    caplog.set_level(logging.DEBUG)
    path = PATH if method == "POST" else f"{PATH}/{probes}"
    least, most = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for number in (least - 1, most + 1):
        response = await client.request(method, path, json={"name": "n", field: number})
        assert detail_of(response) == refused("out_of_range", field)
        assert str(number) not in caplog.text
    for number in (least, most):
        response = await client.request(method, path, json={"name": "n", field: number})
        assert response.status_code in (200, 201), response.text


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_a_nul_character_is_a_422_on_either_database(
    client: httpx.AsyncClient, probes: int, method: str
) -> None:
    path = PATH if method == "POST" else f"{PATH}/{probes}"
    response = await client.request(method, path, json={"name": "a\x00b"})
    assert response.json() == {
        "detail": [
            {"type": "unstorable", "loc": ["body", "name"], "msg": errors.UNSTORABLE}
        ]
    }


async def test_a_read_with_a_number_past_the_column_is_not_checked_on_sqlite(
    client: httpx.AsyncClient, probes: int
) -> None:
    response = await client.get(PATH, params={"count": 2**40})
    if make_url(DATABASE_URL).get_backend_name() == "sqlite":
        assert response.json() == 0  # reads pay nothing for the writes' check
    else:  # PostgreSQL's driver refuses it before sending
        assert detail_of(response) == [
            {"type": "out_of_range", "loc": ["query", "count"], "msg": ...}
        ]


@pytest.mark.parametrize("path", ["/bug", "/bad-answer"])
async def test_a_bugs_500_is_json_and_says_nothing_of_it(
    client: httpx.AsyncClient, probes: int, path: str
) -> None:
    transport = httpx.ASGITransport(app=main.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as bare:
        response = await bare.get(PATH + path)
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": "Internal Server Error"}
    # The error still leaves the app, for the server to log with its traceback.
    with pytest.raises((RuntimeError, ResponseValidationError)):
        await client.get(PATH + path)

"""The app's wiring: its lifespan, middleware, error answers and routers."""

import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi import FastAPI, HTTPException, Request, Response, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import accounts
from accounts import outbox
from db import database, metadata

logger = logging.getLogger(__name__)

# Settings, each optional (see the README's Configuration table) ---------------------

MAX_BODY_SIZE = int(os.environ.get("MAX_BODY_SIZE", "16384"))  # bytes


def is_origin(value: str) -> bool:
    """Whether `value` is scheme://host[:port], as browsers send it: no path, no user,
    no wildcard ("*" would let any page use its visitors' browsers as log-in guessers)."""
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018  (raises ValueError for a port that is no number)
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and value == f"{parts.scheme}://{parts.netloc}"
        and not {"*", "@"} & set(value)
    )


# Browser front ends on these origins may call the API (with a bearer token).
CORS_ORIGINS = os.environ.get("CORS_ORIGINS", "").replace(",", " ").split()
for origin in CORS_ORIGINS:
    if not is_origin(origin):
        raise ValueError(
            f"CORS_ORIGINS: {origin!r} is not an origin; list each front end's own"
            " as scheme://host[:port], such as https://app.example.com"
        )

MIGRATIONS_HEAD = ScriptDirectory.from_config(
    Config(Path(__file__).with_name("alembic.ini"))
).get_current_head()

# The models and the database: do they agree? ----------------------------------------

MAKEMIGRATIONS = (
    "A model changed without a revision? Run `pipenv run makemigrations`, read the"
    " revision it writes, then `pipenv run migrate`."
)


def described(difference: Any) -> str | None:
    """One of alembic's compare_metadata differences, in words; None for a table of
    no model the app imports (migrations/env.py may import more), which it never uses."""
    if isinstance(difference, list):  # a column's type, nullability or default
        _, _, table, column = difference[0][:4]
        changed = ", ".join(kind.removeprefix("modify_") for kind, *_ in difference)
        return f"column {table}.{column}: its {changed} differs"
    kind, *_, item = difference
    noun = kind.partition("_")[2]  # table, column, index, constraint, fk
    if noun == "column":
        table = difference[2]
        name = f"{table}.{item.name}"
    elif isinstance(item, sqlalchemy.Table):
        table = name = item.name
    elif isinstance(getattr(item, "table", None), sqlalchemy.Table):
        table, name = item.table.name, item.name
    else:  # a table's comment, say
        return f"{kind} on {difference[1]}"
    if kind.startswith("add_"):
        return f"{noun} {name}: in the models, not in the database"
    return (
        f"{noun} {name}: in the database, in no model"
        if table in metadata.tables
        else None
    )


def differences(connection: sqlalchemy.Connection) -> list[str]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    found = (described(d) for d in compare_metadata(context, metadata))
    return [difference for difference in found if difference]


# What differs between the models and the database at the head revision: compared
# once per process, at start-up or by /health (20-50 ms of CPU, tests/benchmark.md).
differences_at_head: list[str] | None = None


async def database_revision() -> str | None:
    async with database.connection() as connection:
        revision: str | None = await connection.scalar(
            sqlalchemy.text("SELECT version_num FROM alembic_version")
        )
    return revision


async def models_differ() -> list[str]:
    """How the models differ from the database, which is at the head revision; the
    first time, a warning in the log that names each difference."""
    global differences_at_head
    if differences_at_head is None:
        async with database.connection() as connection:
            differences_at_head = await connection.run_sync(differences)
        if differences_at_head:
            logger.warning(
                "The models and the database differ: %s. %s",
                "; ".join(differences_at_head),
                MAKEMIGRATIONS,
            )
    return differences_at_head


# The app and its middleware ---------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if not database.is_connected:
        await database.connect()
    try:
        revision = await database_revision()
        if revision == MIGRATIONS_HEAD:
            await models_differ()
        else:
            logger.warning(
                "The database is at revision %s, the migrations' head is %s:"
                " run `pipenv run migrate`.",
                revision,
                MIGRATIONS_HEAD,
            )
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as error:
        # The app starts all the same; /health compares once the database answers.
        logger.warning("Models not compared with the database: %s", error)
    async with outbox.sending():  # mail goes out while the app runs
        yield
    if database.is_connected:
        await database.disconnect()


class BodySizeLimit:
    """Answer 413 to a request body over `max_size` bytes, before it is all read.

    (FastAPI's own `max_body_size` answers plain text when Content-Length is too large.)
    """

    def __init__(self, app: ASGIApp, max_size: int) -> None:
        self.app = app
        self.max_size = max_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = JSONResponse({"detail": "Request body too large"}, 413)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_size:
            return await too_large(scope, receive, send)
        received = 0
        answered = False

        async def receive_within_limit() -> Message:  # counts chunked bodies
            nonlocal received, answered
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_size and not answered:
                answered = True
                await too_large(scope, receive, send)
            return {"type": "http.disconnect"} if answered else message

        async def send_unless_answered(message: Message) -> None:
            if not answered:
                await send(message)

        await self.app(scope, receive_within_limit, send_unless_answered)


# /docs serves Swagger UI from the package, not from a CDN. No /redoc: ReDoc would
# still load its logo from Redocly's.
app = FastAPIOffline(
    title="FastAPI + ormar + alembic",
    lifespan=lifespan,
    generate_unique_id_function=lambda route: route.name,  # operationId: create_user
    redoc_url=None,
)
app.add_middleware(BodySizeLimit, max_size=MAX_BODY_SIZE)
if CORS_ORIGINS:
    app.add_middleware(
        CORSMiddleware,
        allow_origins=CORS_ORIGINS,
        allow_methods=["*"],
        allow_headers=["Authorization", "Content-Type"],
        expose_headers=["Retry-After"],
    )

# Errors: how they are answered, and how the OpenAPI document declares them ----------


class Error(BaseModel):
    detail: str


def unavailable(detail: str = "Service unavailable") -> HTTPException:
    """A 503 that tells the client when to retry."""
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE, detail, headers={"Retry-After": "1"}
    )


# What a 422 says of a value sent that the database refused to store.
OUT_OF_RANGE = "A number out of the range the database can store"
UNSTORABLE = "A value the database cannot store, such as a NUL character"


def public_error(error: dict[str, Any]) -> dict[str, Any]:
    """Which field and what kind of error, never the value sent: it may be a password.

    Where pydantic's message ends with a sub-error's text (an email's reason, a JSON
    parser's complaint), which may quote the value, only the part before it is kept.
    """
    message = error["msg"]
    context = error.get("ctx") or {}
    for quoted in (str(context[key]) for key in ("reason", "error") if key in context):
        message = message.split(quoted)[0].rstrip(" ,:")
    return {"type": error["type"], "loc": error["loc"], "msg": message}


@app.exception_handler(RequestValidationError)
async def validation_failed(
    request: Request, error: RequestValidationError
) -> JSONResponse:
    detail = [public_error(e) for e in error.errors()]
    return JSONResponse({"detail": detail}, status.HTTP_422_UNPROCESSABLE_CONTENT)


def as_integer(value: object) -> int | None:
    """The integer that a value sent stands for, as pydantic reads one ("12", 12.0)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, int | str):
        with contextlib.suppress(ValueError):
            return int(value)
    return None


def wider_than(bits: int) -> Callable[[object], bool]:
    """Whether a value sent is an integer that needs more than `bits` (signed)."""
    limit = 2 ** (bits - 1)

    def wider(value: object) -> bool:
        number = as_integer(value)
        return number is not None and not -limit <= number < limit

    return wider


def has_nul(value: object) -> bool:
    return isinstance(value, str) and "\x00" in value


# The `type` and `msg` of a 422 for a value the database refused, and how to tell
# such a value among the ones sent.
Refusal = tuple[str, str, Callable[[object], bool]]


def refusal(error: Exception) -> Refusal | None:
    """What the database refused, if the error is that it refused a value sent (the
    statement failed: nothing was written)."""
    text = str(getattr(error, "orig", error))
    if isinstance(error, OverflowError) and "SQLite" in text:  # sqlite3: past 64 bits
        return "out_of_range", OUT_OF_RANGE, wider_than(64)
    # PostgreSQL's data exceptions (SQLite stores these values).
    if not str(getattr(getattr(error, "orig", None), "sqlstate", "")).startswith("22"):
        return None
    if bits := re.search(r"out of int(\d+) range", text):  # asyncpg, before sending
        return "out_of_range", OUT_OF_RANGE, wider_than(int(bits[1]))
    return "unstorable", UNSTORABLE, has_nul


def lacks_what_models_have(error: Exception) -> bool:
    """Whether a query failed on a table or column that the database does not have."""
    orig = getattr(error, "orig", None)
    if getattr(orig, "sqlstate", None) in ("42P01", "42703"):  # PostgreSQL
        return True
    missing = ("no such table", "no such column", "has no column named")  # SQLite
    return isinstance(error, sqlalchemy.exc.OperationalError) and any(
        words in str(orig) for words in missing
    )


async def sent_values(request: Request) -> list[tuple[list[str | int], object]]:
    """Every value of the request's path, query and JSON or form body, with its loc.

    Read only when the database refused one: the normal path pays nothing for it.
    """
    found: list[tuple[list[str | int], object]] = []
    found += [(["path", name], value) for name, value in request.path_params.items()]
    found += [
        (["query", name], value) for name, value in request.query_params.multi_items()
    ]
    content_type = request.headers.get("content-type", "")
    try:  # read by the route already (the request keeps it), or read now
        if "json" in content_type:
            found.append((["body"], await request.json()))
        elif "form" in content_type:
            form = (await request.form()).multi_items()
            found += [(["body", name], value) for name, value in form]
    except (ValueError, RuntimeError, ClientDisconnect, StarletteHTTPException):
        pass  # no JSON, or no longer readable: nothing more to point at
    sent = []
    while found:  # JSON's objects and arrays opened, without recursion: any depth
        loc, value = found.pop()
        if isinstance(value, dict):
            found += [([*loc, key], item) for key, item in value.items()]
        elif isinstance(value, list):
            found += [([*loc, index], item) for index, item in enumerate(value)]
        else:
            sent.append((loc, value))
    return sent[::-1]


@app.exception_handler(OverflowError)  # sqlite3: an int past 64 bits
@app.exception_handler(sqlalchemy.exc.DBAPIError)
@app.exception_handler(sqlalchemy.exc.TimeoutError)  # every pooled connection busy
@app.exception_handler(OSError)  # the server cannot be reached
async def database_error(request: Request, error: Exception) -> Response:
    """503 while the database cannot serve: the client may retry, nothing is lost.

    422 for a value sent that the database cannot store (a number out of range, a NUL
    character), with the `loc` of each such value sent; other errors are bugs (500).
    """
    if refused := refusal(error):
        kind, message, looks_refused = refused
        detail = [
            {"type": kind, "loc": loc, "msg": message}
            for loc, value in await sent_values(request)
            if looks_refused(value)
        ]
        # Not found among the values sent (a number computed from them, say).
        detail = detail or [{"type": kind, "loc": [], "msg": message}]
        return JSONResponse({"detail": detail}, 422)
    if isinstance(error, OverflowError):
        raise error  # not the database's: a bug, a 500
    if lacks_what_models_have(error):
        # Not an outage: the code and the database disagree until a migration.
        if not getattr(error, "__notes__", None):  # the app's handler sees it again
            cause = getattr(error, "orig", error)
            note = f"The database lacks a table or column of the models ({cause})."
            error.add_note(f"{note} {MAKEMIGRATIONS}")
            logger.error("%s %s", note, MAKEMIGRATIONS)
        raise error  # a 500, its traceback (ending with the note) in the log
    # A killed connection (a restart, a failover) comes as any DBAPIError that
    # SQLAlchemy marks invalidated; a locked or missing SQLite file as OperationalError.
    outage = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
    lost = getattr(error, "connection_invalidated", False)
    if isinstance(error, sqlalchemy.exc.DBAPIError) and not (
        isinstance(error, outage) or lost
    ):
        raise error  # a bug, not an outage: a 500 with its traceback in the log
    # Operators read the cause in the log; clients learn only when to retry.
    logger.error("database unavailable: %s", error)
    return await http_exception_handler(request, unavailable())


def openapi() -> dict[str, Any]:
    """FastAPI's document, plus the answers routes share, declared here once: 503 on
    every route, 400 and 413 where a body is read, 401 where a token is (`CurrentUser`);
    every error but a 422 shaped `{"detail": "..."}`. A route declares only its own."""
    if app.openapi_schema:
        return app.openapi_schema
    document = FastAPI.openapi(app)
    document["components"]["schemas"]["Error"] = Error.model_json_schema()
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for operation in (o for path in document["paths"].values() for o in path.values()):
        shared = {503}
        if "requestBody" in operation:
            shared |= {400, 413}
        if "security" in operation:
            shared.add(401)
        responses = operation["responses"]
        for code in shared:
            responses.setdefault(str(code), {"description": HTTPStatus(code).phrase})
        for code, response in responses.items():
            if int(code) >= 400 and code != "422":
                response["content"] = error
    return document


app.openapi = openapi  # type: ignore[method-assign]

# Routes -----------------------------------------------------------------------------

app.include_router(accounts.router)


@app.get("/health")
async def health() -> dict[str, str]:
    """Check that the database answers, is migrated to the newest revision, and has
    the tables and columns that the models have."""
    try:
        revision = await database_revision()
        if revision != MIGRATIONS_HEAD:
            raise unavailable("Database migrations are behind")
        if await models_differ():
            raise unavailable("The models and the database differ; see the log")
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as error:
        logger.error("health check failed: %s", error)
        raise unavailable() from None
    return {"status": "ok", "revision": str(revision)}

"""The app's wiring: its lifespan, middleware, error answers and routers."""

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import accounts
from accounts import mail
from core import errors
from core.errors import MAKEMIGRATIONS, unavailable
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
    async with mail.open_outbox():  # mail goes out while the app runs
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

app.add_exception_handler(RequestValidationError, errors.validation_failed)
for fault in errors.DATABASE_FAULTS:
    app.add_exception_handler(fault, errors.database_error)
app.add_exception_handler(500, errors.internal_error)
app.openapi = lambda: errors.openapi(app)  # type: ignore[method-assign]

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

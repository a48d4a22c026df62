"""The app's wiring: its lifespan, middleware, error answers and routers."""

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy
from alembic.config import Config
from alembic.script import ScriptDirectory
from fastapi import FastAPI, HTTPException, Request, Response, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import accounts
from db import database

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

# The app and its middleware ---------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if not database.is_connected:
        await database.connect()
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


@app.exception_handler(sqlalchemy.exc.DBAPIError)
@app.exception_handler(sqlalchemy.exc.TimeoutError)  # every pooled connection busy
@app.exception_handler(OSError)  # the server cannot be reached
async def database_error(request: Request, error: Exception) -> Response:
    """503 while the database cannot serve: the client may retry, nothing is lost.

    422 for a value sent that the database cannot store; other errors are bugs (500).
    """
    if str(getattr(getattr(error, "orig", None), "sqlstate", "")).startswith("22"):
        # PostgreSQL's data exceptions: a NUL character in text, a number out of range
        # (SQLite stores either). The statement failed, so nothing was written.
        unstorable = {"type": "unstorable", "loc": ["body"], "msg": UNSTORABLE}
        return JSONResponse({"detail": [unstorable]}, 422)
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
    """Check that the database answers and is migrated to the newest revision."""
    try:
        async with database.connection() as connection:
            revision = await connection.scalar(
                sqlalchemy.text("SELECT version_num FROM alembic_version")
            )
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as error:
        logger.error("health check failed: %s", error)
        raise unavailable() from None
    if revision != MIGRATIONS_HEAD:
        raise unavailable("Database migrations are behind")
    return {"status": "ok", "revision": revision}

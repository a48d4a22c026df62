"""How errors are answered, and how the OpenAPI document declares them."""

import contextlib
import logging
import re
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, cast

import sqlalchemy
from fastapi import FastAPI, HTTPException, Request, Response, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

logger = logging.getLogger(__name__)

MAKEMIGRATIONS = (
    "A model changed without a revision? Run `pipenv run makemigrations`, read the"
    " revision it writes, then `pipenv run migrate`."
)


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


def public_error(error: Mapping[str, Any]) -> dict[str, Any]:
    """Which field and what kind of error, never the value sent: it may be a password.

    Where pydantic's message ends with a sub-error's text (an email's reason, a JSON
    parser's complaint), which may quote the value, only the part before it is kept.
    """
    message = error["msg"]
    context = error.get("ctx") or {}
    for quoted in (str(context[key]) for key in ("reason", "error") if key in context):
        message = message.split(quoted)[0].rstrip(" ,:")
    return {"type": error["type"], "loc": error["loc"], "msg": message}


async def validation_failed(request: Request, error: Exception) -> JSONResponse:
    detail = [public_error(e) for e in cast(RequestValidationError, error).errors()]
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


# What database_error answers.
DATABASE_FAULTS = (
    OverflowError,  # sqlite3: an int past 64 bits
    sqlalchemy.exc.DBAPIError,
    sqlalchemy.exc.TimeoutError,  # every pooled connection busy
    OSError,  # the server cannot be reached
)


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


def openapi(app: FastAPI) -> dict[str, Any]:
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

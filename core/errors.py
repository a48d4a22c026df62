"""How errors are answered, and how the OpenAPI document declares them."""

import contextlib
import logging
import operator
import re
import traceback
from collections.abc import Callable, Mapping
from functools import partial
from http import HTTPStatus
from typing import Any, cast

import sqlalchemy
from fastapi import FastAPI, HTTPException, Request, Response, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from sqlalchemy.dialects.sqlite.base import SQLiteDialect
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
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE, detail, headers={"Retry-After": "1"}
    )


def public_error(error: Mapping[str, Any]) -> dict[str, Any]:
    """The field and kind of an error, never the value sent: it may be a password."""
    message = error["msg"]
    context = error.get("ctx") or {}
    # A sub-error's text ending the message (an email's reason) may quote the value.
    for quoted in (str(context[key]) for key in ("reason", "error") if key in context):
        message = message.split(quoted)[0].rstrip(" ,:")
    return {"type": error["type"], "loc": error["loc"], "msg": message}


async def validation_failed(request: Request, error: Exception) -> JSONResponse:
    detail = [public_error(e) for e in cast(RequestValidationError, error).errors()]
    return JSONResponse({"detail": detail}, status.HTTP_422_UNPROCESSABLE_CONTENT)


# What a 422 says of a value sent that the database refused to store.
OUT_OF_RANGE = "A number out of the range the database can store"
UNSTORABLE = "A value the database cannot store, such as a NUL character"


def wider_than(bits: int, value: object) -> bool:
    """Whether a value sent is an integer ("12", 12.0) past `bits`, signed."""
    if isinstance(value, str) or (isinstance(value, float) and value.is_integer()):
        with contextlib.suppress(ValueError):
            value = int(value)
    limit = 2 ** (bits - 1)
    return type(value) is int and not -limit <= value < limit  # a bool is no number


def has_nul(value: object) -> bool:
    return isinstance(value, str) and "\x00" in value


class Refused(Exception):
    """A value that PostgreSQL refuses (args: its column's bits, or 0 for a NUL)."""


# PostgreSQL's integer types, in bits, by the models' column types.
INTEGER_BITS = {"small_integer": 16, "integer": 32, "big_integer": 64}


# SQLite's own hooks: PostgreSQL's statements never call it, SQLite's reads return.
@sqlalchemy.event.listens_for(SQLiteDialect, "do_execute")
@sqlalchemy.event.listens_for(SQLiteDialect, "do_executemany")
def refuse_as_postgresql(cursor: Any, sql: str, params: Any, context: Any) -> None:
    """On SQLite, refuse the writes PostgreSQL refuses: answer what production will."""
    if not (context.isinsert or context.isupdate):
        return
    for values in context.compiled_parameters:
        for name, value in values.items():
            bits = INTEGER_BITS.get(context.compiled.binds[name].type.__visit_name__)
            if has_nul(value):
                raise Refused(0)
            if bits and wider_than(bits, value):
                raise Refused(bits)


def refusals(error: Exception) -> list[tuple[dict[str, Any], Callable[[object], bool]]]:
    """What the model or the database refused, if that is the error: for each, a 422's
    error (loc: the model's field, if known) and how to find the value sent."""
    frames = traceback.walk_tb(error.__traceback__)
    if isinstance(error, ValidationError) and any(  # ormar validates what it writes
        frame.f_globals.get("__name__", "").startswith("ormar.") for frame, _ in frames
    ):
        return [
            (public_error(e), partial(operator.eq, e["input"])) for e in error.errors()
        ]
    text = str(getattr(error, "orig", error))
    if isinstance(error, Refused):
        bits = error.args[0]
    elif isinstance(error, OverflowError) and "SQLite" in text:  # sqlite3: past 64 bits
        bits = 64
    elif str(getattr(getattr(error, "orig", None), "sqlstate", "")).startswith("22"):
        # PostgreSQL's data exceptions (SQLite stores these values).
        found = re.search(r"out of int(\d+) range", text)  # asyncpg, before sending
        bits = int(found[1]) if found else 0
    else:
        return []
    if bits:
        answer = {"type": "out_of_range", "loc": [], "msg": OUT_OF_RANGE}
        return [(answer, partial(wider_than, bits))]
    return [({"type": "unstorable", "loc": [], "msg": UNSTORABLE}, has_nul)]


async def sent_values(request: Request) -> list[tuple[list[str | int], object]]:
    """Every value of the request's path, query and JSON or form body, with its loc."""
    found: list[tuple[list[str | int], object]] = []
    found += [(["path", k], v) for k, v in request.path_params.items()]
    found += [(["query", k], v) for k, v in request.query_params.multi_items()]
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
    while found:  # JSON's objects and arrays opened without recursion: any depth
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
    ValidationError,  # a value the model refused
    Refused,
    OverflowError,  # sqlite3: an int past 64 bits
    sqlalchemy.exc.DBAPIError,
    sqlalchemy.exc.TimeoutError,  # every pooled connection busy
    OSError,  # the server cannot be reached
)


async def database_error(request: Request, error: Exception) -> Response:
    """422 for values refused, naming each; 503 while the database cannot serve."""
    if refused := refusals(error):
        sent = await sent_values(request)  # read only now: the normal path pays nothing
        detail = []
        for answer, test in refused:
            field = list(answer["loc"])  # [] or the model's field, [name]
            locs = [loc for loc, v in sent if test(v) and field in ([], loc[-1:])]
            # Not found among the values sent (a number computed from them, say).
            detail += [answer | {"loc": loc} for loc in locs or [field]]
        return JSONResponse({"detail": detail}, 422)
    if isinstance(error, OverflowError | ValidationError):
        raise error  # not the database's: a bug, a 500
    orig = getattr(error, "orig", None)
    missing = ("no such table", "no such column", "has no column named")  # SQLite
    if getattr(orig, "sqlstate", None) in ("42P01", "42703") or (  # PostgreSQL
        isinstance(error, sqlalchemy.exc.OperationalError)
        and any(words in str(orig) for words in missing)
    ):
        # Not an outage: the code and the database disagree until a migration.
        if not getattr(error, "__notes__", None):  # the app's handler sees it again
            note = f"The database lacks a table or column of the models ({orig})."
            error.add_note(f"{note} {MAKEMIGRATIONS}")
            logger.error("%s %s", note, MAKEMIGRATIONS)
        raise error  # a 500, its traceback (ending with the note) in the log
    # Outages: a locked or missing SQLite file, a connection killed (invalidated);
    # and requests at once that PostgreSQL stopped (a deadlock, say): to be retried.
    outage = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
    conflict = str(getattr(orig, "sqlstate", "")).startswith("40")
    lost = getattr(error, "connection_invalidated", False) or conflict
    if isinstance(error, sqlalchemy.exc.DBAPIError) and not (
        isinstance(error, outage) or lost
    ):
        raise error  # a bug, not an outage: a 500 with its traceback in the log
    logger.error("database unavailable: %s", error)  # clients learn only when to retry
    return await http_exception_handler(request, unavailable())


async def internal_error(request: Request, error: Exception) -> Response:
    """A bug's 500, shaped as every other error; the server logs its traceback."""
    return JSONResponse({"detail": "Internal Server Error"}, 500)


def openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the answers that routes share, all `{"detail": ...}`."""
    if app.openapi_schema:
        return app.openapi_schema
    document = FastAPI.openapi(app)
    document["components"]["schemas"]["Error"] = Error.model_json_schema()
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for operation in (o for path in document["paths"].values() for o in path.values()):
        shared = {500, 503}
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

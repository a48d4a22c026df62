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
OUT_OF_RANGE_ERROR = {"type": "out_of_range", "loc": [], "msg": OUT_OF_RANGE}
UNSTORABLE_ERROR = {"type": "unstorable", "loc": [], "msg": UNSTORABLE}


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


# The error a 422 gives for a value that the model or the database refused (its loc:
# the model's field where known), and how to tell that value among the ones sent.
Refusal = tuple[dict[str, Any], Callable[[object], bool]]


class Refused(Exception):
    """A value that SQLite would store and PostgreSQL refuses (args: a Refusal)."""


# PostgreSQL's integer types, in bits, by the models' column types.
INTEGER_BITS = {"small_integer": 16, "integer": 32, "big_integer": 64}


@sqlalchemy.event.listens_for(sqlalchemy.Engine, "before_cursor_execute", named=True)
def refuse_as_postgresql(context: Any, **_: Any) -> None:
    """On SQLite, refuse the writes that PostgreSQL refuses (an integer past its
    column's type, a NUL character in text): the default database answers what
    production will. Reads pass as they are."""
    if context.dialect.name != "sqlite" or not (context.isinsert or context.isupdate):
        return
    for values in context.compiled_parameters:
        for name, value in values.items():
            if has_nul(value):
                raise Refused(UNSTORABLE_ERROR, has_nul)
            column = context.compiled.binds[name].type
            bits = INTEGER_BITS.get(column.__visit_name__, 0)
            if bits and wider_than(bits)(value):
                raise Refused(OUT_OF_RANGE_ERROR, wider_than(bits))


def refusals(error: Exception) -> list[Refusal]:
    """What the model or the database refused, if the error is that it refused values
    sent (nothing was written); none otherwise."""
    frames = traceback.walk_tb(error.__traceback__)
    if isinstance(error, ValidationError) and any(  # ormar validates what it writes
        frame.f_globals.get("__name__", "").startswith("ormar.") for frame, _ in frames
    ):
        return [
            (public_error(e), partial(operator.eq, e["input"])) for e in error.errors()
        ]
    if isinstance(error, Refused):
        return [error.args]
    text = str(getattr(error, "orig", error))
    if isinstance(error, OverflowError) and "SQLite" in text:  # sqlite3: past 64 bits
        return [(OUT_OF_RANGE_ERROR, wider_than(64))]
    # PostgreSQL's data exceptions (SQLite stores these values).
    if not str(getattr(getattr(error, "orig", None), "sqlstate", "")).startswith("22"):
        return []
    if bits := re.search(r"out of int(\d+) range", text):  # asyncpg, before sending
        return [(OUT_OF_RANGE_ERROR, wider_than(int(bits[1])))]
    return [(UNSTORABLE_ERROR, has_nul)]


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

    Read only when a value was refused: the normal path pays nothing for it.
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
    ValidationError,  # a value the model refused
    Refused,
    OverflowError,  # sqlite3: an int past 64 bits
    sqlalchemy.exc.DBAPIError,
    sqlalchemy.exc.TimeoutError,  # every pooled connection busy
    OSError,  # the server cannot be reached
)


async def database_error(request: Request, error: Exception) -> Response:
    """503 while the database cannot serve: the client may retry, nothing is lost.

    422 for a value sent that the model or the database refuses (too long, null, out
    of range, NUL), with the `loc` of each such value sent; other errors are bugs (500).
    """
    if refused := refusals(error):
        sent = await sent_values(request)
        detail = []
        for answer, test in refused:
            field = list(answer["loc"])  # [] or the model's field, [name]
            locs = [loc for loc, v in sent if test(v) and field in ([], loc[-1:])]
            # Not found among the values sent (a number computed from them, say).
            detail += [answer | {"loc": loc} for loc in locs or [field]]
        return JSONResponse({"detail": detail}, 422)
    if isinstance(error, OverflowError | ValidationError):
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


async def internal_error(request: Request, error: Exception) -> Response:
    """A bug's 500, shaped as every other error; the server logs its traceback."""
    return JSONResponse({"detail": "Internal Server Error"}, 500)


def openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, plus the answers routes share, declared here once: 500 and
    503 on every route, 400 and 413 where a body is read, 401 where a token is
    (`CurrentUser`); every error but a 422 shaped `{"detail": "..."}`. A route
    declares only its own."""
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

"""The web app: sign-up, log-in, and the users API over the models in db.py."""

import hashlib
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Self, TypeVar

import anyio.to_thread
import sqlalchemy
from alembic.config import Config
from alembic.script import ScriptDirectory
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi import Path as PathParameter
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import OAuth2PasswordBearer, OAuth2PasswordRequestForm
from pwdlib import PasswordHash
from pwdlib.exceptions import UnknownHashError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from sqlalchemy.exc import IntegrityError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db import Tokens, Users, database

logger = logging.getLogger(__name__)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup quota.

    Not os.cpu_count(), which counts the host's CPUs inside a container.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:  # cgroup v2 (containers): "<quota> <period>", or "max <period>" for none
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


# Settings, each optional (see the README's Configuration table).
TOKEN_LIFETIME = timedelta(hours=float(os.environ.get("TOKEN_LIFETIME_HOURS", "24")))
# argon2 takes ~0.1 s of CPU and 64 MiB per hash: leave a core to the event loop.
HASHING_THREADS = int(
    os.environ.get("PASSWORD_HASHING_THREADS") or max(1, usable_cpus() - 1)
)
# Sign-ups and log-ins waiting for a hashing thread; past this they get a 503 at once.
HASHING_QUEUE = int(os.environ.get("PASSWORD_HASHING_QUEUE", "32"))
MAX_BODY_SIZE = int(os.environ.get("MAX_BODY_SIZE", "16384"))  # bytes
# Ids are 32-bit integers on PostgreSQL; larger numbers are a 422, not a driver error.
MAX_ID = 2**31 - 1

# Emails are compared lower-cased: Alice@Example.COM and alice@example.com are one account.
Email = Annotated[EmailStr, AfterValidator(str.lower), Field(max_length=64)]
Password = Annotated[str, Field(min_length=8, max_length=128)]
email_address = TypeAdapter(Email)


class UserCreate(BaseModel):
    email: Email
    password: Password


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")  # `is_active` and typos are a 422

    # Optional, but not nullable: the schema says so (SkipJsonSchema hides the None).
    email: Email | SkipJsonSchema[None] = None
    password: Password | SkipJsonSchema[None] = None
    current_password: Password | SkipJsonSchema[None] = None

    @field_validator("*", mode="before")
    @classmethod
    def reject_null(cls, value: Any) -> Any:
        # Leave a field out to keep its value; null is not a value for any of them.
        if value is None:
            raise ValueError("must not be null")
        return value

    @model_validator(mode="after")
    def current_password_for_credentials(self) -> Self:
        # A stolen token alone must not be enough to take the account over.
        if (self.email or self.password) and self.current_password is None:
            raise ValueError("current_password is required to change email or password")
        return self


# Public fields are an allowlist: a new column stays private until it is added here.
# Generated from the ormar model; the name keeps the OpenAPI document readable.
UserRead = create_model(
    "UserRead", __base__=Users.get_pydantic(include={"id", "email", "is_active"})
)
USER_COLUMNS = list(UserRead.model_fields)


class Token(BaseModel):
    access_token: str
    token_type: str = "bearer"


class Error(BaseModel):
    detail: str


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error answers a route declares in OpenAPI, all shaped `{"detail": ...}`."""
    return {code: {"model": Error} for code in codes}


password_hash = PasswordHash.recommended()  # argon2id
# Verified for unknown emails, so that they cost what a real account costs.
DUMMY_HASH = password_hash.hash(secrets.token_urlsafe())
hashing_limiter = anyio.CapacityLimiter(HASHING_THREADS)
T = TypeVar("T")


async def in_hashing_thread(function: Callable[..., T], *args: str) -> T:
    """Run a password hash or check on a hashing thread, or answer 503 when too busy."""
    if hashing_limiter.statistics().tasks_waiting >= HASHING_QUEUE:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "Too many sign-ups and log-ins at once; retry shortly",
            headers={"Retry-After": "1"},
        )
    return await anyio.to_thread.run_sync(function, *args, limiter=hashing_limiter)


def verify_password(password: str, stored_hash: str) -> tuple[bool, str | None]:
    """Whether the password matches, and a new hash if the stored one is outdated."""
    try:
        return password_hash.verify_and_update(password, stored_hash)
    except UnknownHashError:  # not a hash this app wrote: nothing matches it
        return False, None


def token_digest(token: str) -> str:
    # Only digests are stored: a leaked database hands out no usable token.
    return hashlib.sha256(token.encode()).hexdigest()


NOT_AUTHENTICATED = HTTPException(
    status.HTTP_401_UNAUTHORIZED,
    "Not authenticated",
    headers={"WWW-Authenticate": "Bearer"},
)
# Answers a missing or non-Bearer Authorization header with the same 401 as above.
bearer_token = OAuth2PasswordBearer(tokenUrl="auth/token")


async def presented_digest(token: Annotated[str, Depends(bearer_token)]) -> str:
    return token_digest(token)


PresentedDigest = Annotated[str, Depends(presented_digest)]


async def current_user(
    digest: PresentedDigest,
) -> dict[str, Any]:
    """The active user that the bearer token belongs to, in one query, or a 401."""
    users, tokens = Users.ormar_config.table, Tokens.ormar_config.table
    query = (
        sqlalchemy.select(*(users.c[name] for name in USER_COLUMNS))
        .join(tokens)
        .where(
            tokens.c.digest == digest,
            tokens.c.expires_at > datetime.now(UTC),
            users.c.is_active,
        )
    )
    # SQLAlchemy Core, on every request: half the time of the same query through ormar
    # (tests/benchmark.md). AUTOCOMMIT: a lone read needs no BEGIN and ROLLBACK.
    engine = database.engine.execution_options(isolation_level="AUTOCOMMIT")
    async with engine.connect() as connection:
        user = (await connection.execute(query)).mappings().first()
    if user is None:
        raise NOT_AUTHENTICATED
    return dict(user)


CurrentUser = Annotated[dict[str, Any], Depends(current_user)]


@contextmanager
def email_must_be_free() -> Iterator[None]:
    """Answer 409 when a write breaks the unique email constraint.

    The database decides, so two requests racing for one address cannot both succeed.
    """
    try:
        yield
    except IntegrityError as error:
        postgresql_code = getattr(error.orig, "sqlstate", None)
        sqlite_code = getattr(error.orig, "sqlite_errorname", None)
        if postgresql_code == "23505" or sqlite_code == "SQLITE_CONSTRAINT_UNIQUE":
            raise HTTPException(
                status.HTTP_409_CONFLICT, "Email already registered"
            ) from None
        raise


MIGRATIONS_HEAD = ScriptDirectory.from_config(
    Config(Path(__file__).with_name("alembic.ini"))
).get_current_head()


def use_wal(connection: Any, _: Any) -> None:
    # WAL lets readers go on while one writer writes; it is stored in the file.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if not database.is_connected:
        await database.connect()
    if database.dialect.name == "sqlite":
        # On each new connection, not once here: the app starts even when the
        # database cannot be opened yet, and answers 503 until it can.
        sqlalchemy.event.listen(database.engine.sync_engine, "connect", use_wal)
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


app = FastAPI(
    title="FastAPI + ormar + alembic",
    lifespan=lifespan,
    generate_unique_id_function=lambda route: route.name,  # operationId: create_user
)
app.add_middleware(BodySizeLimit, max_size=MAX_BODY_SIZE)


@app.exception_handler(RequestValidationError)
async def validation_failed(
    request: Request, error: RequestValidationError
) -> JSONResponse:
    # Which field and why, never the value sent: it may be a password (or NaN).
    detail = [{key: e[key] for key in ("type", "loc", "msg")} for e in error.errors()]
    return JSONResponse({"detail": detail}, status.HTTP_422_UNPROCESSABLE_CONTENT)


@app.exception_handler(sqlalchemy.exc.DBAPIError)
@app.exception_handler(sqlalchemy.exc.TimeoutError)  # every pooled connection busy
@app.exception_handler(OSError)  # the server cannot be reached
async def database_unavailable(request: Request, error: Exception) -> JSONResponse:
    """503 while the database cannot serve: the client may retry, nothing is lost."""
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
    return JSONResponse(
        {"detail": "Service unavailable"},
        status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "1"},
    )


@app.post(
    "/users",
    response_model=UserRead,
    status_code=status.HTTP_201_CREATED,
    responses=errors(400, 409, 413, 503),
)
async def create_user(body: UserCreate) -> Users:
    password = await in_hashing_thread(password_hash.hash, body.password)
    with email_must_be_free():
        return await Users.objects.create(email=body.email, password=password)


@app.post("/auth/token", responses=errors(400, 401, 413, 503))
async def log_in(
    form: Annotated[OAuth2PasswordRequestForm, Depends()], response: Response
) -> Token:
    """Log in with the email as `username`; answers a bearer token."""
    try:  # the same rules as at sign-up: what could not sign up is no account
        email = email_address.validate_python(form.username)
    except ValidationError:  # (and PostgreSQL refuses text with a NUL byte)
        email = None
    user = await Users.objects.get_or_none(email=email) if email else None
    stored_hash = user.password if user else DUMMY_HASH
    valid, new_hash = await in_hashing_thread(
        verify_password, form.password, stored_hash
    )
    if user is None or not valid or not user.is_active:
        raise NOT_AUTHENTICATED
    if new_hash:  # made with older argon2 parameters
        await Users.objects.filter(id=user.id).update(password=new_hash)
    now = datetime.now(UTC)
    await Tokens.objects.filter(user=user.id, expires_at__lte=now).delete()
    token = secrets.token_urlsafe(32)
    await Tokens.objects.create(
        digest=token_digest(token),
        user=user.id,
        created_at=now,
        expires_at=now + TOKEN_LIFETIME,
    )
    response.headers["Cache-Control"] = "no-store"
    return Token(access_token=token)


@app.delete(
    "/auth/token",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(401, 503),
    dependencies=[Depends(current_user)],
)
async def log_out(digest: PresentedDigest) -> None:
    """End this token's session at once."""
    await Tokens.objects.delete(digest=digest)


@app.get("/users/me", response_model=UserRead, responses=errors(401, 503))
async def read_me(me: CurrentUser) -> dict[str, Any]:
    return me


@app.patch(
    "/users/me", response_model=UserRead, responses=errors(400, 401, 403, 409, 413, 503)
)
async def update_me(
    body: UserUpdate,
    me: CurrentUser,
    digest: PresentedDigest,
) -> dict[str, Any]:
    """Change the email or the password; both need `current_password`."""
    changes = body.model_dump(exclude_unset=True, exclude={"current_password"})
    if not changes:
        return me
    user = await Users.objects.get_or_none(id=me["id"])
    if user is None:  # deleted by a request that ran meanwhile
        raise NOT_AUTHENTICATED
    valid, _ = await in_hashing_thread(
        verify_password, body.current_password or "", user.password
    )
    if not valid:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Wrong current password")
    if "password" in changes:
        changes["password"] = await in_hashing_thread(
            password_hash.hash, changes["password"]
        )
    async with database.transaction():
        with email_must_be_free():
            await Users.objects.filter(id=me["id"]).update(**changes)
        if "password" in changes:  # every other session ends with the old password
            await Tokens.objects.filter(user=me["id"]).exclude(digest=digest).delete()
    return me | {key: value for key, value in changes.items() if key in me}


@app.delete(
    "/users/me", status_code=status.HTTP_204_NO_CONTENT, responses=errors(401, 503)
)
async def delete_me(me: CurrentUser) -> None:
    """Delete the account; its tokens go with it (ON DELETE CASCADE)."""
    await Users.objects.delete(id=me["id"])


# UserRead is built at run time, which mypy cannot follow.
@app.get(
    "/users",
    response_model=list[UserRead],  # type: ignore[valid-type]
    responses=errors(401, 503),
    dependencies=[Depends(current_user)],
)
async def list_users(
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> list[dict[str, Any]]:
    # Rows as dicts of UserRead's columns: no model per row, 1.6x the requests/s.
    page = Users.objects.order_by("id").limit(limit).offset(offset)
    return await page.values(USER_COLUMNS)


@app.get(
    "/users/{user_id}",
    response_model=UserRead,
    responses=errors(401, 404, 503),
    dependencies=[Depends(current_user)],
)
async def read_user(
    user_id: Annotated[int, PathParameter(ge=1, le=MAX_ID)],
) -> dict[str, Any]:
    rows = await Users.objects.filter(id=user_id).values(USER_COLUMNS)
    if not rows:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "User not found")
    user: dict[str, Any] = rows[0]
    return user


@app.get("/health", responses=errors(503))
async def health() -> dict[str, str]:
    """Check that the database answers and is migrated to the newest revision."""
    try:
        async with database.connection() as connection:
            revision = await connection.scalar(
                sqlalchemy.text("SELECT version_num FROM alembic_version")
            )
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as error:
        logger.error("health check failed: %s", error)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "Service unavailable",
            headers={"Retry-After": "1"},
        ) from None
    if revision != MIGRATIONS_HEAD:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "Database migrations are behind"
        )
    return {"status": "ok", "revision": revision}

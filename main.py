"""The web app: sign-up, log-in and each user's own account, over the models in db.py."""

import hashlib
import json
import logging
import math
import os
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Self, TypeVar

import anyio.to_thread
import sqlalchemy
from alembic.config import Config
from alembic.script import ScriptDirectory
from fastapi import Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
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
    model_validator,
)
from pydantic_core import PydanticCustomError
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db import LogInAttempts, Tokens, Users, database

logger = logging.getLogger(__name__)

# Settings, each optional (see the README's Configuration table) ---------------------

TOKEN_LIFETIME = timedelta(hours=float(os.environ.get("TOKEN_LIFETIME_HOURS", "24")))
# Live sessions per account; a log-in past the bound ends the oldest.
SESSIONS_PER_USER = int(os.environ.get("SESSIONS_PER_USER", "10"))
# Sign-ups and log-ins waiting for a hashing thread; past this they get a 503 at once.
HASHING_QUEUE = int(os.environ.get("PASSWORD_HASHING_QUEUE", "32"))
# Of those, how many one client address may have waiting or running; past it, a 429.
HASHING_SHARE = int(os.environ.get("PASSWORD_HASHING_SHARE", "4"))
# Log-ins per account and client address (wrong passwords) that may come within
# LOG_IN_PERIOD of each other; past that, a 429 until a period after the last one.
LOG_IN_ATTEMPTS = int(os.environ.get("LOG_IN_ATTEMPTS", "10"))
LOG_IN_PERIOD = timedelta(minutes=float(os.environ.get("LOG_IN_PERIOD_MINUTES", "15")))
# Seconds a 429 waits before it is sent: a client that ignores Retry-After then costs
# one request a second per connection, not hundreds (tests/benchmark.md).
REFUSAL_PAUSE = 1.0
MAX_BODY_SIZE = int(os.environ.get("MAX_BODY_SIZE", "16384"))  # bytes
# Browser front ends on these origins may call the API (with a bearer token).
CORS_ORIGINS = os.environ.get("CORS_ORIGINS", "").replace(",", " ").split()

# Schemas: what clients send and what they get back ---------------------------------

# Emails are compared lower-cased: Alice@Example.COM and alice@example.com are one account.
Email = Annotated[EmailStr, AfterValidator(str.lower), Field(max_length=64)]
Password = Annotated[str, Field(min_length=8, max_length=128)]
email_address = TypeAdapter(Email)


class UserCreate(BaseModel):
    email: Email
    password: Password


class UserUpdate(BaseModel):
    """Leave a field out (or null) to keep its value."""

    model_config = ConfigDict(extra="forbid")  # `is_active` and typos are a 422

    email: Email | None = None
    password: Password | None = None
    current_password: Password | None = None

    @model_validator(mode="after")
    def current_password_for_credentials(self) -> Self:
        # A stolen token alone must not be enough to take the account over.
        if (self.email or self.password) and self.current_password is None:
            raise PydanticCustomError(
                "current_password_missing",
                "current_password is required to change email or password",
            )
        return self


class UserDelete(BaseModel):
    current_password: Password


# Public fields are an allowlist: a new column stays private until it is added here.
# Generated from the ormar model; the name keeps the OpenAPI document readable.
UserRead = create_model(
    "UserRead", __base__=Users.get_pydantic(include={"id", "email", "is_active"})
)


class Token(BaseModel):
    access_token: str
    token_type: str = "bearer"


class Error(BaseModel):
    detail: str


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error answers a route declares in OpenAPI, all shaped `{"detail": ...}`."""
    return {code: {"model": Error} for code in codes}


def unavailable(detail: str = "Service unavailable") -> HTTPException:
    """A 503 that tells the client when to retry."""
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE, detail, headers={"Retry-After": "1"}
    )


def too_many_requests(detail: str, seconds: int = 1) -> HTTPException:
    """A 429 that tells the client how many seconds to wait."""
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS, detail, headers={"Retry-After": str(seconds)}
    )


# Passwords and tokens ---------------------------------------------------------------


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


# argon2 takes ~0.1 s of CPU and 64 MiB per hash: leave a core to the event loop.
HASHING_THREADS = int(
    os.environ.get("PASSWORD_HASHING_THREADS") or max(1, usable_cpus() - 1)
)
password_hash = PasswordHash.recommended()  # argon2id
# Verified for unknown emails, so that they cost what a real account costs.
DUMMY_HASH = password_hash.hash(secrets.token_urlsafe())
hashing_limiter = anyio.CapacityLimiter(HASHING_THREADS)
# Client address -> its hashes waiting or running in this process.
hashing_places: Counter[str] = Counter()
T = TypeVar("T")


async def in_hashing_thread(
    client: str,
    function: Callable[..., T],
    *args: str,
    first: Callable[[], Awaitable[object]] | None = None,
) -> T:
    """Run a password hash or check on a hashing thread, after `first` if given.

    503 when the queue is full; 429 when the client's address holds its share of it,
    before `first` runs: a flood from one address writes nothing and keeps no one else
    waiting for long.
    """
    if hashing_limiter.statistics().tasks_waiting >= HASHING_QUEUE:
        raise unavailable("Too many sign-ups and log-ins at once; retry shortly")
    if hashing_places[client] >= HASHING_SHARE:
        await anyio.sleep(REFUSAL_PAUSE)
        raise too_many_requests("Too many sign-ups and log-ins from your address")
    hashing_places[client] += 1
    try:
        if first is not None:
            await first()
        return await anyio.to_thread.run_sync(function, *args, limiter=hashing_limiter)
    finally:
        hashing_places[client] -= 1
        if not hashing_places[client]:
            del hashing_places[client]


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


async def current_user(digest: PresentedDigest) -> Users:
    """The active user that the bearer token belongs to, in one query, or a 401."""
    users, tokens = Users.ormar_config.table, Tokens.ormar_config.table
    query = (
        sqlalchemy.select(users)
        .join(tokens)
        .where(
            tokens.c.digest == digest,
            tokens.c.expires_at > datetime.now(UTC),
            users.c.is_active,
        )
    )
    # One SQLAlchemy Core query, on every request (tests/benchmark.md has the figures).
    if database.dialect.name == "sqlite":
        # The engine is AUTOCOMMIT already (db.py): a plain connection spares the
        # executor's switch to it and back, two trips to aiosqlite's thread.
        async with database.connection() as connection:
            row = (await connection.execute(query)).mappings().first()
    else:  # the AUTOCOMMIT executor spares asyncpg a BEGIN and a ROLLBACK
        async with database.get_query_executor() as executor:
            row = await executor.fetch_one(query)
    if row is None:
        raise NOT_AUTHENTICATED
    return Users(**row)


CurrentUser = Annotated[Users, Depends(current_user)]


async def client_address(request: Request) -> str:
    """The client's address as uvicorn reports it: behind a proxy, the proxy's own
    unless uvicorn trusts its headers (the README's Production section)."""
    return request.client.host if request.client else ""


ClientAddress = Annotated[str, Depends(client_address)]


def log_in_key(client: str, username: str) -> str:
    """What log-ins are counted by: the address and the account as typed, digested."""
    return hashlib.sha256(json.dumps([client, username]).encode()).hexdigest()


async def count_log_in(key: str) -> None:
    """Count a log-in before its password is checked; 429 past LOG_IN_ATTEMPTS.

    One statement counts and reads the count, so concurrent guesses cannot pass the
    bound together. A refused log-in is not let through later than a period after
    the last one that was: it does not move the time on.
    """
    table = LogInAttempts.ormar_config.table
    now = datetime.now(UTC)
    over = table.c.last_attempt_at <= now - LOG_IN_PERIOD
    allowed = over | (table.c.attempts < LOG_IN_ATTEMPTS)
    dialect = postgresql if database.dialect.name == "postgresql" else sqlite
    upsert = dialect.insert(table).values(digest=key, attempts=1, last_attempt_at=now)
    changes = {
        "attempts": sqlalchemy.case(
            (over, 1), (allowed, table.c.attempts + 1), else_=LOG_IN_ATTEMPTS + 1
        ),
        "last_attempt_at": sqlalchemy.case(
            (allowed, sqlalchemy.literal(now, table.c.last_attempt_at.type)),
            else_=table.c.last_attempt_at,
        ),
    }
    upsert = upsert.on_conflict_do_update(index_elements=[table.c.digest], set_=changes)
    async with database.get_query_executor() as executor:
        row = await executor.fetch_one(upsert.returning(*table.c))
    assert row is not None
    if row["attempts"] > LOG_IN_ATTEMPTS:
        last = row["last_attempt_at"]  # naive from SQLite, which stores UTC
        wait = last.replace(tzinfo=last.tzinfo or UTC) + LOG_IN_PERIOD - now
        detail = "Too many log-ins for this account; retry later"
        await anyio.sleep(REFUSAL_PAUSE)  # holding the address's place in the queue
        raise too_many_requests(detail, max(1, math.ceil(wait.total_seconds())))


async def end_log_in_counts(key: str | None = None) -> None:
    """Delete every count whose period is over, and `key`'s (a right password)."""
    table = LogInAttempts.ormar_config.table
    ended = table.c.last_attempt_at <= datetime.now(UTC) - LOG_IN_PERIOD
    if key is not None:
        ended = ended | (table.c.digest == key)
    async with database.get_query_executor() as executor:
        await executor.execute(table.delete().where(ended))


async def check_current_password(user: Users, password: str, client: str) -> None:
    valid, _ = await in_hashing_thread(client, verify_password, password, user.password)
    if not valid:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Wrong current password")


async def changed_meanwhile(user: Users) -> HTTPException:
    """The answer to a write whose condition (the password verified) no longer held."""
    if await Users.objects.filter(id=user.id).exists():
        return HTTPException(
            status.HTTP_409_CONFLICT, "The account changed meanwhile; log in again"
        )
    return NOT_AUTHENTICATED  # deleted meanwhile


async def start_session(user_id: int, verified_hash: str, digest: str) -> bool:
    """Store a session for the user if it is still active with the password verified.

    The check is part of the INSERT, so an account deleted, deactivated or given a new
    password since the check gets no session. Also ends expired sessions (everyone's)
    and, past SESSIONS_PER_USER, this user's oldest.
    """
    users, tokens = Users.ormar_config.table, Tokens.ormar_config.table
    now = datetime.now(UTC)
    account = sqlalchemy.select(
        users.c.id,
        sqlalchemy.literal(digest, tokens.c.digest.type),
        sqlalchemy.literal(now, tokens.c.created_at.type),
        sqlalchemy.literal(now + TOKEN_LIFETIME, tokens.c.expires_at.type),
    ).where(users.c.id == user_id, users.c.password == verified_hash, users.c.is_active)
    # PostgreSQL: a password change in progress commits before this reads the row.
    account = account.with_for_update(read=True)
    columns = ["user_id", "digest", "created_at", "expires_at"]
    newest = (
        sqlalchemy.select(tokens.c.digest)
        .where(tokens.c.user_id == user_id)
        .order_by(tokens.c.created_at.desc())
        .limit(SESSIONS_PER_USER)
    )
    async with database.transaction(), database.connection() as connection:
        inserted = await connection.execute(
            tokens.insert().from_select(columns, account)
        )
        if inserted.rowcount != 1:
            return False
        await connection.execute(tokens.delete().where(tokens.c.expires_at <= now))
        await connection.execute(
            tokens.delete().where(
                tokens.c.user_id == user_id, tokens.c.digest.not_in(newest)
            )
        )
    return True


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


# The app, its middleware and error handlers -----------------------------------------

MIGRATIONS_HEAD = ScriptDirectory.from_config(
    Config(Path(__file__).with_name("alembic.ini"))
).get_current_head()


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


app = FastAPI(
    title="FastAPI + ormar + alembic",
    lifespan=lifespan,
    generate_unique_id_function=lambda route: route.name,  # operationId: create_user
    responses=errors(503),  # any route, while the database is out of reach
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


# Routes -----------------------------------------------------------------------------


@app.post(
    "/users",
    response_model=UserRead,
    status_code=status.HTTP_201_CREATED,
    responses=errors(400, 409, 413, 429),
)
async def create_user(body: UserCreate, client: ClientAddress) -> Users:
    """Sign up."""
    password = await in_hashing_thread(client, password_hash.hash, body.password)
    with email_must_be_free():
        return await Users.objects.create(email=body.email, password=password)


@app.post("/auth/token", responses=errors(400, 401, 413, 429))
async def log_in(
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    response: Response,
    client: ClientAddress,
) -> Token:
    """Log in with the email as `username`; answers a bearer token."""
    try:  # the same rules as at sign-up: what could not sign up is no account
        email = email_address.validate_python(form.username)
    except ValidationError:  # (and PostgreSQL refuses text with a NUL byte)
        email = None
    key = log_in_key(client, email or form.username)  # unknown emails count alike
    user = await Users.objects.get_or_none(email=email) if email else None
    stored_hash = user.password if user else DUMMY_HASH
    valid, new_hash = await in_hashing_thread(
        client,
        verify_password,
        form.password,
        stored_hash,
        first=lambda: count_log_in(key),
    )
    if user is None or not valid or not user.is_active:
        await end_log_in_counts()
        raise NOT_AUTHENTICATED
    await end_log_in_counts(key)  # a right password: counting starts again
    rehashed = Users.objects.filter(id=user.id, password=stored_hash)
    if new_hash and await rehashed.update(password=new_hash):  # older parameters
        stored_hash = new_hash
    token = secrets.token_urlsafe(32)
    if not await start_session(user.id, stored_hash, token_digest(token)):
        raise NOT_AUTHENTICATED  # deleted, deactivated or its password changed
    response.headers["Cache-Control"] = "no-store"
    return Token(access_token=token)


@app.delete(
    "/auth/token",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(401),
    dependencies=[Depends(current_user)],
)
async def log_out(digest: PresentedDigest) -> None:
    """End this token's session at once."""
    await Tokens.objects.delete(digest=digest)


@app.get("/users/me", response_model=UserRead, responses=errors(401))
async def read_me(me: CurrentUser) -> Users:
    return me


@app.patch(
    "/users/me",
    response_model=UserRead,
    responses=errors(400, 401, 403, 409, 413, 429),
)
async def update_me(
    body: UserUpdate, me: CurrentUser, digest: PresentedDigest, client: ClientAddress
) -> Users:
    """Change the email or the password; both need `current_password`."""
    changes = body.model_dump(exclude_none=True, exclude={"current_password"})
    if not changes:
        return me
    await check_current_password(me, body.current_password or "", client)
    if "password" in changes:
        changes["password"] = await in_hashing_thread(
            client, password_hash.hash, changes["password"]
        )
    async with database.transaction():
        # Only if the password is still the one just verified: of two changes at
        # once, one wins and the other gets a 409.
        verified = Users.objects.filter(id=me.id, password=me.password)
        with email_must_be_free():
            if not await verified.update(**changes):
                raise await changed_meanwhile(me)
        if "password" in changes:  # every other session ends with the old password
            await Tokens.objects.filter(user=me.id).exclude(digest=digest).delete()
    me.update_from_dict(changes)
    return me


@app.delete(
    "/users/me",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(400, 401, 403, 409, 413, 429),
)
async def delete_me(body: UserDelete, me: CurrentUser, client: ClientAddress) -> None:
    """Delete the account (needs `current_password`); its sessions go with it."""
    await check_current_password(me, body.current_password, client)
    if not await Users.objects.filter(id=me.id, password=me.password).delete():
        raise await changed_meanwhile(me)


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

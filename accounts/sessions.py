"""Log-in sessions: random bearer tokens, stored as digests, and the current user."""

import hashlib
from datetime import UTC, datetime
from typing import Annotated, Any

import sqlalchemy
from fastapi import Depends, HTTPException, status
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy.dialects import postgresql, sqlite

from accounts.models import Devices, Tokens
from core.settings import settings
from db import Users, database

NOT_AUTHENTICATED = HTTPException(
    status.HTTP_401_UNAUTHORIZED, "Not authenticated", {"WWW-Authenticate": "Bearer"}
)
# Answers a missing or non-Bearer Authorization header with the same 401 as above.
bearer_token = OAuth2PasswordBearer(tokenUrl="auth/token")


def token_digest(token: str) -> str:
    # Only digests are stored: a leaked database hands out no usable token.
    return hashlib.sha256(token.encode()).hexdigest()


async def presented_digest(token: Annotated[str, Depends(bearer_token)]) -> str:
    return token_digest(token)


PresentedDigest = Annotated[str, Depends(presented_digest)]


async def current_user(digest: PresentedDigest) -> Users:
    """The active user that the bearer token belongs to, in one query, or a 401."""
    users, tokens = Users.ormar_config.table, Tokens.ormar_config.table
    live = (tokens.c.digest == digest) & (tokens.c.expires_at > datetime.now(UTC))
    query = sqlalchemy.select(users).join(tokens).where(live, users.c.is_active)
    # One SQLAlchemy Core query, on every request (tests/benchmark.md has the figures).
    if database.dialect.name == "sqlite":
        # AUTOCOMMIT already (db.py): spares the executor's two trips to its thread.
        async with database.connection() as connection:
            row = (await connection.execute(query)).mappings().first()
    else:  # the AUTOCOMMIT executor spares asyncpg a BEGIN and a ROLLBACK
        async with database.get_query_executor() as executor:
            row = await executor.fetch_one(query)
    if row is None:
        raise NOT_AUTHENTICATED
    return Users(**row)


# The logged-in user, for any route: `me: CurrentUser` (401 without a valid token).
CurrentUser = Annotated[Users, Depends(current_user)]


def surplus(table: sqlalchemy.Table, user_id: int, by: Any) -> Any:
    """The user's rows past the SESSIONS_PER_USER newest `by` that column."""
    newest = sqlalchemy.select(table.c.digest).where(table.c.user_id == user_id)
    newest = newest.order_by(by.desc()).limit(settings.SESSIONS_PER_USER)
    return (table.c.user_id == user_id) & table.c.digest.not_in(newest)


async def start_session(
    user_id: int, verified_hash: str, digest: str, device: str | None = None
) -> bool:
    """Store a session if the account is still active, verified, with the password
    verified (a condition of the INSERT); note the `device`; end surplus sessions."""
    users, tokens = Users.ormar_config.table, Tokens.ormar_config.table
    devices = Devices.ormar_config.table
    now = datetime.now(UTC)
    still = [users.c.password == verified_hash, users.c.is_active, users.c.is_verified]
    account = sqlalchemy.select(
        users.c.id,
        sqlalchemy.literal(digest, tokens.c.digest.type),
        sqlalchemy.literal(now, tokens.c.created_at.type),
        sqlalchemy.literal(now + settings.TOKEN_LIFETIME, tokens.c.expires_at.type),
    ).where(users.c.id == user_id, *still)
    # PostgreSQL: a password change in progress commits before this reads the row.
    account = account.with_for_update(read=True)
    columns = ["user_id", "digest", "created_at", "expires_at"]
    ended = (tokens.c.expires_at <= now) | surplus(tokens, user_id, tokens.c.created_at)
    async with database.transaction(), database.connection() as connection:
        insert = tokens.insert().from_select(columns, account)
        if (await connection.execute(insert)).rowcount != 1:
            return False
        await connection.execute(tokens.delete().where(ended))
        if device is not None:
            # New, or known (used now): one statement, so log-ins at once store it once.
            dialect = postgresql if database.dialect.name == "postgresql" else sqlite
            row = {"digest": device, "user_id": user_id, "last_used_at": now}
            used = dialect.insert(devices).values(row)
            await connection.execute(
                used.on_conflict_do_update(index_elements=["digest"], set_=row)
            )
            old = surplus(devices, user_id, devices.c.last_used_at)
            await connection.execute(devices.delete().where(old))
    return True

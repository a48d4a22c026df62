"""Log-in sessions: random bearer tokens, stored as digests, and the current user."""

import hashlib
from datetime import UTC, datetime
from typing import Annotated

import sqlalchemy
from fastapi import Depends, HTTPException, status
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy.dialects import postgresql, sqlite

from accounts.models import Devices, Tokens
from core.settings import settings
from db import Users, database

NOT_AUTHENTICATED = HTTPException(
    status.HTTP_401_UNAUTHORIZED,
    "Not authenticated",
    headers={"WWW-Authenticate": "Bearer"},
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


# The logged-in user, for any route: `me: CurrentUser` (401 without a valid token).
CurrentUser = Annotated[Users, Depends(current_user)]


async def start_session(
    user_id: int, verified_hash: str, digest: str, device: str | None = None
) -> bool:
    """Store a session for the user if it is still active and verified, with the
    password verified, and note the log-in of the client's device (its digest) if given.

    The check is part of the INSERT, so an account deleted, deactivated or given a new
    password since the check gets no session. Also ends expired sessions (everyone's)
    and, past SESSIONS_PER_USER, this user's oldest sessions and the devices used
    longest ago.
    """
    users, tokens = Users.ormar_config.table, Tokens.ormar_config.table
    devices = Devices.ormar_config.table
    now = datetime.now(UTC)
    account = sqlalchemy.select(
        users.c.id,
        sqlalchemy.literal(digest, tokens.c.digest.type),
        sqlalchemy.literal(now, tokens.c.created_at.type),
        sqlalchemy.literal(now + settings.TOKEN_LIFETIME, tokens.c.expires_at.type),
    ).where(
        users.c.id == user_id,
        users.c.password == verified_hash,
        users.c.is_active,
        users.c.is_verified,
    )
    # PostgreSQL: a password change in progress commits before this reads the row.
    account = account.with_for_update(read=True)
    columns = ["user_id", "digest", "created_at", "expires_at"]
    newest = (
        sqlalchemy.select(tokens.c.digest)
        .where(tokens.c.user_id == user_id)
        .order_by(tokens.c.created_at.desc())
        .limit(settings.SESSIONS_PER_USER)
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
        if device is not None:
            # New, or known: one statement, so that log-ins at once store it once.
            dialect = postgresql if database.dialect.name == "postgresql" else sqlite
            used = dialect.insert(devices).values(
                digest=device, user_id=user_id, last_used_at=now
            )
            await connection.execute(
                used.on_conflict_do_update(
                    index_elements=[devices.c.digest], set_={"last_used_at": now}
                )
            )
            recently_used = (
                sqlalchemy.select(devices.c.digest)
                .where(devices.c.user_id == user_id)
                .order_by(devices.c.last_used_at.desc())
                .limit(settings.SESSIONS_PER_USER)
            )
            await connection.execute(
                devices.delete().where(
                    devices.c.user_id == user_id,
                    devices.c.digest.not_in(recently_used),
                )
            )
    return True

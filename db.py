"""The database connection, the metadata, and the `Users` model."""

import contextlib
import os
from datetime import datetime
from typing import Any

import ormar
import sqlalchemy

from core.settings import settings

DATABASE_URL = settings.DATABASE_URL

if DATABASE_URL.startswith("sqlite"):
    # The file holds emails and password hashes: create it readable by its owner only
    # (SQLite gives its -wal and -shm files the same mode).
    path = sqlalchemy.make_url(DATABASE_URL).database
    if path and path != ":memory:" and not os.path.exists(path):
        with contextlib.suppress(OSError):  # then connecting reports the problem
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    # WAL (readers go on while one writer writes) is a setting of the file itself:
    # migrations/env.py sets it when it migrates.
    engine_options: dict[str, Any] = {
        # Concurrent writers wait up to 5 s for SQLite's single write lock instead of
        # failing at once with "database is locked".
        "connect_args": {"timeout": 5},
        # A lone read or write needs no BEGIN and COMMIT; ormar's transactions still
        # send BEGIN (a test checks that they roll back).
        "isolation_level": "AUTOCOMMIT",
    }
else:
    engine_options = {
        # A fixed-size pool: overflow connections are opened and closed per request.
        "pool_size": settings.DATABASE_POOL_SIZE,
        "max_overflow": settings.DATABASE_MAX_OVERFLOW,
        # asyncpg waits 60 s for a server that drops packets; answer 503 sooner.
        "connect_args": {"timeout": 5},
    }

# Error messages (and so the logs) leave out query parameters: emails, hashes.
database = ormar.DatabaseConnection(
    DATABASE_URL, hide_parameters=True, **engine_options
)

# Named constraints, so that migrations (batch mode on SQLite) can drop them later.
metadata = sqlalchemy.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# What ormar's docs call `base_ormar_config`; every model copies it.
BaseMeta = ormar.OrmarConfig(database=database, metadata=metadata)


class Users(ormar.Model):
    ormar_config = BaseMeta.copy(tablename="users")

    id: int = ormar.Integer(primary_key=True)
    email: str = ormar.String(max_length=64, unique=True)
    # Holds the argon2 hash of the password, never the password itself.
    password: str = ormar.String(max_length=128)
    is_active: bool = ormar.Boolean(default=True)
    # Whether the owner proved the address (a link mailed at sign-up, or a reset).
    is_verified: bool = ormar.Boolean(default=False)
    # When a sign-up made it: an unverified account goes a while after its link would.
    created_at: datetime | None = ormar.DateTime(timezone=True, nullable=True)


# SQLite hands a new row the highest id + 1, so without AUTOINCREMENT a new account
# would get the id of the newest one deleted (and whatever still refers to it).
# OrmarConfig takes no table options; migrations/env.py keeps it through rebuilds.
Users.ormar_config.table.dialect_options["sqlite"]["autoincrement"] = True

"""`/health`, and whether the database is at the migrations' head and like the models."""

import logging
from pathlib import Path
from typing import Any

import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi import APIRouter

from core.errors import MAKEMIGRATIONS, unavailable
from db import database, metadata

logger = logging.getLogger(__name__)
router = APIRouter()

MIGRATIONS_HEAD = ScriptDirectory.from_config(
    Config(Path(__file__).parent.parent / "alembic.ini")
).get_current_head()


def described(difference: Any) -> str | None:
    """An alembic difference in words; None for a table of no model (unused here)."""
    if isinstance(difference, list):  # a column's type, nullability or default
        _, _, table, column = difference[0][:4]
        changed = ", ".join(kind.removeprefix("modify_") for kind, *_ in difference)
        return f"column {table}.{column}: its {changed} differs"
    kind, *_, item = difference
    noun = kind.partition("_")[2]  # table, column, index, constraint, fk
    if noun == "column":
        table, name = difference[2], f"{difference[2]}.{item.name}"
    elif isinstance(item, sqlalchemy.Table):
        table = name = item.name
    elif isinstance(getattr(item, "table", None), sqlalchemy.Table):
        table, name = item.table.name, item.name
    else:  # a table's comment, say
        return f"{kind} on {difference[1]}"
    if kind.startswith("add_"):
        return f"{noun} {name}: in the models, not in the database"
    if table in metadata.tables:
        return f"{noun} {name}: in the database, in no model"
    return None


def differences(connection: sqlalchemy.Connection) -> list[str]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    found = (described(d) for d in compare_metadata(context, metadata))
    return [difference for difference in found if difference]


# Compared once per process: 20-50 ms of CPU (tests/benchmark.md).
differences_at_head: list[str] | None = None


async def database_state() -> tuple[str | None, list[str]]:
    """The database's revision and, at the head, how it differs from the models."""
    global differences_at_head
    async with database.connection() as connection:
        revision: str | None = await connection.scalar(
            sqlalchemy.text("SELECT version_num FROM alembic_version")
        )
        if revision != MIGRATIONS_HEAD:
            return revision, []
        if differences_at_head is None:
            differences_at_head = await connection.run_sync(differences)
            if differences_at_head:
                logger.warning(
                    "The models and the database differ: %s. %s",
                    "; ".join(differences_at_head),
                    MAKEMIGRATIONS,
                )
    return revision, differences_at_head


async def check_at_start() -> None:
    """Warn of a database behind or unlike the models; the app starts all the same."""
    try:
        revision, _ = await database_state()
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as error:
        logger.warning("Models not compared with the database: %s", error)
        return
    if revision != MIGRATIONS_HEAD:
        logger.warning(
            "The database is at revision %s, the migrations' head is %s:"
            " run `pipenv run migrate`.",
            revision,
            MIGRATIONS_HEAD,
        )


@router.get("/health")
async def health() -> dict[str, str]:
    """Whether the database answers, is at the newest revision and like the models."""
    try:
        revision, differ = await database_state()
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as error:
        logger.error("health check failed: %s", error)
        raise unavailable() from None
    if revision != MIGRATIONS_HEAD:
        raise unavailable("Database migrations are behind")
    if differ:
        raise unavailable("The models and the database differ; see the log")
    return {"status": "ok", "revision": str(revision)}

"""`/health`, and whether the models and the database agree: compared once per process,
at start-up or by `/health`, with a warning in the log that names each difference."""

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
    """One of alembic's compare_metadata differences, in words; None for a table of
    no model the app imports (migrations/env.py may import more), which it never uses."""
    if isinstance(difference, list):  # a column's type, nullability or default
        _, _, table, column = difference[0][:4]
        changed = ", ".join(kind.removeprefix("modify_") for kind, *_ in difference)
        return f"column {table}.{column}: its {changed} differs"
    kind, *_, item = difference
    noun = kind.partition("_")[2]  # table, column, index, constraint, fk
    if noun == "column":
        table = difference[2]
        name = f"{table}.{item.name}"
    elif isinstance(item, sqlalchemy.Table):
        table = name = item.name
    elif isinstance(getattr(item, "table", None), sqlalchemy.Table):
        table, name = item.table.name, item.name
    else:  # a table's comment, say
        return f"{kind} on {difference[1]}"
    if kind.startswith("add_"):
        return f"{noun} {name}: in the models, not in the database"
    return (
        f"{noun} {name}: in the database, in no model"
        if table in metadata.tables
        else None
    )


def differences(connection: sqlalchemy.Connection) -> list[str]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    found = (described(d) for d in compare_metadata(context, metadata))
    return [difference for difference in found if difference]


# What differs between the models and the database at the head revision: compared
# once per process, at start-up or by /health (20-50 ms of CPU, tests/benchmark.md).
differences_at_head: list[str] | None = None


async def database_revision() -> str | None:
    async with database.connection() as connection:
        revision: str | None = await connection.scalar(
            sqlalchemy.text("SELECT version_num FROM alembic_version")
        )
    return revision


async def models_differ() -> list[str]:
    """How the models differ from the database, which is at the head revision; the
    first time, a warning in the log that names each difference."""
    global differences_at_head
    if differences_at_head is None:
        async with database.connection() as connection:
            differences_at_head = await connection.run_sync(differences)
        if differences_at_head:
            logger.warning(
                "The models and the database differ: %s. %s",
                "; ".join(differences_at_head),
                MAKEMIGRATIONS,
            )
    return differences_at_head


async def check_at_start() -> None:
    """Warn in the log when the database is behind the migrations, or unlike the
    models; the app starts all the same, and /health compares once the database answers."""
    try:
        revision = await database_revision()
        if revision == MIGRATIONS_HEAD:
            await models_differ()
        else:
            logger.warning(
                "The database is at revision %s, the migrations' head is %s:"
                " run `pipenv run migrate`.",
                revision,
                MIGRATIONS_HEAD,
            )
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as error:
        logger.warning("Models not compared with the database: %s", error)


@router.get("/health")
async def health() -> dict[str, str]:
    """Check that the database answers, is migrated to the newest revision, and has
    the tables and columns that the models have."""
    try:
        revision = await database_revision()
        if revision != MIGRATIONS_HEAD:
            raise unavailable("Database migrations are behind")
        if await models_differ():
            raise unavailable("The models and the database differ; see the log")
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as error:
        logger.error("health check failed: %s", error)
        raise unavailable() from None
    return {"status": "ok", "revision": str(revision)}

"""The migrations: history, upgrade and downgrade, agreement with the models, and the
tutorial's workflow of changing a model and autogenerating a revision."""

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from pytest_alembic import MigrationContext

# pytest-alembic's built-in checks: one head; upgrade from empty to head; every
# revision downgrades; the models match what the migrations build (`alembic check`).
from pytest_alembic.tests import (  # noqa: F401
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from support import PROJECT_DIR

# The seed's newest revision: users add theirs on top, so the seed's schema is
# checked here, not at head.
SEED_REVISION = "24dbc8f39bd0"

# `.schema users` in the tutorial, after its two revisions.
TUTORIAL_SCHEMA = {
    "columns": {
        "id": ("INTEGER", False),
        "email": ("VARCHAR(64)", False),
        "password": ("VARCHAR(128)", False),
        "is_active": ("BOOLEAN", True),
    },
    "primary_key": ["id"],
    "unique": [["email"]],
}


def users_table(engine: AsyncEngine) -> dict[str, Any]:
    """The users table as the database describes it, or {} if there is none."""

    def inspect(connection: sqlalchemy.Connection) -> dict[str, Any]:
        inspector = sqlalchemy.inspect(connection)
        if not inspector.has_table("users"):
            return {}
        return {
            "columns": {
                column["name"]: (str(column["type"]), column["nullable"])
                for column in inspector.get_columns("users")
            },
            "primary_key": inspector.get_pk_constraint("users")["constrained_columns"],
            "unique": [
                c["column_names"] for c in inspector.get_unique_constraints("users")
            ],
        }

    async def run() -> dict[str, Any]:
        async with engine.connect() as connection:
            return await connection.run_sync(inspect)

    return asyncio.run(run())


def test_the_seed_revisions_build_the_tutorial_schema(
    alembic_runner: MigrationContext, alembic_engine: AsyncEngine
) -> None:
    alembic_runner.migrate_up_to(SEED_REVISION)
    assert users_table(alembic_engine) == TUTORIAL_SCHEMA

    alembic_runner.migrate_down_to("base")
    assert users_table(alembic_engine) == {}

    alembic_runner.migrate_up_to(SEED_REVISION)
    assert users_table(alembic_engine) == TUTORIAL_SCHEMA


def copy_project(tmp_path: Path) -> Path:
    """The whole project as it is now (with the user's own modules and revisions),
    copied so that the test may change it."""
    copy = tmp_path / "project"
    shutil.copytree(
        PROJECT_DIR,
        copy,
        ignore=shutil.ignore_patterns(
            ".venv",
            ".git",
            "__pycache__",
            ".pytest_cache",
            ".mypy_cache",
            ".ruff_cache",
            "db.sqlite*",
        ),
    )
    return copy


# A field name no user will add to Users (the README's example is `nickname`): the
# tests add it to Users as the user has left it.
PROBE = "tutorial_test_probe"


def add_field(project: Path, line: str) -> None:
    """Add a field to Users, wherever it stands in db.py among the user's models."""
    db = project / "db.py"
    anchor = '    ormar_config = BaseMeta.copy(tablename="users")\n'
    assert anchor in db.read_text()
    db.write_text(db.read_text().replace(anchor, f"{anchor}    {line}\n", 1))


def alembic(project: Path, database_url: str, *args: str) -> str:
    """Run the alembic command line in `project`; return what it printed.

    Warnings are errors, as in the test suite that runs the same migrations.
    """
    result = subprocess.run(
        [sys.executable, "-W", "error", "-m", "alembic", *args],
        cwd=project,
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.mark.slow
def test_adding_a_field_autogenerates_a_revision_that_upgrades_and_downgrades(
    tmp_path: Path, empty_database_url: str
) -> None:
    project = copy_project(tmp_path)
    engine = create_async_engine(empty_database_url, poolclass=sqlalchemy.NullPool)
    alembic(project, empty_database_url, "upgrade", "head")
    before = users_table(engine)
    add_field(
        project, f"{PROBE}: str | None = ormar.String(max_length=32, nullable=True)"
    )

    output = alembic(
        project, empty_database_url, "revision", "--autogenerate", "-m", PROBE
    )
    assert f"Detected added column 'users.{PROBE}'" in output

    alembic(project, empty_database_url, "upgrade", "head")
    after = users_table(engine)
    assert after["columns"].pop(PROBE) == ("VARCHAR(32)", True)
    assert after == before

    alembic(project, empty_database_url, "downgrade", "-1")
    assert users_table(engine) == before


def replace(path: Path, old: str, new: str) -> None:
    assert old in path.read_text(), (path, old)
    path.write_text(path.read_text().replace(old, new, 1))


@pytest.mark.slow
def test_altered_columns_autogenerate_a_revision_that_runs_on_either_database(
    tmp_path: Path, empty_database_url: str
) -> None:
    project = copy_project(tmp_path)
    alembic(project, empty_database_url, "upgrade", "head")
    db = project / "db.py"
    replace(
        db,
        "ormar.String(max_length=64, unique=True)",
        "ormar.String(max_length=96, unique=True)",
    )
    replace(
        db, "ormar.Boolean(default=True)", "ormar.Boolean(default=True, nullable=False)"
    )
    replace(
        db,
        "created_at: datetime = ormar.DateTime(timezone=True)",
        "created_at: datetime = ormar.DateTime(timezone=True, index=True)",
    )

    output = alembic(
        project, empty_database_url, "revision", "--autogenerate", "-m", PROBE
    )
    assert "Detected type change" in output and "Detected NOT NULL" in output
    assert "Detected added index 'ix_tokens_created_at'" in output
    [revision] = (project / "migrations" / "versions").glob(f"*_{PROBE}.py")
    # ormar marks columns autoincrement=False, which only MySQL takes (PostgreSQL warns).
    assert "autoincrement" not in revision.read_text()

    alembic(project, empty_database_url, "upgrade", "head")
    assert users_table(
        create_async_engine(empty_database_url, poolclass=sqlalchemy.NullPool)
    )["columns"]["email"] == ("VARCHAR(96)", False)
    assert "No new upgrade operations detected" in alembic(
        project, empty_database_url, "check"
    )
    alembic(project, empty_database_url, "downgrade", "-1")


@pytest.mark.slow
def test_revisions_with_ormar_column_types_run_as_written(
    tmp_path: Path, empty_database_url: str
) -> None:
    # ormar's UUID column renders as `ormar.fields.sqlalchemy_uuid.CHAR(32)`.
    project = copy_project(tmp_path)
    add_field(project, f"{PROBE}: uuid.UUID | None = ormar.UUID(nullable=True)")
    db = project / "db.py"
    db.write_text("import uuid\n" + db.read_text())

    alembic(project, empty_database_url, "upgrade", "head")
    alembic(project, empty_database_url, "revision", "--autogenerate", "-m", PROBE)
    alembic(project, empty_database_url, "upgrade", "head")
    assert "No new upgrade operations detected" in alembic(
        project, empty_database_url, "check"
    )
    alembic(project, empty_database_url, "downgrade", "-1")


def run_sql(url: str, *statements: str) -> list[Any]:
    """Run statements on one connection (foreign keys on, as the app has them)."""

    async def run() -> list[Any]:
        engine = create_async_engine(url, poolclass=sqlalchemy.NullPool)
        async with engine.begin() as connection:
            if connection.dialect.name == "sqlite":
                await connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            results = [await connection.exec_driver_sql(s) for s in statements]
            rows = [r.all() if r.returns_rows else None for r in results]
        await engine.dispose()
        return rows

    return asyncio.run(run())


ADD_USER_WITH_TOKEN = [
    "INSERT INTO users (id, email, password, is_active) VALUES (7, 'a@b.co', 'h', true)",
    "INSERT INTO tokens (digest, user_id, created_at, expires_at)"
    " VALUES ('d1', 7, '2026-01-01 00:00:00', '2026-01-02 00:00:00')",
]


def test_deleting_a_user_deletes_its_tokens(
    alembic_runner: MigrationContext, empty_database_url: str
) -> None:
    alembic_runner.migrate_up_to("heads")
    run_sql(empty_database_url, *ADD_USER_WITH_TOKEN)
    [count] = run_sql(
        empty_database_url,
        "DELETE FROM users WHERE id = 7",
        "SELECT count(*) FROM tokens",
    )[1]
    assert count == (0,)


@pytest.mark.slow
def test_a_later_rebuild_of_users_keeps_every_token(
    tmp_path: Path, empty_database_url: str
) -> None:
    # On SQLite, batch mode copies `users`, drops the old table and renames the copy:
    # with foreign keys on, dropping it would cascade to every token.
    project = copy_project(tmp_path)
    alembic(project, empty_database_url, "upgrade", "head")
    run_sql(empty_database_url, *ADD_USER_WITH_TOKEN)
    db = project / "db.py"
    db.write_text(
        db.read_text().replace(
            "is_active: bool = ormar.Boolean(default=True)",
            "is_active: bool = ormar.Boolean(default=True, nullable=False)",
        )
    )
    output = alembic(
        project, empty_database_url, "revision", "--autogenerate", "-m", "x"
    )
    assert "Detected NOT NULL on column 'users.is_active'" in output
    alembic(project, empty_database_url, "upgrade", "head")

    assert run_sql(empty_database_url, "SELECT digest, user_id FROM tokens") == [
        [("d1", 7)]
    ]


def new_user(url: str, email: str) -> int:
    """Insert an account with an id the database picks; return that id."""
    [[(user_id,)]] = run_sql(
        url,
        "INSERT INTO users (email, password, is_active)"
        f" VALUES ('{email}', 'h', true) RETURNING id",
    )
    return int(user_id)


@pytest.mark.slow
def test_ids_are_never_reused_even_after_a_later_rebuild_of_users(
    tmp_path: Path, empty_database_url: str
) -> None:
    # A new account with a deleted one's id would inherit what still refers to that id
    # (SQLite hands out the highest id + 1 unless the table has AUTOINCREMENT).
    project = copy_project(tmp_path)
    alembic(project, empty_database_url, "upgrade", "head")
    new_user(empty_database_url, "a@b.co")
    deleted = new_user(empty_database_url, "b@b.co")
    run_sql(empty_database_url, f"DELETE FROM users WHERE id = {deleted}")
    assert new_user(empty_database_url, "c@b.co") > deleted

    # An autogenerated change to a users column: SQLite copies the table into a new
    # one, which must keep AUTOINCREMENT and the counter.
    newest = new_user(empty_database_url, "d@b.co")
    run_sql(empty_database_url, f"DELETE FROM users WHERE id = {newest}")
    db = project / "db.py"
    db.write_text(
        db.read_text().replace(
            "email: str = ormar.String(max_length=64,",
            "email: str = ormar.String(max_length=80,",
        )
    )
    output = alembic(
        project, empty_database_url, "revision", "--autogenerate", "-m", "x"
    )
    assert "Detected type change" in output and "users.email" in output
    alembic(project, empty_database_url, "upgrade", "head")

    assert new_user(empty_database_url, "e@b.co") > newest

"""The migrations: history, upgrade and downgrade, agreement with the models, and the
tutorial's workflow of changing a model and autogenerating a revision.

These tests must keep passing after the user's own changes (.ci/tutorial runs them
after each step), so none of them reads or rewrites a line of the template's models: a
test that changes models does it on a model of its own (`probe_models.py`) or on a
column of its own that it adds to `Users`, in a copy of the project.
"""

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from alembic.config import Config
from alembic.script import ScriptDirectory
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

from support import (
    PROBE,
    PROBE_COLUMN,
    add_probe_column,
    add_users_field,
    alembic,
    autogenerate,
    copy_project,
)

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


def database_state(url: str) -> dict[str, Any]:
    """Every table with its columns and rows (alembic_version's too)."""
    engine = create_async_engine(url, poolclass=sqlalchemy.NullPool)

    def read(connection: sqlalchemy.Connection) -> dict[str, Any]:
        state = {}
        inspector = sqlalchemy.inspect(connection)
        for table in inspector.get_table_names():
            columns = {
                c["name"]: (str(c["type"]), c["nullable"])
                for c in inspector.get_columns(table)
            }
            rows = connection.exec_driver_sql(f'SELECT * FROM "{table}"').all()
            state[table] = {"columns": columns, "rows": sorted(rows, key=repr)}
        return state

    async def run() -> dict[str, Any]:
        async with engine.connect() as connection:
            return await connection.run_sync(read)

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


def replace(path: Path, old: str, new: str) -> None:
    assert old in path.read_text(), (path, old)
    path.write_text(path.read_text().replace(old, new, 1))


# A model of the tests' own, with a foreign key to Users, as the tutorial's Posts has.
PROBE_MODEL = """\
import uuid
from datetime import datetime

import ormar

from db import BaseMeta, Users


class Probes(ormar.Model):
    ormar_config = BaseMeta.copy(tablename="probes")

    id: int = ormar.Integer(primary_key=True)
    user: Users = ormar.ForeignKey(
        Users,
        name="user_id",
        nullable=False,
        ondelete=ormar.ReferentialAction.CASCADE,
        related_name="tutorial_test_probes",
    )
"""


def write_probe_model(project: Path, fields: str) -> None:
    """Write `probe_models.py` with `fields` besides the id and the foreign key, and
    import it in migrations/env.py, as tutorial step 7 does for posts/models.py."""
    (project / "probe_models.py").write_text(PROBE_MODEL + fields)
    env = project / "migrations" / "env.py"
    if "import probe_models" not in env.read_text():
        text, found = re.subn(
            "^from db import",
            "import probe_models  # noqa: F401\n\\g<0>",
            env.read_text(),
            count=1,
            flags=re.M,
        )
        assert found, "no line starting with 'from db import' in migrations/env.py"
        env.write_text(text)


@pytest.mark.slow  # alembic on a copy of the project
def test_adding_a_field_autogenerates_a_revision_that_upgrades_and_downgrades(
    tmp_path: Path, migrated_url: str
) -> None:
    project = copy_project(tmp_path)
    engine = create_async_engine(migrated_url, poolclass=sqlalchemy.NullPool)
    before = users_table(engine)
    add_users_field(
        project, f"{PROBE}: str | None = ormar.String(max_length=32, nullable=True)"
    )

    output = autogenerate(project, migrated_url, PROBE)
    assert f"Detected added column 'users.{PROBE}'" in output

    alembic(project, migrated_url, "upgrade", "head")
    after = users_table(engine)
    assert after["columns"].pop(PROBE) == ("VARCHAR(32)", True)
    assert after == before

    alembic(project, migrated_url, "downgrade", "-1")
    assert users_table(engine) == before


PROBE_FIELDS = """
    name: str = ormar.String(max_length=32)
    flag: bool | None = ormar.Boolean(default=True)
    created_at: datetime = ormar.DateTime(timezone=True)
    # ormar's UUID column renders as `ormar.fields.sqlalchemy_uuid.CHAR(32)`.
    key: uuid.UUID | None = ormar.UUID(nullable=True)
"""

# A longer column, one made NOT NULL, an added index.
ALTERED_PROBE_FIELDS = """
    name: str = ormar.String(max_length=48)
    flag: bool = ormar.Boolean(default=True, nullable=False)
    created_at: datetime = ormar.DateTime(timezone=True, index=True)
    key: uuid.UUID | None = ormar.UUID(nullable=True)
"""


@pytest.mark.slow  # alembic on a copy of the project
def test_a_model_and_its_changes_autogenerate_revisions_that_run_on_either_database(
    tmp_path: Path, migrated_url: str
) -> None:
    project = copy_project(tmp_path)
    write_probe_model(project, PROBE_FIELDS)
    assert "Detected added table 'probes'" in autogenerate(
        project, migrated_url, "add probes"
    )
    alembic(project, migrated_url, "upgrade", "head")

    write_probe_model(project, ALTERED_PROBE_FIELDS)
    output = autogenerate(project, migrated_url, "alter probes")
    assert "Detected type change" in output and "Detected NOT NULL" in output
    assert "Detected added index 'ix_probes_created_at'" in output
    [revision] = (project / "migrations" / "versions").glob("*_alter_probes.py")
    # ormar marks columns autoincrement=False, which only MySQL takes (PostgreSQL warns).
    assert "autoincrement" not in revision.read_text()

    alembic(project, migrated_url, "upgrade", "head")
    columns = database_state(migrated_url)["probes"]["columns"]
    assert columns["name"] == ("VARCHAR(48)", False)
    assert columns["flag"][1] is False
    assert "No new upgrade operations detected" in alembic(
        project, migrated_url, "check"
    )
    alembic(project, migrated_url, "downgrade", "-1")
    columns = database_state(migrated_url)["probes"]["columns"]
    assert columns["name"] == ("VARCHAR(32)", False)


@pytest.mark.slow  # alembic on a copy of the project
def test_autogenerate_writes_no_empty_revision_and_sees_server_defaults(
    tmp_path: Path, migrated_url: str
) -> None:
    project = copy_project(tmp_path)
    versions = project / "migrations" / "versions"
    write_probe_model(
        project,
        '    label: str = ormar.String(max_length=8, default="", server_default="")\n',
    )
    autogenerate(project, migrated_url, "add probes")
    alembic(project, migrated_url, "upgrade", "head")

    # Nothing changed: no revision. (On SQLite the empty server default reads back as
    # `''`; alembic alone would see a change.)
    written = set(versions.glob("*.py"))
    output = autogenerate(project, migrated_url, "nothing")
    assert "No changes in the models: no revision written." in output
    assert set(versions.glob("*.py")) == written

    write_probe_model(
        project,
        '    label: str = ormar.String(max_length=8, default="b", server_default="b")\n',
    )
    output = autogenerate(project, migrated_url, "another default")
    assert "detected server default on column 'probes.label'" in output


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


# The revision that made sign-up prove the address (`users.is_verified`).
VERIFIED_REVISION = "c5dda1d9eb23"


# The revision whose devices' digests hold the account too, and are kept by last use.
DEVICES_BY_LAST_USE = "56889ad717ee"


def test_devices_stored_before_per_account_digests_are_forgotten_up_and_down(
    alembic_runner: MigrationContext, empty_database_url: str
) -> None:
    # Their digests match nothing on the other side; a column over rows must not fail.
    alembic_runner.migrate_up_before(DEVICES_BY_LAST_USE)
    device = "INSERT INTO devices VALUES ('d1', 7, '2026-01-01 00:00:00')"
    count = "SELECT count(*) FROM devices"
    run_sql(empty_database_url, *ADD_USER_WITH_TOKEN, device)
    alembic_runner.migrate_up_one()
    assert run_sql(empty_database_url, count, device, count) == [[(0,)], None, [(1,)]]
    alembic_runner.migrate_down_one()
    assert run_sql(empty_database_url, count, device) == [[(0,)], None]
    assert run_sql(empty_database_url, "SELECT digest, user_id FROM tokens") == [
        [("d1", 7)]
    ]


def test_accounts_made_before_addresses_were_proven_stay_verified(
    alembic_runner: MigrationContext, empty_database_url: str
) -> None:
    alembic_runner.migrate_up_before(VERIFIED_REVISION)
    run_sql(empty_database_url, ADD_USER_WITH_TOKEN[0])
    alembic_runner.migrate_up_to(VERIFIED_REVISION)
    [[(verified,)]] = run_sql(empty_database_url, "SELECT is_verified FROM users")
    assert verified  # they keep logging in
    alembic_runner.migrate_up_to("heads")
    new_user(empty_database_url, "b@b.co")  # a new account, made outside the app
    [rows] = run_sql(empty_database_url, "SELECT email, is_verified FROM users")
    assert {email: bool(verified) for email, verified in rows} == {
        "a@b.co": True,
        "b@b.co": False,  # has to prove its address
    }


def rebuild_users(project: Path, database_url: str) -> None:
    """Lengthen the probe column, and migrate: on SQLite batch mode copies `users`
    into a new table, drops the old one and renames the copy."""
    replace(project / "db.py", PROBE_COLUMN, PROBE_COLUMN.replace("=32", "=48"))
    output = autogenerate(project, database_url, "lengthen the probe column")
    assert "Detected type change" in output and f"users.{PROBE}" in output
    alembic(project, database_url, "upgrade", "head")


@pytest.mark.slow  # alembic on a copy of the project
def test_a_later_rebuild_of_users_keeps_every_token(
    tmp_path: Path, migrated_url: str
) -> None:
    # With foreign keys on, dropping the old `users` would cascade to every token.
    project = copy_project(tmp_path)
    add_probe_column(project, migrated_url)
    run_sql(migrated_url, *ADD_USER_WITH_TOKEN)
    rebuild_users(project, migrated_url)

    assert run_sql(migrated_url, "SELECT digest, user_id FROM tokens") == [[("d1", 7)]]


def new_user(url: str, email: str) -> int:
    """Insert an account with an id the database picks; return that id."""
    [[(user_id,)]] = run_sql(
        url,
        "INSERT INTO users (email, password, is_active)"
        f" VALUES ('{email}', 'h', true) RETURNING id",
    )
    return int(user_id)


@pytest.mark.slow  # alembic on a copy of the project
def test_ids_are_never_reused_even_after_a_later_rebuild_of_users(
    tmp_path: Path, migrated_url: str
) -> None:
    # A new account with a deleted one's id would inherit what still refers to that id
    # (SQLite hands out the highest id + 1 unless the table has AUTOINCREMENT).
    new_user(migrated_url, "a@b.co")
    deleted = new_user(migrated_url, "b@b.co")
    run_sql(migrated_url, f"DELETE FROM users WHERE id = {deleted}")
    assert new_user(migrated_url, "c@b.co") > deleted

    # The rebuilt table must keep AUTOINCREMENT and the counter.
    project = copy_project(tmp_path)
    add_probe_column(project, migrated_url)
    newest = new_user(migrated_url, "d@b.co")
    run_sql(migrated_url, f"DELETE FROM users WHERE id = {newest}")
    rebuild_users(project, migrated_url)

    assert new_user(migrated_url, "e@b.co") > newest


# Written by hand: a new table, a nullable column on a table with rows, then NOT NULL
# on that column, which fails over the rows' NULLs (on SQLite, while batch mode copies
# the table into `_alembic_tmp_users`).
HALF_FAILING_REVISION = """\
import sqlalchemy as sa
from alembic import op

revision = "0badc0ffee00"
down_revision = {head!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("probes", sa.Column("id", sa.Integer(), primary_key=True))
    op.add_column("users", sa.Column("{probe}", sa.String(8), nullable=True))
    {fill}
    with op.batch_alter_table("users") as batch_op:
        batch_op.alter_column("{probe}", existing_type=sa.String(8), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("users") as batch_op:
        batch_op.drop_column("{probe}")
    op.drop_table("probes")
"""


@pytest.mark.slow  # alembic on a copy of the project
def test_a_migration_that_fails_changes_nothing(
    tmp_path: Path, migrated_url: str
) -> None:
    project = copy_project(tmp_path)
    head = ScriptDirectory.from_config(
        Config(project / "alembic.ini")
    ).get_current_head()
    revision = project / "migrations" / "versions" / "0badc0ffee00_half_failing.py"
    revision.write_text(
        HALF_FAILING_REVISION.format(head=head, probe=PROBE, fill="pass")
    )
    run_sql(migrated_url, *ADD_USER_WITH_TOKEN)
    new_user(migrated_url, "b@b.co")
    before = database_state(migrated_url)

    output = alembic(project, migrated_url, "upgrade", "head", succeeds=False)
    assert "IntegrityError" in output
    # No new table, no _alembic_tmp_users, no new column, the same revision and rows.
    assert database_state(migrated_url) == before

    # Corrected, it applies.
    fill = f"op.execute(\"UPDATE users SET {PROBE} = ''\")"
    revision.write_text(HALF_FAILING_REVISION.format(head=head, probe=PROBE, fill=fill))
    alembic(project, migrated_url, "upgrade", "head")
    after = database_state(migrated_url)
    assert after["alembic_version"]["rows"] == [("0badc0ffee00",)]
    assert after["probes"]["rows"] == []
    assert after["users"]["columns"][PROBE] == ("VARCHAR(8)", False)


@pytest.mark.slow  # alembic on a copy of the project
def test_a_renamed_field_is_written_as_a_rename_that_keeps_the_data(
    tmp_path: Path, migrated_url: str
) -> None:
    project = copy_project(tmp_path)
    write_probe_model(project, "    name: str = ormar.String(max_length=32)\n")
    autogenerate(project, migrated_url, "add probes")
    alembic(project, migrated_url, "upgrade", "head")
    run_sql(
        migrated_url,
        ADD_USER_WITH_TOKEN[0],
        "INSERT INTO probes (user_id, name) VALUES (7, 'kept')",
    )

    write_probe_model(project, "    label: str = ormar.String(max_length=32)\n")
    output = autogenerate(project, migrated_url, "rename name to label")
    assert "Column 'probes.name' renamed to 'label'" in output
    [revision] = (project / "migrations" / "versions").glob("*_rename_name_to_label.py")
    assert 'new_column_name="label"' in revision.read_text()

    alembic(project, migrated_url, "upgrade", "head")
    assert database_state(migrated_url)["probes"]["rows"] == [(1, 7, "kept")]
    assert "No new upgrade operations detected" in alembic(
        project, migrated_url, "check"
    )
    alembic(project, migrated_url, "downgrade", "-1")
    assert run_sql(migrated_url, "SELECT name FROM probes") == [[("kept",)]]


@pytest.mark.slow  # alembic on a copy of the project
def test_a_column_dropped_and_another_unlike_added_stops_makemigrations(
    tmp_path: Path, migrated_url: str
) -> None:
    project = copy_project(tmp_path)
    write_probe_model(project, "    name: str = ormar.String(max_length=32)\n")
    autogenerate(project, migrated_url, "add probes")
    alembic(project, migrated_url, "upgrade", "head")
    versions = set((project / "migrations" / "versions").glob("*.py"))

    write_probe_model(project, "    label: int = ormar.Integer()\n")
    output = alembic(
        project, migrated_url, "revision", "--autogenerate", "-m", "x", succeeds=False
    )
    assert "In table 'probes', 'name' dropped and 'label' added" in output
    assert 'op.alter_column("probes", "name", new_column_name="label")' in output
    assert set((project / "migrations" / "versions").glob("*.py")) == versions

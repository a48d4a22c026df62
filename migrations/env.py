"""Alembic's migration environment (the `alembic init -t async` template, adapted)."""

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from logging.config import fileConfig
from typing import Any

from alembic import context
from alembic.autogenerate.api import AutogenContext
from alembic.operations import ops
from alembic.util import CommandError
from sqlalchemy import Table, event, pool
from sqlalchemy.engine import Connection, Inspector
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

# Import models kept in other modules: autogenerate sees only imported tables.
import accounts.models  # noqa: F401  (the accounts' tables)
from db import DATABASE_URL, BaseMeta

config = context.config

if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = BaseMeta.metadata


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> Any:
    """Import the module of a column type not SQLAlchemy's (ormar's UUID, say)."""
    module = type(obj).__module__
    if type_ == "type" and not module.startswith("sqlalchemy"):
        autogen_context.imports.add(f"import {module}")
    return False  # render the item the default way


def columns_changed(table: ops.ModifyTableOps) -> tuple[list[Any], list[Any]]:
    dropped = [op for op in table.ops if isinstance(op, ops.DropColumnOp)]
    added = [op for op in table.ops if isinstance(op, ops.AddColumnOp)]
    return dropped, added


def rename(table: ops.ModifyTableOps, dropped: Any, added: Any) -> None:
    old, new = dropped.to_column(), added.column
    table.ops[table.ops.index(dropped)] = ops.AlterColumnOp(
        table.table_name,
        old.name,
        schema=table.schema,
        modify_name=new.name,
        existing_type=old.type,
        existing_nullable=old.nullable,
    )
    table.ops.remove(added)


def revision_written(context: Any, revision: Any, directives: list[Any]) -> None:
    """Of `revision --autogenerate` (not `check`): no empty revision; a column dropped
    and one alike added, a rename that keeps the data; unlike ones stop it."""
    if not getattr(config.cmd_opts, "autogenerate", False):
        return
    script = directives[0]
    tables = [*script.upgrade_ops.ops, *script.downgrade_ops.ops]
    for op in (op for table in tables for op in getattr(table, "ops", [])):
        # ormar's autoincrement=False: only MySQL takes it in alter_column.
        if isinstance(op, ops.AlterColumnOp):
            op.kw.pop("autoincrement", None)
    renamed = set()
    for table in script.upgrade_ops.ops:
        if not isinstance(table, ops.ModifyTableOps):
            continue
        dropped, added = columns_changed(table)
        if not (dropped and added):
            continue
        name = table.table_name
        old, new = dropped[0].to_column(), added[0].column
        alike = not context.impl.compare_type(old, new) and old.nullable == new.nullable
        if not (len(dropped) == len(added) == 1 and alike):
            gone = ", ".join(f"'{op.column_name}'" for op in dropped)
            came = ", ".join(f"'{op.column.name}'" for op in added)
            raise CommandError(
                f"In table '{name}', {gone} dropped and {came} added, not alike: no"
                " revision, as dropping loses the data. To rename, change the name only"
                f' (op.alter_column("{name}", "{old.name}", new_column_name="{new.name}"))'
                ", the rest after. New columns: makemigrations without, then with them."
            )
        rename(table, dropped[0], added[0])
        renamed.add(name)
        print(
            f"Column '{name}.{old.name}' renamed to '{new.name}', keeping the data. If"
            f" it is new, delete this revision, makemigrations without '{old.name}',"
            f" then with '{new.name}'."
        )
    for table in script.downgrade_ops.ops:  # the same renames, back
        if isinstance(table, ops.ModifyTableOps) and table.table_name in renamed:
            [back], [there] = columns_changed(table)
            rename(table, back, there)
    if script.upgrade_ops.is_empty():
        directives[:] = []
        print("No changes in the models: no revision written.")


def server_default_changed(
    context: Any,
    inspected_column: Any,
    metadata_column: Any,
    inspected_default: str | None,
    metadata_default: Any,
    rendered_metadata_default: str | None,
) -> bool | None:
    # SQLite reads `server_default=""` back as `('')`, which alembic does not unquote.
    if rendered_metadata_default == "" and inspected_default in ("''", "('')"):
        return False
    return None  # alembic compares


def configure(**options: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=server_default_changed,
        render_item=render_item,
        process_revision_directives=revision_written,
        **options,
    )


def run_migrations_offline() -> None:
    """Emit the migrations as SQL on stdout (`alembic upgrade head --sql`)."""
    configure(
        url=DATABASE_URL, literal_binds=True, dialect_opts={"paramstyle": "named"}
    )
    with context.begin_transaction():
        context.run_migrations()


def reflected(inspector: Inspector, table: Table, column: Any) -> None:
    # SQLite's AUTOINCREMENT is not reflected: read it, or a batch rebuild drops it.
    options, bind = table.dialect_options["sqlite"], inspector.bind
    if options["autoincrement"] or bind.dialect.name != "sqlite":
        return
    assert isinstance(bind, Connection)  # alembic reflects on its connection
    created_as = bind.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table.name,)
    ).scalar()
    options["autoincrement"] = "AUTOINCREMENT" in (created_as or "").upper()


def created(table: Table, connection: Connection, **kw: Any) -> None:
    # Batch mode's copy of `t` goes on from its counter: no id is handed out twice.
    original = table.name.removeprefix("_alembic_tmp_")
    if original != table.name and table.dialect_options["sqlite"]["autoincrement"]:
        connection.exec_driver_sql(
            "INSERT INTO sqlite_sequence (name, seq)"
            " SELECT ?, seq FROM sqlite_sequence WHERE name = ?",
            (table.name, original),
        )


def send_begin(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN")


@contextmanager
def sqlite_migration(connection: Connection, one_transaction: bool) -> Iterator[None]:
    """Keep AUTOINCREMENT through batch rebuilds; and if `one_transaction`, one for the
    whole upgrade (the driver's own BEGINs skip DDL: a failure would leave it)."""
    driver = connection.connection.dbapi_connection
    assert driver is not None
    before = driver.isolation_level
    if one_transaction:
        # WAL: readers go on while one writes. Kept in the file; not in a transaction.
        connection.exec_driver_sql("PRAGMA journal_mode=WAL")
        connection.commit()
        driver.isolation_level = None
        event.listen(connection, "begin", send_begin)
    event.listen(Table, "column_reflect", reflected)
    event.listen(Table, "after_create", created)
    try:
        yield
    finally:
        event.remove(Table, "after_create", created)
        event.remove(Table, "column_reflect", reflected)
        if one_transaction:
            event.remove(connection, "begin", send_begin)
            driver.isolation_level = before


def do_run_migrations(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    # SQLite cannot ALTER most things: batch mode rebuilds the table. Foreign keys stay
    # off here (the app turns them on): a rebuild would delete rows that reference it.
    configure(connection=connection, render_as_batch=sqlite, transactional_ddl=True)
    # On SQLite one transaction is made here, unless the caller's holds the connection.
    one_transaction = sqlite and not connection.in_transaction()
    with sqlite_migration(connection, one_transaction), context.begin_transaction():
        context.run_migrations()


async def run_async_migrations(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)


def run_migrations_online() -> None:
    # On the engine or connection a caller (pytest-alembic) gave, or on DATABASE_URL.
    connectable = config.attributes.get("connection")
    if isinstance(connectable, Connection):
        do_run_migrations(connectable)
    elif isinstance(connectable, AsyncEngine):
        asyncio.run(run_async_migrations(connectable))
    else:
        # NullPool: the connection closes with the migration, nothing stays open.
        engine = create_async_engine(DATABASE_URL, poolclass=pool.NullPool)
        asyncio.run(run_async_migrations(engine))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

"""Alembic's migration environment (the `alembic init -t async` template, adapted)."""

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from logging.config import fileConfig
from typing import Any

from alembic import context
from alembic.autogenerate import rewriter
from alembic.autogenerate.api import AutogenContext
from alembic.operations import ops
from alembic.util import CommandError
from sqlalchemy import Table, event, pool
from sqlalchemy.engine import Connection, Inspector
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

# Models kept in other modules must be imported here, so that autogenerate sees
# their tables in the metadata (see tests/tutorial.md, step 7).
import accounts.models  # noqa: F401  (the accounts' tables)
from db import DATABASE_URL, BaseMeta

config = context.config

if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = BaseMeta.metadata


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> Any:
    """Import the module of any column type that is not SQLAlchemy's own.

    Autogenerate writes such types by their full dotted path (ormar's UUID column is
    `ormar.fields.sqlalchemy_uuid.CHAR(32)`); without the import the revision fails.
    """
    module = type(obj).__module__
    if type_ == "type" and not module.startswith("sqlalchemy"):
        autogen_context.imports.add(f"import {module}")
    return False  # render the item the default way


writer = rewriter.Rewriter()


@writer.rewrites(ops.AlterColumnOp)
def leave_out_autoincrement(
    context: Any, revision: Any, op: ops.AlterColumnOp
) -> ops.AlterColumnOp:
    # ormar marks each column autoincrement=False and autogenerate copies that into
    # alter_column; only MySQL takes it (PostgreSQL warns).
    op.kw.pop("autoincrement", None)
    return op


def autogenerating() -> bool:
    # `alembic revision --autogenerate`, not `alembic check` (which reads the
    # directives as they are) nor pytest-alembic's checks.
    return bool(getattr(config.cmd_opts, "autogenerate", False))


def no_empty_revision(context: Any, revision: Any, directives: list[Any]) -> None:
    """Write no revision when autogenerate finds nothing to change."""
    if autogenerating() and directives[0].upgrade_ops.is_empty():
        directives[:] = []
        print("No changes in the models: no revision written.")


def columns_changed(table: ops.ModifyTableOps) -> tuple[list[Any], list[Any]]:
    """The table's columns that the revision drops, and those it adds."""
    dropped = [op for op in table.ops if isinstance(op, ops.DropColumnOp)]
    added = [op for op in table.ops if isinstance(op, ops.AddColumnOp)]
    return dropped, added


def rename(table: ops.ModifyTableOps, dropped: Any, added: Any) -> None:
    """Put a rename of the dropped column to the added one in place of the two."""
    old, new = dropped.to_column(), added.column
    renamed = ops.AlterColumnOp(
        table.table_name,
        old.name,
        schema=table.schema,
        modify_name=new.name,
        existing_type=old.type,
        existing_nullable=old.nullable,
    )
    table.ops[table.ops.index(dropped)] = renamed
    table.ops.remove(added)


def renamed_columns(context: Any, revision: Any, directives: list[Any]) -> None:
    """Write a column dropped and one added in the same table as a rename, which keeps
    the data, when the two are alike (type and nullability); stop when they are not.

    Autogenerate cannot tell a rename from a new column: it drops the old one and its
    data (a NOT NULL column added over rows then fails, or takes a default).
    """
    if not autogenerating():
        return
    script = directives[0]
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
        if len(dropped) == len(added) == 1 and alike:
            rename(table, dropped[0], added[0])
            renamed.add(name)
            print(
                f"Column '{name}.{old.name}' renamed to '{new.name}': a column dropped"
                " and one alike added are written as a rename (alter_column with"
                " new_column_name), which keeps the data. If it is a new column,"
                f" delete this revision, then remove '{old.name}' and makemigrations,"
                f" add '{new.name}' and makemigrations."
            )
            continue
        gone = ", ".join(f"'{op.column_name}'" for op in dropped)
        came = ", ".join(f"'{op.column.name}'" for op in added)
        raise CommandError(
            f"In table '{name}', {gone} dropped and {came} added, not alike (type or"
            " nullability): a rename? Dropping loses the data: no revision written."
            " To rename, first change the name only: makemigrations then writes"
            f' op.alter_column("{name}", "{old.name}", new_column_name="{new.name}");'
            " change the rest in a revision after. For columns that are really new:"
            " remove the old fields, makemigrations, then add the new ones,"
            " makemigrations."
        )
    for table in script.downgrade_ops.ops:  # the same renames, back
        if isinstance(table, ops.ModifyTableOps) and table.table_name in renamed:
            [back], [there] = columns_changed(table)
            rename(table, back, there)


def revision_written(context: Any, revision: Any, directives: list[Any]) -> None:
    renamed_columns(context, revision, directives)
    no_empty_revision(context, revision, directives)


def server_default_changed(
    context: Any,
    inspected_column: Any,
    metadata_column: Any,
    inspected_default: str | None,
    metadata_default: Any,
    rendered_metadata_default: str | None,
) -> bool | None:
    # On SQLite `server_default=""` reads back as `('')`, which alembic's comparison
    # does not unquote (it does other strings): it would see a change every time.
    if rendered_metadata_default == "" and inspected_default in ("''", "('')"):
        return False
    return None  # alembic compares


def configure(**options: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=server_default_changed,
        render_item=render_item,
        process_revision_directives=writer.chain(revision_written),
        **options,
    )


def run_migrations_offline() -> None:
    """Emit the migrations as SQL on stdout (`alembic upgrade head --sql`)."""
    configure(
        url=DATABASE_URL, literal_binds=True, dialect_opts={"paramstyle": "named"}
    )
    with context.begin_transaction():
        context.run_migrations()


@contextmanager
def sqlite_autoincrement_kept() -> Iterator[None]:
    """Keep a table's AUTOINCREMENT, and its counter, through batch mode's rebuilds.

    SQLAlchemy does not read AUTOINCREMENT back when it reflects a SQLite table, so a
    rebuild (an altered column of `users`, say) would drop it; and the copy's counter
    would start at the highest id left, handing out a deleted account's id again.
    """

    def reflected(inspector: Inspector, table: Table, column: Any) -> None:
        options, bind = table.dialect_options["sqlite"], inspector.bind
        if options["autoincrement"] or bind.dialect.name != "sqlite":
            return
        assert isinstance(bind, Connection)  # alembic reflects on its connection
        created_as = bind.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
            (table.name,),
        ).scalar()
        options["autoincrement"] = "AUTOINCREMENT" in (created_as or "").upper()

    def created(table: Table, connection: Connection, **kw: Any) -> None:
        # Batch mode copies `t` into `_alembic_tmp_t`, drops `t`, renames the copy.
        original = table.name.removeprefix("_alembic_tmp_")
        if original != table.name and table.dialect_options["sqlite"]["autoincrement"]:
            connection.exec_driver_sql(
                "INSERT INTO sqlite_sequence (name, seq)"
                " SELECT ?, seq FROM sqlite_sequence WHERE name = ?",
                (table.name, original),
            )

    listeners: list[tuple[str, Callable[..., None]]] = [
        ("column_reflect", reflected),
        ("after_create", created),
    ]
    for name, listener in listeners:
        event.listen(Table, name, listener)
    try:
        yield
    finally:
        for name, listener in listeners:
            event.remove(Table, name, listener)


def send_begin(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN")


@contextmanager
def sqlite_transactional_ddl(connection: Connection) -> Iterator[None]:
    """Run the whole upgrade in one transaction on SQLite, as on PostgreSQL.

    SQLite's DDL is transactional, but its driver sends BEGIN only before an INSERT or
    an UPDATE: a revision that failed half-way would leave what it had done (a new
    table, `_alembic_tmp_users` from batch mode) and the next upgrade would fail on
    it. So the driver sends no BEGIN of its own, and each begin of this connection
    sends one; for this migration only (the connection may be a caller's).
    """
    driver = connection.connection.dbapi_connection
    assert driver is not None
    before = driver.isolation_level
    driver.isolation_level = None
    event.listen(connection, "begin", send_begin)
    try:
        yield
    finally:
        event.remove(connection, "begin", send_begin)
        driver.isolation_level = before


def do_run_migrations(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    # One transaction for the whole upgrade, made here on SQLite (PostgreSQL's is
    # alembic's own), unless the connection came in a transaction of its caller's.
    one_transaction = sqlite and not connection.in_transaction()
    if one_transaction:
        # WAL lets readers go on while one writer writes; it is stored in the file.
        # It cannot be set inside a transaction, so before the one below.
        connection.exec_driver_sql("PRAGMA journal_mode=WAL")
        connection.commit()
    # SQLite cannot ALTER most things in place: batch mode rebuilds the table instead.
    # Foreign keys stay off on this connection (SQLite's default; only the app's engine
    # turns them on): dropping the old table would otherwise delete every row that
    # references it, such as every user's tokens.
    configure(connection=connection, render_as_batch=sqlite, transactional_ddl=True)
    with (
        sqlite_transactional_ddl(connection) if one_transaction else nullcontext(),
        context.begin_transaction(),
        sqlite_autoincrement_kept(),
    ):
        context.run_migrations()


async def run_async_migrations(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)


def run_migrations_online() -> None:
    """Run the migrations on a live database.

    Callers such as pytest-alembic may hand over an engine or a connection of their
    own in `config.attributes["connection"]`; otherwise connect to DATABASE_URL.
    """
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

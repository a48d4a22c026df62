"""The database under the app: lifespan, transactions, SQLite's settings."""

import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import sqlalchemy
from asgi_lifespan import LifespanManager
from harness import hold_outbox

from db import Users, database
from main import app
from support import PROJECT_DIR, LoggedIn, imported_again

pytestmark = pytest.mark.anyio


async def test_lifespan_connects_and_disconnects_the_database() -> None:
    assert not database.is_connected
    async with LifespanManager(app):
        assert database.is_connected
        assert await Users.objects.count() >= 0
    assert not database.is_connected


async def test_transactions_commit_and_roll_back(client: httpx.AsyncClient) -> None:
    # The engine options in db.py must not turn transactions into autocommit.
    async with database.transaction():
        await Users.objects.create(email="kept@example.com", password="hash")

    with pytest.raises(RuntimeError):
        async with database.transaction():
            await Users.objects.create(email="gone@example.com", password="hash")
            raise RuntimeError("roll back")

    assert [user.email for user in await Users.objects.all()] == ["kept@example.com"]


async def test_sqlite_is_set_up_for_concurrent_requests(
    client: httpx.AsyncClient,
) -> None:
    if database.dialect.name != "sqlite":
        pytest.skip("these are SQLite's settings")
    async with database.connection() as connection:
        for pragma, value in [
            ("journal_mode", "wal"),
            ("busy_timeout", 5000),
            ("foreign_keys", 1),
        ]:
            assert await connection.scalar(sqlalchemy.text(f"PRAGMA {pragma}")) == value


async def test_killed_connections_answer_503_then_are_replaced_by_themselves(
    client: httpx.AsyncClient,
    ann: LoggedIn,
    sql: Callable[[str], Awaitable[None]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if database.dialect.name != "postgresql":
        pytest.skip("SQLite has no server whose connections can be killed")
    me = app.url_path_for("read_me")
    assert (await client.get(me, headers=ann.headers)).status_code == 200
    # The outbox's sender shares the pool: held, it cannot meet the dead one first.
    await hold_outbox(monkeypatch)
    # Every connection to the database but this statement's, as a failover would.
    await sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    answers = [await client.get(me, headers=ann.headers) for _ in range(5)]
    # One request meets a dead connection; SQLAlchemy then drops the whole pool.
    assert [answer.status_code for answer in answers] == [503] + [200] * 4
    assert answers[0].headers["retry-after"] == "1"


def test_a_new_sqlite_file_is_readable_by_its_owner_only_in_process(
    tmp_path: Path, test_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not test_database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL keeps its own files")
    path = tmp_path / "app.sqlite"
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{path}")
    # db.py creates the file at import; SQLite gives the -wal and -shm files its mode.
    imported_again("db.py")
    assert oct(path.stat().st_mode & 0o777) == "0o600"


@pytest.mark.slow
def test_the_sqlite_files_are_readable_by_their_owner_only(
    tmp_path: Path, test_database_url: str
) -> None:
    if not test_database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL keeps its own files")
    env = {**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/app.sqlite"}
    # `alembic upgrade head` makes the file, then the app connects: while it is, the
    # -wal and -shm files exist too. One process (a second would cost ~1.5 s of CPU).
    code = (
        "import alembic.config\n"
        "alembic.config.main(['upgrade', 'head'])\n"
        "import asyncio, glob, os, asgi_lifespan, db, main\n"
        "async def run():\n"
        "    async with asgi_lifespan.LifespanManager(main.app):\n"
        "        await db.Users.objects.count()\n"
        "        for path in sorted(glob.glob(db.DATABASE_URL.split('///')[1] + '*')):\n"
        "            print(os.path.basename(path), oct(os.stat(path).st_mode & 0o777))\n"
        "asyncio.run(run())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split("\n")[:3] == [
        "app.sqlite 0o600",
        "app.sqlite-shm 0o600",
        "app.sqlite-wal 0o600",
    ]

"""The database under the app: lifespan, transactions, SQLite's settings."""

import httpx
import pytest
import sqlalchemy
from asgi_lifespan import LifespanManager

from db import Users, database
from main import app

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

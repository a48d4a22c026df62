"""The app's lifespan connects the database at startup and disconnects it at shutdown."""

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


async def test_sqlite_database_runs_in_wal_mode() -> None:
    async with LifespanManager(app):
        if database.dialect.name != "sqlite":
            pytest.skip("WAL is SQLite's")
        async with database.connection() as connection:
            mode = await connection.scalar(sqlalchemy.text("PRAGMA journal_mode"))
    assert mode == "wal"

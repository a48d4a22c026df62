"""/health: the database answers and is at the newest migration."""

from collections.abc import Awaitable, Callable

import anyio.to_thread
import httpx
import pytest
from alembic import command
from alembic.config import Config

from main import MIGRATIONS_HEAD, app
from support import PROJECT_DIR

pytestmark = pytest.mark.anyio


async def test_health_reports_the_migration_revision(client: httpx.AsyncClient) -> None:
    response = await client.get(app.url_path_for("health"))
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "revision": MIGRATIONS_HEAD}


async def test_health_is_503_when_the_database_is_not_at_the_head(
    client: httpx.AsyncClient,
) -> None:
    # alembic's commands start an event loop of their own: run them off this one.
    config = Config(PROJECT_DIR / "alembic.ini")
    await anyio.to_thread.run_sync(command.stamp, config, "base")
    try:
        response = await client.get(app.url_path_for("health"))
    finally:
        await anyio.to_thread.run_sync(command.stamp, config, "head")
    assert response.status_code == 503
    assert response.json() == {"detail": "Database migrations are behind"}


async def test_health_is_503_when_the_database_check_fails(
    client: httpx.AsyncClient,
    sql: Callable[[str], Awaitable[None]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    await sql("ALTER TABLE alembic_version RENAME TO hidden")
    try:
        response = await client.get(app.url_path_for("health"))
    finally:
        await sql("ALTER TABLE hidden RENAME TO alembic_version")
    # Strangers learn that the service is down; the cause goes to the log.
    assert response.status_code == 503
    assert response.json() == {"detail": "Service unavailable"}
    assert response.headers["retry-after"] == "1"
    assert "alembic_version" in caplog.text

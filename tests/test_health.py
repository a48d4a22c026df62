"""/health: the database answers, is at the newest migration, and has what the models
have; and what start-up and a failing query say when it does not."""

from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio.to_thread
import httpx
import pytest
from alembic import command
from alembic.config import Config
from asgi_lifespan import LifespanManager

import main
from core import health
from core.health import MIGRATIONS_HEAD
from db import Users
from main import app
from support import (
    PASSWORD,
    PROBE,
    PROBE_COLUMN,
    PROJECT_DIR,
    StartServer,
    add_users_field,
    alembic,
    copy_project,
)

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


def a_users_column() -> str:
    """A column of the users table besides its primary key."""
    table = Users.ormar_config.table
    return [column.name for column in table.columns if not column.primary_key][-1]


async def test_models_and_database_that_differ_are_named_at_start_up_and_by_health(
    sql: Callable[[str], Awaitable[None]],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A model with a column that the database lacks, as after a model change without
    # a revision: the column is renamed in the database instead.
    column = a_users_column()
    monkeypatch.setattr(health, "differences_at_head", None)  # compared at start-up
    await sql(f"ALTER TABLE users RENAME COLUMN {column} TO {PROBE}")
    try:
        async with LifespanManager(main.app) as manager:
            started = caplog.text
            transport = httpx.ASGITransport(manager.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                answer = await c.get(app.url_path_for("health"))
                form = {"username": "ann@example.com", "password": PASSWORD}
                log_in = await c.post(app.url_path_for("log_in"), data=form)
    finally:
        await sql(f"ALTER TABLE users RENAME COLUMN {PROBE} TO {column}")

    assert f"column users.{column}: in the models, not in the database" in started
    assert f"column users.{PROBE}: in the database, in no model" in started
    assert "pipenv run makemigrations" in started
    assert answer.status_code == 503
    assert answer.json() == {
        "detail": "The models and the database differ; see the log"
    }
    # A bug to fix, not an outage to wait out: a 500, and the log says why.
    assert log_in.status_code == 500
    assert "The database lacks a table or column of the models" in caplog.text
    assert "database unavailable" not in caplog.text


@pytest.mark.slow  # alembic and a server on a copy of the project
def test_a_model_changed_without_a_revision_is_named_not_an_outage(
    tmp_path: Path, migrated_url: str, start_server: StartServer
) -> None:
    project = copy_project(tmp_path)
    add_users_field(project, PROBE_COLUMN)  # and no makemigrations
    alembic(project, migrated_url, "upgrade", "head")  # as `pipenv run serve` does
    with start_server(
        migrated_url, ready_path="/openapi.json", project=project
    ) as server:
        assert httpx.get(server.url + "/health").status_code == 503
        form = {"username": "ann@example.com", "password": PASSWORD}
        response = httpx.post(server.url + "/auth/token", data=form)
    log = server.log()  # once the server has stopped: all of it
    # A bug's 500: JSON as every error; its traceback in the server's log.
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": "Internal Server Error"}
    assert "Traceback" in log
    assert f"column users.{PROBE}: in the models, not in the database" in log
    assert "pipenv run makemigrations" in log
    assert "The database lacks a table or column of the models" in log
    assert "database unavailable" not in log

"""Test setup: databases of their own, migrated with the real alembic commands.

Set TEST_DATABASE_URL to run the suite on another database (PostgreSQL, say); by
default it runs on a new SQLite file. The database DATABASE_URL names is never touched.
"""

import asyncio
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

# Before db.py is imported anywhere: the app under test and alembic read this.
temporary_directory = tempfile.TemporaryDirectory()
TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL") or (
    f"sqlite+aiosqlite:///{temporary_directory.name}/test.sqlite"
)
os.environ["DATABASE_URL"] = TEST_DATABASE_URL

import httpx  # noqa: E402
import pytest  # noqa: E402
from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from asgi_lifespan import LifespanManager  # noqa: E402
from sqlalchemy import make_url, pool  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine  # noqa: E402

from db import Users  # noqa: E402
from main import app  # noqa: E402

PASSWORD = "s3cret-pass"

PROJECT_DIR = Path(__file__).parent.parent


def alembic_config() -> Config:
    return Config(PROJECT_DIR / "alembic.ini")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session", autouse=True)
def migrated_database() -> None:
    """Bring the test database to the newest revision once, as `pipenv run migrate` does."""
    command.upgrade(alembic_config(), "head")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app running its real lifespan, on an empty users table."""
    async with LifespanManager(app) as manager:
        await Users.objects.delete(each=True)
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test"
        ) as client:
            yield client


async def sign_up(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD
) -> Any:
    """Create an account through the API; return the user it answers."""
    response = await client.post("/users", json={"email": email, "password": password})
    assert response.status_code == 201, response.text
    return response.json()


async def log_in(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD
) -> dict[str, str]:
    """Log in through the API; return the headers that authenticate as that user."""
    form = {"username": email, "password": password}
    response = await client.post("/auth/token", data=form)
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


async def execute_autocommit(url: str, statement: str) -> None:
    engine = create_async_engine(
        url, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool
    )
    async with engine.connect() as connection:
        await connection.exec_driver_sql(statement)
    await engine.dispose()


@pytest.fixture
def empty_database_url(tmp_path: Path) -> Iterator[str]:
    """The URL of a new, empty database of the same kind as the test database."""
    url = make_url(TEST_DATABASE_URL)
    if url.get_backend_name() == "sqlite":
        yield url.set(database=str(tmp_path / "empty.sqlite")).render_as_string(False)
        return
    name = f"test_{uuid.uuid4().hex[:12]}"
    server = url.render_as_string(hide_password=False)
    asyncio.run(execute_autocommit(server, f'CREATE DATABASE "{name}"'))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(execute_autocommit(server, f'DROP DATABASE "{name}" WITH (FORCE)'))


@pytest.fixture
def alembic_engine(empty_database_url: str) -> AsyncEngine:
    """pytest-alembic's database: an empty one, so its checks start from nothing.

    NullPool, because pytest-alembic runs each step in an event loop of its own.
    """
    return create_async_engine(empty_database_url, poolclass=pool.NullPool)

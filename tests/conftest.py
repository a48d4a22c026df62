"""Test setup: databases of their own, migrated with the real alembic commands.

Set TEST_DATABASE_URL to run the suite on another database (PostgreSQL, say); by
default it runs on a new SQLite file. The database DATABASE_URL names is never touched.
"""

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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

from db import LogInAttempts, Users  # noqa: E402
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
    """A client of the app running its real lifespan, on empty tables."""
    async with LifespanManager(app) as manager:
        await Users.objects.delete(each=True)
        await LogInAttempts.objects.delete(each=True)
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test"
        ) as client:
            yield client


def loopback(i: int) -> str:
    """Another loopback address for each i (127.0.0.2 up): uvicorn, like the app's
    per-address limits, sees each as another client."""
    return f"127.0.0.{i + 2}"


def client_at(address: str) -> httpx.AsyncClient:
    """Another client of the app that the `client` fixture runs, sending from `address`."""
    transport = httpx.ASGITransport(app=app, client=(address, 123))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def server_client_at(url: str, address: str, **options: Any) -> httpx.AsyncClient:
    """A client of a real server whose connections come from `address`."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(base_url=url, transport=transport, **options)


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


@contextmanager
def new_database(directory: Path) -> Iterator[str]:
    """The URL of a new, empty database of the same kind as the test database.

    On a server, it is named after the test database and dropped afterwards.
    """
    url = make_url(TEST_DATABASE_URL)
    if url.get_backend_name() == "sqlite":
        yield url.set(database=str(directory / "empty.sqlite")).render_as_string(False)
        return
    name = f"{url.database}_{uuid.uuid4().hex[:12]}"
    server = url.render_as_string(hide_password=False)
    asyncio.run(execute_autocommit(server, f'CREATE DATABASE "{name}"'))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(execute_autocommit(server, f'DROP DATABASE "{name}" WITH (FORCE)'))


@pytest.fixture
def empty_database_url(tmp_path: Path) -> Iterator[str]:
    with new_database(tmp_path) as url:
        yield url


@pytest.fixture
def alembic_engine(empty_database_url: str) -> AsyncEngine:
    """pytest-alembic's database: an empty one, so its checks start from nothing.

    NullPool, because pytest-alembic runs each step in an event loop of its own.
    """
    return create_async_engine(empty_database_url, poolclass=pool.NullPool)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def migrate(database_url: str) -> None:
    """Bring a database to the newest revision with the real command, in a process."""
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=PROJECT_DIR,
        env={**os.environ, "DATABASE_URL": database_url},
        check=True,
    )


@dataclass
class Server:
    """A `uvicorn main:app` process, and the file its stdout and stderr go to."""

    process: "subprocess.Popen[bytes]"
    url: str
    log_path: Path

    def log(self) -> str:
        """Everything the process printed: uvicorn's access log and the app's errors."""
        return self.log_path.read_text(errors="replace")


@contextmanager
def start_server(
    database_url: str,
    log_path: Path,
    *uvicorn_args: str,
    env: dict[str, str] | None = None,
    ready_path: str = "/health",
) -> Iterator[Server]:
    """Run `uvicorn main:app` on a database until it answers 200 on `ready_path`.

    On the way out the process gets a SIGTERM, unless the test has stopped it already.
    """
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "main:app", "--port", str(port)]
            + list(uvicorn_args),
            cwd=PROJECT_DIR,
            env={**os.environ, **(env or {}), "DATABASE_URL": database_url},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"the server exited:\n{server.log()}"
            try:
                if httpx.get(server.url + ready_path).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=30)

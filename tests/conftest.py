"""Test setup: databases of their own, migrated with the real alembic commands.

Set TEST_DATABASE_URL to run the suite on another database (PostgreSQL, say); by
default it runs on a new SQLite file. The database DATABASE_URL names is never touched.
Tests run in parallel (pytest-xdist): each worker has a database of its own, a new
SQLite file, or on PostgreSQL `<TEST_DATABASE_URL's database>_gw0` and so on, created on
that server and dropped at the end.
"""

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import make_url, pool
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

temporary_directory = tempfile.TemporaryDirectory()  # one per worker process


def worker_database_url() -> str:
    """The database this process tests on; set before db.py is imported anywhere."""
    given = os.environ.get("TEST_DATABASE_URL")
    if not given:
        return f"sqlite+aiosqlite:///{temporary_directory.name}/test.sqlite"
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...; unset without -n
    if not worker:
        return given
    url = make_url(given)
    return url.set(database=f"{url.database}_{worker}").render_as_string(False)


TEST_DATABASE_URL = worker_database_url()
os.environ["DATABASE_URL"] = TEST_DATABASE_URL  # the app under test and alembic read it

import httpx  # noqa: E402
import pytest  # noqa: E402
from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from asgi_lifespan import LifespanManager  # noqa: E402
from pwdlib import PasswordHash  # noqa: E402
from pwdlib.hashers.argon2 import Argon2Hasher  # noqa: E402

import main  # noqa: E402
from db import Users  # noqa: E402
from support import (  # noqa: E402
    PASSWORD,
    PROJECT_DIR,
    LoggedIn,
    LogIn,
    Server,
    SignUp,
    StartServer,
)

# argon2 at the fastest setting it allows, for tests that are not about hashing: the
# real one costs ~0.1 s of CPU a hash, which was most of the suite's time.
CHEAP_HASH = PasswordHash([Argon2Hasher(time_cost=1, memory_cost=8, parallelism=1)])
CHEAP_DUMMY_HASH = CHEAP_HASH.hash("dummy")


def alembic_config() -> Config:
    return Config(PROJECT_DIR / "alembic.ini")


async def execute_autocommit(url: str, statement: str) -> None:
    engine = create_async_engine(
        url, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool
    )
    async with engine.connect() as connection:
        await connection.exec_driver_sql(statement)
    await engine.dispose()


def new_database(name: str) -> str:
    """Create a PostgreSQL database on the test server; return its URL."""
    url = make_url(TEST_DATABASE_URL)
    server = make_url(os.environ["TEST_DATABASE_URL"]).render_as_string(False)
    asyncio.run(execute_autocommit(server, f'CREATE DATABASE "{name}"'))
    return url.set(database=name).render_as_string(hide_password=False)


def drop_database(name: str) -> None:
    server = make_url(os.environ["TEST_DATABASE_URL"]).render_as_string(False)
    asyncio.run(execute_autocommit(server, f'DROP DATABASE "{name}" WITH (FORCE)'))


POSTGRESQL = make_url(TEST_DATABASE_URL).get_backend_name() == "postgresql"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def test_database_url() -> str:
    """The database the in-process app runs on: this worker's own."""
    return TEST_DATABASE_URL


@pytest.fixture(scope="session", autouse=True)
def migrated_database() -> Iterator[None]:
    """Bring the test database to the newest revision once, as `pipenv run migrate` does."""
    name = make_url(TEST_DATABASE_URL).database or ""
    own = POSTGRESQL and TEST_DATABASE_URL != os.environ["TEST_DATABASE_URL"]
    if own:
        new_database(name)
    try:
        command.upgrade(alembic_config(), "head")
        yield
    finally:
        if own:
            drop_database(name)


@pytest.fixture(autouse=True)
def cheap_hashing(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cheap argon2 for the in-process app, unless the test is marked `real_hashing`."""
    if request.node.get_closest_marker("real_hashing") is None:
        monkeypatch.setattr(main, "password_hash", CHEAP_HASH)
        monkeypatch.setattr(main, "DUMMY_HASH", CHEAP_DUMMY_HASH)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app running its real lifespan, on an empty users table."""
    async with LifespanManager(main.app) as manager:
        await Users.objects.delete(each=True)
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test"
        ) as client:
            yield client


@pytest.fixture
def sign_up(client: httpx.AsyncClient) -> SignUp:
    async def sign_up(email: str, password: str = PASSWORD) -> dict[str, Any]:
        body = {"email": email, "password": password}
        response = await client.post("/users", json=body)
        assert response.status_code == 201, response.text
        user: dict[str, Any] = response.json()
        return user

    return sign_up


@pytest.fixture
def log_in(client: httpx.AsyncClient) -> LogIn:
    async def log_in(email: str, password: str = PASSWORD) -> dict[str, str]:
        form = {"username": email, "password": password}
        response = await client.post("/auth/token", data=form)
        assert response.status_code == 200, response.text
        return {"Authorization": f"Bearer {response.json()['access_token']}"}

    return log_in


@pytest.fixture
async def ann(sign_up: SignUp, log_in: LogIn) -> LoggedIn:
    """ann@example.com, signed up with PASSWORD and logged in."""
    user = await sign_up("ann@example.com")
    return LoggedIn(user, await log_in("ann@example.com"))


@pytest.fixture
def sql() -> Callable[[str], Awaitable[None]]:
    """Run one statement on the test database, outside any transaction."""
    return lambda statement: execute_autocommit(TEST_DATABASE_URL, statement)


@pytest.fixture
def empty_database_url(tmp_path: Path) -> Iterator[str]:
    """The URL of a new, empty database of the same kind as the test database."""
    url = make_url(TEST_DATABASE_URL)
    if not POSTGRESQL:
        yield url.set(database=str(tmp_path / "empty.sqlite")).render_as_string(False)
        return
    name = f"{url.database}_{uuid.uuid4().hex[:12]}"  # a name its owner recognises
    try:
        yield new_database(name)
    finally:
        drop_database(name)


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


@pytest.fixture(name="free_port")
def free_port_fixture() -> Callable[[], int]:
    """A port on 127.0.0.1 that nothing listens on now (the kernel's choice)."""
    return free_port


def migrate(database_url: str) -> None:
    """Bring a database to the newest revision with the real command, in a process."""
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=PROJECT_DIR,
        env={**os.environ, "DATABASE_URL": database_url},
        check=True,
    )


@pytest.fixture(name="migrate")
def migrate_fixture() -> Callable[[str], None]:
    return migrate


@pytest.fixture
def migrated_url(empty_database_url: str) -> str:
    """A new database at the newest revision, migrated by `alembic upgrade head`."""
    migrate(empty_database_url)
    return empty_database_url


@contextmanager
def running_server(
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
            time.sleep(0.05)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def start_server(tmp_path: Path) -> StartServer:
    """Start uvicorn processes, each logging to a file of its own under tmp_path."""
    logs = iter(tmp_path / f"server{i}.log" for i in range(100))

    def start(
        database_url: str,
        *uvicorn_args: str,
        env: dict[str, str] | None = None,
        ready_path: str = "/health",
    ) -> AbstractContextManager[Server]:
        return running_server(
            database_url, next(logs), *uvicorn_args, env=env, ready_path=ready_path
        )

    return start

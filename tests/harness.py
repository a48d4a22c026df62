"""Test setup: databases of their own, migrated with the real alembic commands.

Set TEST_DATABASE_URL to run the suite on another database (PostgreSQL, say); by
default it runs on a new SQLite file. The database DATABASE_URL names is never touched.
Tests run in parallel (pytest-xdist): each worker has a database of its own, a new
SQLite file, or on PostgreSQL `<TEST_DATABASE_URL's database>_gw0` and so on, created on
that server and dropped at the end.
"""

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


TEST_DATABASE_URL = worker_database_url()
os.environ["DATABASE_URL"] = TEST_DATABASE_URL  # the app under test and alembic read it
# This process's SMTP server (smtp_server below): the in-process app and every server
# a test starts mail it.
SMTP_PORT = free_port()  # aiosmtpd's Controller cannot take port 0
os.environ["SMTP_URL"] = f"smtp://127.0.0.1:{SMTP_PORT}"

import anyio  # noqa: E402
import httpx  # noqa: E402
import pytest  # noqa: E402
from aiosmtpd.controller import Controller  # noqa: E402
from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from asgi_lifespan import LifespanManager  # noqa: E402
from cheap_hashing import CHEAP_DUMMY_HASH, CHEAP_HASH  # noqa: E402

import main  # noqa: E402
from accounts import outbox, passwords  # noqa: E402
from accounts.models import LogInAttempts, Mails  # noqa: E402
from accounts.schemas import UserRead  # noqa: E402
from db import Users  # noqa: E402
from support import (  # noqa: E402
    MAILBOX,
    PASSWORD,
    PROJECT_DIR,
    ClientAt,
    LoggedIn,
    LogIn,
    Server,
    SignUp,
    StartServer,
    log_in_on,
    sign_up_on,
)


def alembic_config() -> Config:
    return Config(PROJECT_DIR / "alembic.ini")


async def execute_autocommit(url: str, statement: str) -> None:
    engine = create_async_engine(
        url, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool
    )
    async with engine.connect() as connection:
        await connection.exec_driver_sql(statement)
    await engine.dispose()


def new_database(name: str, template: str | None = None) -> str:
    """Create a PostgreSQL database on the test server, empty or a copy of `template`;
    return its URL."""
    statement = f'CREATE DATABASE "{name}"'
    if template:
        statement += f' TEMPLATE "{template}"'
    server = make_url(os.environ["TEST_DATABASE_URL"]).render_as_string(False)
    asyncio.run(execute_autocommit(server, statement))
    return make_url(TEST_DATABASE_URL).set(database=name).render_as_string(False)


def sqlite_url(path: Path | str) -> str:
    return make_url(TEST_DATABASE_URL).set(database=str(path)).render_as_string(False)


def drop_database(name: str) -> None:
    server = make_url(os.environ["TEST_DATABASE_URL"]).render_as_string(False)
    asyncio.run(execute_autocommit(server, f'DROP DATABASE "{name}" WITH (FORCE)'))


POSTGRESQL = make_url(TEST_DATABASE_URL).get_backend_name() == "postgresql"
SQLITE_TEMPLATE = Path(temporary_directory.name) / "migrated.sqlite"


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
        if not POSTGRESQL:  # template_url's, before any test writes (no process)
            shutil.copy(name, SQLITE_TEMPLATE)
        yield
    finally:
        if own:
            drop_database(name)


@pytest.fixture(scope="session", autouse=True)
def smtp_server() -> Iterator[None]:
    """A real SMTP server on SMTP_PORT, on a thread; what it receives is MAILBOX's."""
    server = Controller(MAILBOX, hostname="127.0.0.1", port=SMTP_PORT)
    server.start()
    yield
    server.stop()


@pytest.fixture(autouse=True)
def empty_mailbox() -> None:
    """Each test counts the mail of its own."""
    MAILBOX.messages.clear()


@pytest.fixture(autouse=True)
def cheap_hashing(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cheap argon2 for the in-process app, unless the test is marked `real_hashing`."""
    if request.node.get_closest_marker("real_hashing") is None:
        monkeypatch.setattr(passwords, "password_hash", CHEAP_HASH)
        monkeypatch.setattr(passwords, "DUMMY_HASH", CHEAP_DUMMY_HASH)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app running its real lifespan, on empty tables."""
    async with LifespanManager(main.app) as manager:
        await Users.objects.delete(each=True)
        await LogInAttempts.objects.delete(each=True)
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test"
        ) as client:
            yield client
        if Mails.ormar_config.database.is_connected:  # (a test may have cut it)
            await Mails.objects.delete(each=True)  # none sent into the next test


async def hold_outbox(patch: pytest.MonkeyPatch) -> None:
    """Make the running app's outbox sender wait until `patch` is undone, from between
    two of its queries: it holds no connection, and runs none meanwhile."""
    idle = anyio.Event()

    async def nothing_sent() -> bool:
        idle.set()
        return False

    patch.setattr(outbox, "send_next", nothing_sent)
    if outbox.woken is not None:
        outbox.woken.set()
    with anyio.fail_after(5):
        await idle.wait()


@pytest.fixture
def client_at(client: httpx.AsyncClient) -> ClientAt:
    """More clients of the app that `client` runs, each sending from `address`: the
    app's per-address limits see each as another person. Close them (`async with`)."""

    def client_at(address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=main.app, client=(address, 123))
        return httpx.AsyncClient(transport=transport, base_url="http://test")

    return client_at


@pytest.fixture
async def hashing_threads_busy() -> AsyncIterator[Callable[[], None]]:
    """Every hashing thread of the in-process app held, so that hashes queue; call
    what it gives to free them (the end of the test does too)."""
    limiter = passwords.hashing_limiter
    holders = [object() for _ in range(int(limiter.total_tokens))]
    for holder in holders:
        await limiter.acquire_on_behalf_of(holder)

    def release() -> None:
        while holders:
            limiter.release_on_behalf_of(holders.pop())

    try:
        yield release
    finally:
        release()


@pytest.fixture
def sign_up(client: httpx.AsyncClient) -> SignUp:
    """Create an account through the in-process app and open the link mailed to it;
    return the user as `GET /users/me` shows it."""

    async def sign_up(email: str, password: str = PASSWORD) -> dict[str, Any]:
        await sign_up_on(client, email, password)
        user = await Users.objects.get(email=email.lower())
        return UserRead.model_validate(user, from_attributes=True).model_dump()

    return sign_up


@pytest.fixture
def log_in(client: httpx.AsyncClient) -> LogIn:
    """Log in through the in-process app; return the headers that authenticate."""
    return partial(log_in_on, client)


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
    if not POSTGRESQL:
        yield sqlite_url(tmp_path / "empty.sqlite")
        return
    name = f"{make_url(TEST_DATABASE_URL).database}_{uuid.uuid4().hex[:12]}"
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


@pytest.fixture(scope="session")
def template_url() -> Iterator[str]:
    """A database migrated by `alembic upgrade head` once, to copy for each test: on
    SQLite, the worker's test database as migrated_database left it, copied."""
    if not POSTGRESQL:
        yield str(SQLITE_TEMPLATE)
        return
    name = f"{make_url(TEST_DATABASE_URL).database}_template"
    try:
        migrate(new_database(name))
        yield name
    finally:
        drop_database(name)


@contextmanager
def copy_of(template: str, directory: Path, name: str) -> Iterator[str]:
    """A new database at the newest revision, a copy of `template` (0.4 s of CPU less
    than migrating one); on PostgreSQL, dropped afterwards."""
    if not POSTGRESQL:
        yield sqlite_url(shutil.copy(template, directory / f"{name}.sqlite"))
        return
    name = f"{make_url(TEST_DATABASE_URL).database}_{name}"
    try:
        yield new_database(name, template=template)
    finally:
        drop_database(name)


@pytest.fixture
def migrated_url(template_url: str, tmp_path: Path) -> Iterator[str]:
    """A new database at the newest revision, of this test's own."""
    with copy_of(template_url, tmp_path, uuid.uuid4().hex[:12]) as url:
        yield url


@contextmanager
def running_server(
    database_url: str,
    log_path: Path,
    *uvicorn_args: str,
    env: dict[str, str] | None = None,
    ready_path: str = "/health",
    app: str = "main:app",
    project: Path = PROJECT_DIR,
) -> Iterator[Server]:
    """Run `uvicorn main:app` in `project` on a database until it answers 200 on
    `ready_path`.

    On the way out the process gets a SIGTERM, unless the test has stopped it already.
    """
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", app, "--port", str(port)]
            + list(uvicorn_args),
            cwd=project,
            env={**os.environ, **(env or {}), "DATABASE_URL": database_url},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(process, f"http://127.0.0.1:{port}", database_url, log_path)
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
        project: Path = PROJECT_DIR,
    ) -> AbstractContextManager[Server]:
        return running_server(
            database_url,
            next(logs),
            *uvicorn_args,
            env=env,
            ready_path=ready_path,
            project=project,
        )

    return start


@pytest.fixture(scope="session")
def shared_server(
    template_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One uvicorn process on its own migrated database, for the tests that only send
    it requests: started once (~1 s of CPU) instead of once per test. Tests that use it
    are marked `xdist_group("shared_server")`, so that they share one worker. It hashes
    cheaply (tests/cheap_server.py): no test of it is about hashing."""
    directory = tmp_path_factory.mktemp("shared_server")
    with (
        copy_of(template_url, directory, "shared") as database_url,
        running_server(
            database_url,
            directory / "server.log",
            "--app-dir",
            "tests",
            app="cheap_server:app",
        ) as server,
    ):
        yield server

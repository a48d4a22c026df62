"""Faults, with a real `uvicorn main:app` process on a new migrated database.

Each test runs on the database the suite runs on (SQLite or PostgreSQL). Every one
also checks that the distinctive password it signs up with never reaches the process's
output (uvicorn's access log included), and that no request was answered 500.
"""

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
from sqlalchemy import make_url, pool, text
from sqlalchemy.ext.asyncio import create_async_engine

from conftest import (
    TEST_DATABASE_URL,
    Server,
    log_in,
    migrate,
    sign_up,
    start_server,
)

pytestmark = pytest.mark.anyio

POSTGRESQL = make_url(TEST_DATABASE_URL).get_backend_name() == "postgresql"
# Searched for in the server's output after each test: it must never be there.
SECRET = "fault-Pw-9f3c2e71"
UNAVAILABLE = '{"detail":"Service unavailable"}'


@pytest.fixture
def migrated_url(empty_database_url: str) -> str:
    """A new database at the newest revision, migrated by `alembic upgrade head`."""
    migrate(empty_database_url)
    return empty_database_url


@pytest.fixture
def server(migrated_url: str, tmp_path: Path) -> Iterator[Server]:
    """One uvicorn process on `migrated_url`, as `pipenv run serve` starts it."""
    with start_server(migrated_url, tmp_path / "server.log") as server:
        yield server


@dataclass
class Outcome:
    """One request: when it was sent, and its status or the transport error."""

    sent: float
    status: int | None = None
    retry_after: str | None = None
    body: object = None
    error: str | None = None


async def request(client: httpx.AsyncClient, method: str, path: str) -> Outcome:
    outcome = Outcome(sent=time.monotonic())
    try:
        response = await client.request(method, path)
    except httpx.TransportError as error:
        outcome.error = type(error).__name__
        return outcome
    outcome.status = response.status_code
    outcome.retry_after = response.headers.get("Retry-After")
    if response.status_code != 200:
        outcome.body = response.text
    return outcome


async def read_until(
    client: httpx.AsyncClient, until: float, outcomes: list[Outcome]
) -> None:
    """One client's authenticated reads, back to back, until `until` (monotonic)."""
    while time.monotonic() < until:
        for path in ("/users/me", "/users?limit=50"):
            outcomes.append(await request(client, "GET", path))


async def authenticate(client: httpx.AsyncClient) -> None:
    """Sign up a new user (with SECRET) and send its bearer token from now on."""
    await sign_up(client, "ann@example.com", SECRET)
    client.headers.update(await log_in(client, "ann@example.com", SECRET))


def assert_unavailable(outcome: Outcome) -> None:
    """A failure the client can act on: 503, its JSON body and a Retry-After."""
    assert (outcome.status, outcome.body, outcome.retry_after) == (
        503,
        UNAVAILABLE,
        "1",
    ), outcome


def assert_clean_log(server: Server) -> None:
    """No 500 in the access log, no 500 traceback, and never the password."""
    log = server.log()
    assert not re.search(r'HTTP/1\.1" 500', log), log
    assert "Exception in ASGI application" not in log, log
    assert SECRET not in log


async def terminate_backends(database_url: str) -> int:
    """Kill every PostgreSQL connection to the database, as a failover or admin would."""
    name = make_url(database_url).database
    engine = create_async_engine(
        TEST_DATABASE_URL, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool
    )
    async with engine.connect() as connection:
        result = await connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        )
        killed = len(result.all())
    await engine.dispose()
    return killed


@pytest.mark.skipif(
    not POSTGRESQL, reason="SQLite has no server whose connections can be killed"
)
async def test_killed_connections_answer_503_then_recover_by_themselves(
    server: Server, migrated_url: str
) -> None:
    # 16 clients read through the app's pool; every pooled connection is killed.
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        await authenticate(client)
        start = time.monotonic()
        async with anyio.create_task_group() as tasks:
            for _ in range(16):
                tasks.start_soon(read_until, client, start + 4, outcomes)
            await anyio.sleep(1)
            killed_at = time.monotonic()
            killed = await terminate_backends(migrated_url)

    failures = [outcome for outcome in outcomes if outcome.status != 200]
    for outcome in failures:
        assert_unavailable(outcome)
    # No restart: SQLAlchemy drops the dead pool at the first disconnect it sees.
    late = [outcome for outcome in outcomes if outcome.sent > killed_at + 2]
    assert late and all(outcome.status == 200 for outcome in late)
    assert killed >= 1 and failures
    print(
        f"\n{killed} connections killed; {len(failures)} of {len(outcomes)} requests"
        f" answered 503, the last {max(o.sent for o in failures) - killed_at:.2f} s"
        " after the kill"
    )
    assert_clean_log(server)

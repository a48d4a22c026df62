"""Faults, with a real `uvicorn main:app` process on a new migrated database.

Each test runs on the database the suite runs on (SQLite or PostgreSQL). Every one
also checks that the distinctive password it signs up with never reaches the process's
output (uvicorn's access log included), and that no request was answered 500.
"""

import asyncio
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
from sqlalchemy import make_url, pool, text
from sqlalchemy.ext.asyncio import create_async_engine

from db import DATABASE_URL
from support import (
    Server,
    StartServer,
    a_password,
    faults,
    loopback,
    server_client_at,
    sign_up_on,
)

pytestmark = pytest.mark.anyio

POSTGRESQL = make_url(DATABASE_URL).get_backend_name() == "postgresql"
# Searched for in the server's output after each test: it must never be there.
SECRET = a_password("fault-Pw-9f3c2e71")
UNAVAILABLE = '{"detail":"Service unavailable"}'


@dataclass
class Outcome:
    """One request: when it was sent, and its status or the transport error."""

    sent: float
    done: float = 0.0
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
    finally:
        outcome.done = time.monotonic()
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
        for path in ("/users/me", "/health"):
            outcomes.append(await request(client, "GET", path))


async def authenticate(client: httpx.AsyncClient) -> None:
    """Sign up a new user (with SECRET) and send its bearer token from now on."""
    email = f"ann-{uuid.uuid4().hex[:8]}@example.com"  # new on a shared server too
    await sign_up_on(client, email, SECRET)
    form = {"username": email, "password": SECRET}
    response = await client.post("/auth/token", data=form)
    assert response.status_code == 200
    client.headers["Authorization"] = f"Bearer {response.json()['access_token']}"


def assert_unavailable(outcome: Outcome) -> None:
    """A failure the client can act on: 503, its JSON body and a Retry-After."""
    assert (outcome.status, outcome.body, outcome.retry_after) == (
        503,
        UNAVAILABLE,
        "1",
    ), outcome


def assert_clean_log(log: str) -> None:
    """No 500 in the access log, no 500 traceback, and never the password, in a
    server's `log` (on the shared server: the lines of this test's requests)."""
    assert not re.search(r'HTTP/1\.1" 500', log), "\n".join(faults(log))
    assert "Exception in ASGI application" not in log, "\n".join(faults(log))
    assert SECRET not in log, [line for line in log.splitlines() if SECRET in line]


async def terminate_backends(database_url: str) -> int:
    """Kill every PostgreSQL connection to the database, as a failover or admin would."""
    name = make_url(database_url).database
    engine = create_async_engine(
        database_url, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool
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


@pytest.mark.slow
@pytest.mark.skipif(
    not POSTGRESQL, reason="SQLite has no server whose connections can be killed"
)
@pytest.mark.xdist_group("shared_server")
async def test_killed_connections_answer_503_then_recover_by_themselves(
    shared_server: Server,
) -> None:
    server = shared_server
    log_before = server.log_size()  # the shared server's log so far
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
            killed = await terminate_backends(server.database_url)

    failures = [outcome for outcome in outcomes if outcome.status != 200]
    for outcome in failures:
        assert_unavailable(outcome)
    # No restart: SQLAlchemy drops the dead pool at the first disconnect it sees.
    late = [outcome for outcome in outcomes if outcome.sent > killed_at + 2]
    assert late and all(outcome.status == 200 for outcome in late)
    assert killed >= 1 and failures
    print(
        f"\n{killed} connections killed; {len(failures)} of {len(outcomes)} requests"
        f" answered 503, the last {max(o.done for o in failures) - killed_at:.2f} s"
        " after the kill"
    )
    assert_clean_log(server.log(log_before))


class TcpProxy:
    """A TCP proxy from 127.0.0.1:`port` to the PostgreSQL server, in a thread.

    stop() is the database vanishing: the listener closes and every proxied connection
    is cut; start() again brings it back on the same port.
    """

    def __init__(self, host: str, port: int, listen_port: int) -> None:
        self.target = (host, port)
        self.port = listen_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.listener: asyncio.Server | None = None
        self.connections: set[asyncio.StreamWriter] = set()

    def _call(self, coroutine: object) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(5)  # type: ignore[arg-type]

    def start(self) -> None:
        self._call(self._start())

    def stop(self) -> None:
        self._call(self._stop())

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def _start(self) -> None:
        self.listener = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _stop(self) -> None:
        if self.listener:
            self.listener.close()
            self.listener = None
        for writer in self.connections:
            writer.transport.abort()
        self.connections.clear()

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        self.connections |= {writer, upstream_writer}
        await asyncio.gather(
            self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
        )

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()


async def timed(client: httpx.AsyncClient, path: str) -> tuple[Outcome, float]:
    outcome = await request(client, "GET", path)
    return outcome, outcome.done - outcome.sent


async def assert_outage_then_recovery(
    client: httpx.AsyncClient, end_outage: Callable[[], object]
) -> None:
    """While the database is out: 503s, each at once. Then 200s within 2 s of its return."""
    for _ in range(3):
        for path in ("/users/me", "/health"):
            outcome, seconds = await timed(client, path)
            assert_unavailable(outcome)
            assert seconds < 2, f"{path} took {seconds:.2f} s"
    end_outage()
    back = time.monotonic()
    while (await request(client, "GET", "/users/me")).status != 200:
        assert time.monotonic() - back < 2, "no 200 within 2 s of the database's return"
        await anyio.sleep(0.05)
    print(f"\n200 again {time.monotonic() - back:.2f} s after the database came back")
    assert (await request(client, "GET", "/health")).status == 200


@pytest.mark.slow
@pytest.mark.skipif(not POSTGRESQL, reason="SQLite has no server to lose")
async def test_unreachable_postgresql_answers_503_then_recovers_by_itself(
    migrated_url: str, start_server: StartServer, free_port: Callable[[], int]
) -> None:
    url = make_url(migrated_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432, free_port())
    proxy.start()
    through_proxy = url.set(host="127.0.0.1", port=proxy.port)
    try:
        with start_server(
            through_proxy.render_as_string(hide_password=False)
        ) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                await authenticate(client)
                # Pooled connections are cut and new ones refused.
                proxy.stop()
                await assert_outage_then_recovery(client, proxy.start)
            assert_clean_log(server.log())
    finally:
        proxy.close()


@pytest.mark.slow
@pytest.mark.skipif(not POSTGRESQL, reason="SQLite has no server to lose")
async def test_a_silent_postgresql_answers_503_within_the_connect_timeout(
    test_database_url: str, start_server: StartServer
) -> None:
    # A server that accepts TCP and never answers (dropped packets, a hung host):
    # without db.py's connect timeout, asyncpg waits 60 s.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = make_url(test_database_url).set(
            host="127.0.0.1", port=silent.getsockname()[1]
        )
        with start_server(
            url.render_as_string(hide_password=False), ready_path="/openapi.json"
        ) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
                outcome, seconds = await timed(client, "/health")
        assert_unavailable(outcome)
        assert seconds < 7
        assert_clean_log(server.log())


@pytest.mark.slow
@pytest.mark.skipif(POSTGRESQL, reason="a PostgreSQL database is not a file")
async def test_unopenable_sqlite_file_answers_503_then_recovers_by_itself(
    tmp_path: Path, migrate: Callable[[str], None], start_server: StartServer
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    url = f"sqlite+aiosqlite:///{data / 'app.sqlite'}"
    migrate(url)
    with start_server(url) as first:
        async with httpx.AsyncClient(base_url=first.url) as client:
            await authenticate(client)
    # A connection already open keeps working on a moved file: a new process has none.
    # Running as root, chmod would not deny access; a missing directory does.
    data.rename(tmp_path / "moved")
    with start_server(url, ready_path="/openapi.json") as server:
        # The app starts without its database (the lifespan logs that it could not
        # compare the models with it).
        async with httpx.AsyncClient(
            base_url=server.url, headers=client.headers, timeout=10
        ) as client:
            await assert_outage_then_recovery(
                client, lambda: (tmp_path / "moved").rename(data)
            )
    for log in (first, server):
        assert_clean_log(log.log())


@pytest.mark.slow
async def test_sigterm_answers_every_accepted_sign_up_then_exits(
    migrated_url: str, start_server: StartServer
) -> None:
    # One hashing thread: 20 sign-ups of ~0.1 s each are still queued at the SIGTERM.
    outcomes: dict[int, int | str] = {}

    async def sign_up_once(client: httpx.AsyncClient, i: int) -> None:
        body = {"email": f"user{i}@example.com", "password": SECRET}
        try:
            outcomes[i] = (await client.post("/users", json=body)).status_code
        except httpx.TransportError as error:
            outcomes[i] = type(error).__name__

    with start_server(migrated_url, env={"PASSWORD_HASHING_THREADS": "1"}) as server:
        # A client (so a connection) per request: no keep-alive connection races the
        # shutdown. Made beforehand: each costs this process ~20 ms of CPU, and the
        # requests must all have reached the server before the SIGTERM. Each from an
        # address of its own: 20 people, not one client past its share of the queue.
        clients = [
            server_client_at(server.url, loopback(i), timeout=30) for i in range(25)
        ]
        async with anyio.create_task_group() as tasks:
            for i in range(20):
                tasks.start_soon(sign_up_once, clients[i], i)
            await anyio.sleep(1)
            server.process.send_signal(signal.SIGTERM)
            await anyio.sleep(0.5)
            for i in range(20, 25):  # after the SIGTERM: the listener is closed
                tasks.start_soon(sign_up_once, clients[i], i)
        for client in clients:
            await client.aclose()
        returncode = await anyio.to_thread.run_sync(server.process.wait, 20)

    print(f"\noutcomes: {sorted(outcomes.items())}; exit status {returncode}")
    accepted = {i for i, outcome in outcomes.items() if outcome != "ConnectError"}
    assert accepted == set(range(20))  # nothing accepted after, nothing refused before
    assert all(outcomes[i] == 202 for i in accepted)
    engine = create_async_engine(migrated_url, poolclass=pool.NullPool)
    async with engine.connect() as connection:
        emails = set(
            (await connection.execute(text("SELECT email FROM users"))).scalars()
        )
    await engine.dispose()
    assert emails == {f"user{i}@example.com" for i in accepted}
    log = server.log()
    last_response = log.rindex('"POST /users HTTP/1.1" 202')
    assert last_response < log.index("Application shutdown complete")
    # uvicorn re-raises the SIGTERM once its graceful shutdown is complete, so the
    # process ends "killed by SIGTERM" (143 in a shell), as process managers expect.
    assert returncode == -signal.SIGTERM
    assert_clean_log(log)


# A sign-up of 50 MiB, the password first.
PREFIX = b'{"email": "x@example.com", "password": "' + SECRET.encode()
CHUNK, CHUNKS, SUFFIX = b"x" * 2**16, 800, b'"}'
BIG = len(PREFIX) + CHUNKS * len(CHUNK) + len(SUFFIX)  # bytes


async def big_body() -> AsyncIterator[bytes]:
    """Stops early when the server hangs up: httpx stops sending."""
    yield PREFIX
    for _ in range(CHUNKS):
        yield CHUNK
    yield SUFFIX


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
@pytest.mark.xdist_group("shared_server")
async def test_a_flood_of_oversized_bodies_gets_413_and_health_stays_fast(
    shared_server: Server,
) -> None:
    server = shared_server
    log_before = server.log_size()  # the shared server's log so far
    outcomes: list[int | str] = []
    health: list[float] = []
    rss = [rss_kib(server.process.pid)]

    async def send_big_body(chunked: bool) -> None:
        headers = {"Content-Type": "application/json"}
        if not chunked:
            headers["Content-Length"] = str(BIG)
        async with httpx.AsyncClient(base_url=server.url, timeout=15) as client:
            try:
                response = await client.post(
                    "/users", content=big_body(), headers=headers
                )
                outcomes.append(response.status_code)
            except httpx.TransportError as error:
                outcomes.append(type(error).__name__)

    def watch(until: threading.Event) -> None:
        # In a thread of its own, so that the flood's sending does not delay it.
        with httpx.Client(base_url=server.url, timeout=10) as client:
            while not until.is_set():
                sent = time.monotonic()
                assert client.get("/health").status_code == 200
                health.append(time.monotonic() - sent)
                rss.append(rss_kib(server.process.pid))
                time.sleep(0.05)

    done = threading.Event()
    start = time.monotonic()
    async with anyio.create_task_group() as watcher:
        watcher.start_soon(anyio.to_thread.run_sync, watch, done)
        async with anyio.create_task_group() as flood:
            for i in range(32):
                flood.start_soon(send_big_body, i % 2 == 0)
        seconds = time.monotonic() - start
        done.set()
    await anyio.sleep(0.5)
    after = rss_kib(server.process.pid)

    print(
        f"\n32 x 50 MB bodies in {seconds:.2f} s: {sorted(set(map(str, outcomes)))};"
        f" /health max {max(health) * 1000:.0f} ms over {len(health)} checks;"
        f" RSS {rss[0] // 1024} MiB before, {max(rss) // 1024} MiB peak,"
        f" {after // 1024} MiB after"
    )
    # Every request is answered 413; httpx may see the hang-up instead, when the
    # server closed before the rest of the body was sent: its log shows the 413.
    assert all(outcome in (413, "ReadError", "WriteError") for outcome in outcomes)
    log = server.log(log_before)
    assert log.count('"POST /users HTTP/1.1" 413') == 32
    # Were the bodies read whole, /health would wait out the flood (over 10 s, measured);
    # beside two CPU hogs it took up to 0.12 s. 2 s holds with every core busy.
    assert max(health) < 2
    assert max(rss) - rss[0] < 50 * 1024
    assert_clean_log(log)

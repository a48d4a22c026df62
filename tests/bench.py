"""Benchmark: serve the app on a database of its own and load it over loopback.

    pipenv run bench [--seconds 10] [--concurrency 32] [--workers 1] [--http h11]
    pipenv run bench --compare [--rounds 5] (and the options above)

--compare serves, on the same database, the template and the reference apps of
tests/reference_apps.py, and loads each in turn, round after round (A B C A B C ...),
so that a busy moment of the machine falls on all of them.

A new SQLite file by default; BENCH_DATABASE_URL=postgresql+asyncpg://... makes a
throwaway database on that server instead. Never the database DATABASE_URL names, and
never the mail server SMTP_URL names: the sign-ups' mail goes to an SMTP server here
that drops it.
"""

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Sink
from pwdlib import PasswordHash
from sqlalchemy import make_url, pool, text
from sqlalchemy.ext.asyncio import create_async_engine

PROJECT_DIR = Path(__file__).parent.parent
ROWS = 1000
# Any argon2 hash will do for the rows that are only read; user1 logs in for real.
HASH = "$argon2id$v=19$m=65536,t=3,p=4$" + "a" * 22 + "$" + "b" * 43
PASSWORD = "bench-pass"


async def execute(
    url: str, statement: str, rows: list[dict[str, str]] | None = None
) -> None:
    engine = create_async_engine(
        url, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool
    )
    async with engine.connect() as connection:
        await connection.execute(text(statement), rows)
    await engine.dispose()


def prepare(url: str) -> None:
    """Migrate the database and seed it: user1 (id 2) can log in, user499 has id 500."""
    env = {**os.environ, "DATABASE_URL": url}
    alembic = [sys.executable, "-m", "alembic", "upgrade", "head"]
    subprocess.run(alembic, cwd=PROJECT_DIR, env=env, check=True, capture_output=True)
    seed = [{"email": f"user{i}@example.com", "password": HASH} for i in range(ROWS)]
    seed[1]["password"] = PasswordHash.recommended().hash(PASSWORD)
    insert = (
        "INSERT INTO users (email, password, is_active, is_verified)"
        " VALUES (:email, :password, true, true)"
    )
    asyncio.run(execute(url, insert, seed))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def serve(
    app: str, env: dict[str, str], workers: int, http: str
) -> tuple[subprocess.Popen[bytes], str]:
    """Start uvicorn on a free port with `app` ("module:attribute"); its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", app, "--port", str(port)]
    command += ["--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    command += ["--http", http]
    server = subprocess.Popen(command, cwd=PROJECT_DIR, env=env)
    base = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            if httpx.get(f"{base}/openapi.json").status_code == 200:
                return server, base
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit(f"{app} did not start")


def log_in(base: str) -> str:
    """user1's bearer token."""
    form = {"username": "user1@example.com", "password": PASSWORD}
    return str(httpx.post(f"{base}/auth/token", data=form).json()["access_token"])


async def load(
    base: str,
    request: Callable[[str], str],
    token: str,
    seconds: float,
    concurrency: int,
) -> tuple[list[float], int, float]:
    """Send requests made by `request` on `concurrency` keep-alive connections for
    `seconds`, then wait for the answers on their way.

    Returns each request's latency in seconds, how many were not answered 2xx, and
    the seconds it all took (past `seconds` by the slowest answer: a sign-up's).
    """
    host, port = base.removeprefix("http://").split(":")
    latencies: list[float] = []
    failures = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def client(i: int) -> None:
        nonlocal failures
        # Each connection from a loopback address of its own: 32 clients, not one
        # client past its share of the hashing queue.
        reader, writer = await asyncio.open_connection(
            host, int(port), local_addr=(f"127.0.0.{i + 2}", 0)
        )
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(request(token).encode())
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            failures += not 200 <= status < 300
        writer.close()

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return latencies, failures, time.perf_counter() - start


def get(path: str, token: str) -> str:
    auth = f"Authorization: Bearer {token}"
    return f"GET {path} HTTP/1.1\r\nHost: bench\r\n{auth}\r\n\r\n"


def read_me(token: str) -> str:
    return get("/users/me", token)


def create_user(_token: str) -> str:  # anyone may sign up
    body = f'{{"email": "{uuid.uuid4().hex}@example.com", "password": "bench-pass"}}'
    head = "POST /users HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n{body}"


def read_user_500(token: str) -> str:  # the reference apps ignore the token
    return get("/users/500", token)


SCENARIOS = {
    "GET /users/me": read_me,
    "POST /users": create_user,
}
# --compare: the template's logged-in read against anonymous reads of one user by id.
COMPARED = {
    "template, GET /users/me": ("main:app", read_me),
    "bare ormar, GET /users/500": ("tests.reference_apps:ormar_app", read_user_500),
    "SQLAlchemy, GET /users/500": (
        "tests.reference_apps:sqlalchemy_app",
        read_user_500,
    ),
}
BASELINE = "bare ormar, GET /users/500"


def table(base: str, token: str, seconds: float, concurrency: int) -> None:
    """The template's scenarios, one row each."""
    print(f"{'':22}{'req/s':>8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'non-2xx':>9}")
    for name, request in SCENARIOS.items():
        asyncio.run(load(base, request, token, 1, concurrency))  # warm-up
        times, failures, took = asyncio.run(
            load(base, request, token, seconds, concurrency)
        )
        q = statistics.quantiles(times, n=100) if len(times) > 1 else [times[0]] * 99
        row = f"{name:22}{len(times) / took:8.0f}"
        row += "".join(f"{q[p - 1] * 1000:9.1f}" for p in (50, 90, 99))
        print(f"{row}{failures:9}")


def compare(
    bases: dict[str, str], token: str, seconds: float, concurrency: int, rounds: int
) -> None:
    """Each app in turn, `rounds` times; median req/s and its ratio to BASELINE's."""
    rates: dict[str, list[float]] = {name: [] for name in COMPARED}
    failures = dict.fromkeys(COMPARED, 0)
    for name, (_, request) in COMPARED.items():  # warm-up
        asyncio.run(load(bases[name], request, token, 1, concurrency))
    for _ in range(rounds):
        for name, (_, request) in COMPARED.items():
            times, failed, took = asyncio.run(
                load(bases[name], request, token, seconds, concurrency)
            )
            rates[name].append(len(times) / took)
            failures[name] += failed
    baseline = statistics.median(rates[BASELINE])
    print(f"{'':28}{'median':>7}{'ratio':>7}{'non-2xx':>8}  req/s per round")
    for name, rate in rates.items():
        median = statistics.median(rate)
        rounds_text = " ".join(f"{r:.0f}" for r in rate)
        print(
            f"{name:28}{median:7.0f}{median / baseline:7.2f}{failures[name]:8}  {rounds_text}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--http", default="h11", help="uvicorn's HTTP parser")
    options = parser.parse_args()

    server_url = os.environ.get("BENCH_DATABASE_URL")
    directory = tempfile.TemporaryDirectory()
    if server_url:
        database = f"bench_{uuid.uuid4().hex[:12]}"
        server = make_url(server_url).render_as_string(hide_password=False)
        asyncio.run(execute(server, f'CREATE DATABASE "{database}"'))
        url = (
            make_url(server_url)
            .set(database=database)
            .render_as_string(hide_password=False)
        )
    else:
        url = f"sqlite+aiosqlite:///{directory.name}/bench.sqlite"

    apps = {name: app for name, (app, _) in COMPARED.items()}
    if not options.compare:
        apps = {"template": "main:app"}
    servers: list[subprocess.Popen[bytes]] = []
    mail = Controller(Sink(), hostname="127.0.0.1", port=free_port())
    mail.start()
    env = {**os.environ, "DATABASE_URL": url}
    env["SMTP_URL"] = f"smtp://127.0.0.1:{mail.port}"
    # Sign-ups measure the app's work, not the per-client limit (each connection's
    # address would pass it in a run of more than a few seconds).
    env["SIGN_UPS_AND_RESETS_PER_MINUTE"] = str(10**9)
    try:
        prepare(url)
        bases: dict[str, str] = {}
        for name, app in apps.items():
            process, bases[name] = serve(app, env, options.workers, options.http)
            servers.append(process)
        token = log_in(next(iter(bases.values())))  # the template's
        print(
            f"{make_url(url).get_backend_name()}, {options.workers} worker(s), "
            f"--http {options.http}, ",
            end="",
        )
        print(f"{options.concurrency} connections, {options.seconds:g} s per ", end="")
        print("round" if options.compare else "row", end="")
        print(f"; Python {platform.python_version()}, {os.cpu_count()} CPUs")
        if options.compare:
            print(f"{options.rounds} rounds")
            compare(bases, token, options.seconds, options.concurrency, options.rounds)
        else:
            table(bases["template"], token, options.seconds, options.concurrency)
    finally:
        for process in servers:
            process.terminate()
            process.wait(timeout=30)
        mail.stop()
        if server_url:
            asyncio.run(execute(server, f'DROP DATABASE "{database}" WITH (FORCE)'))


if __name__ == "__main__":
    main()

"""Several app processes (`uvicorn --workers 2`) serve the API on one database."""

from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from support import (
    Server,
    StartServer,
    log_in_on,
    loopback,
    server_client_at,
    sign_up_on,
)

USERS = 8  # 16 argon2 hashes at full strength, ~2.5 s of CPU
NO_KEEP_ALIVE = httpx.Limits(max_keepalive_connections=0)


@pytest.fixture
def server(migrated_url: str, start_server: StartServer) -> Iterator[Server]:
    """Two workers on a new migrated database, as the README says."""
    with start_server(migrated_url, "--workers", "2") as server:
        yield server


def worker_cpu_seconds(server: Server) -> list[float]:
    """CPU time so far of each process the server started (its workers)."""
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    times = []
    for child in children:
        fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        times.append((int(fields[11]) + int(fields[12])) / 100)  # utime + stime
    return times


def busy_workers(server: Server, before: list[float]) -> int:
    """How many of the server's processes have spent CPU since `before`: 20 ms, some
    tens of reads."""
    after = worker_cpu_seconds(server)  # the same processes: none was restarted
    return sum(end - start > 0.02 for start, end in zip(before, after, strict=True))


@pytest.mark.slow
@pytest.mark.anyio
async def test_two_workers_serve_the_api_on_one_database(server: Server) -> None:
    sessions: dict[str, dict[str, str]] = {}

    # Hashing is slow on purpose: they queue for a while on two cores. A connection
    # per request, so that a user's requests go to either worker (the first to accept);
    # each user from an address of their own, so that none meets its share of the queue.
    async def sign_up_and_log_in(i: int) -> None:
        async with server_client_at(
            server.url, loopback(i), timeout=60, limits=NO_KEEP_ALIVE
        ) as client:
            email = f"user{i}@example.com"
            await sign_up_on(client, email)
            sessions[email] = await log_in_on(client, email)

    async with anyio.create_task_group() as tasks:
        for i in range(USERS):
            tasks.start_soon(sign_up_and_log_in, i)

    # Every token works on whichever worker takes the request. Which one does is the
    # kernel's choice: read in bursts until both have served (one rarely takes all).
    before = worker_cpu_seconds(server)
    ids: set[int] = set()
    async with httpx.AsyncClient(
        base_url=server.url, timeout=60, limits=NO_KEEP_ALIVE
    ) as client:

        async def read_me(email: str) -> None:
            me = await client.get("/users/me", headers=sessions[email])
            assert me.status_code == 200
            assert me.json()["email"] == email
            ids.add(me.json()["id"])

        for _ in range(20):
            async with anyio.create_task_group() as tasks:
                for email in sessions:
                    for _ in range(4):
                        tasks.start_soon(read_me, email)
            if busy_workers(server, before) >= 2:
                break
    assert len(ids) == USERS  # as many accounts, none given another's id
    assert busy_workers(server, before) >= 2, worker_cpu_seconds(server)

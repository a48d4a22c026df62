"""Several app processes (`uvicorn --workers 2`) serve the API on one database."""

from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from support import PASSWORD, Server, StartServer

USERS = 8  # 17 argon2 hashes at full strength, ~2.5 s of CPU


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


async def log_in(client: httpx.AsyncClient, email: str) -> dict[str, str]:
    form = {"username": email, "password": PASSWORD}
    response = await client.post("/auth/token", data=form)
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


@pytest.mark.anyio
async def test_two_workers_serve_the_api_on_one_database(server: Server) -> None:
    statuses: list[int] = []
    before = worker_cpu_seconds(server)

    # Hashing is slow on purpose: they queue for a while on two cores. A connection
    # per request, so that a user's requests go to either worker (the first to accept).
    no_keep_alive = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=server.url, timeout=60, limits=no_keep_alive
    ) as client:

        async def sign_up_log_in_and_read(i: int) -> None:
            email = f"user{i}@example.com"
            body = {"email": email, "password": PASSWORD}
            statuses.append((await client.post("/users", json=body)).status_code)
            headers = await log_in(client, email)
            me = await client.get("/users/me", headers=headers)
            statuses.append(me.status_code)
            assert me.json()["email"] == email  # each worker finds every token

        async with anyio.create_task_group() as tasks:
            for i in range(USERS):
                tasks.start_soon(sign_up_log_in_and_read, i)

        headers = await log_in(client, "user0@example.com")
        users = await client.get("/users", params={"limit": 100}, headers=headers)

    assert sorted(statuses) == [200] * USERS + [201] * USERS
    assert len(users.json()) == USERS
    # Both workers answered requests: each spent at least a hash's CPU (~0.1 s).
    after = worker_cpu_seconds(server)  # the same workers: none was restarted
    spent = [end - start for start, end in zip(before, after, strict=True)]
    print(f"\nCPU seconds per worker: {spent}")
    assert sum(seconds > 0.05 for seconds in spent) >= 2, spent

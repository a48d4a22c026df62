"""Several app processes (`uvicorn --workers 2`) serve the API on one database."""

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import anyio
import httpx
import pytest

from conftest import PROJECT_DIR


@pytest.fixture
def server_url(empty_database_url: str) -> Iterator[str]:
    """Migrate a new database once, then start two workers on it, as the README says."""
    env = {**os.environ, "DATABASE_URL": empty_database_url}
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=PROJECT_DIR,
        env=env,
        check=True,
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "main:app",
            "--workers",
            "2",
            "--port",
            str(port),
        ],
        cwd=PROJECT_DIR,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, "the server exited"
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.anyio
async def test_two_workers_serve_the_api_on_one_database(server_url: str) -> None:
    statuses: list[int] = []

    # 20 argon2 hashes on 2 workers take seconds on a busy machine: httpx's default 5 s
    # read timeout failed here under load; what this test checks is the answers.
    async with httpx.AsyncClient(base_url=server_url, timeout=60) as client:

        async def sign_up_and_read(i: int) -> None:
            response = await client.post(
                "/users",
                json={"email": f"user{i}@example.com", "password": "s3cret-pass"},
            )
            statuses.append(response.status_code)
            if response.status_code == 201:
                read = await client.get(f"/users/{response.json()['id']}")
                statuses.append(read.status_code)

        async with anyio.create_task_group() as tasks:
            for i in range(20):
                tasks.start_soon(sign_up_and_read, i)

        users = (await client.get("/users", params={"limit": 100})).json()

    assert sorted(statuses) == [200] * 20 + [201] * 20
    assert len(users) == 20

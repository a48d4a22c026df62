"""Several app processes (`uvicorn --workers 2`) serve the API on one database."""

from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from conftest import migrate, start_server


@pytest.fixture
def server_url(empty_database_url: str, tmp_path: Path) -> Iterator[str]:
    """Migrate a new database once, then start two workers on it, as the README says."""
    migrate(empty_database_url)
    with start_server(
        empty_database_url, tmp_path / "server.log", "--workers", "2"
    ) as server:
        yield server.url


@pytest.mark.anyio
async def test_two_workers_serve_the_api_on_one_database(server_url: str) -> None:
    statuses: list[int] = []

    async with httpx.AsyncClient(base_url=server_url) as client:

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

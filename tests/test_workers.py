"""Several app processes (`uvicorn --workers 2`) serve the API on one database."""

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from conftest import PASSWORD, log_in, loopback, migrate, server_client_at, start_server


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
    ids: set[int] = set()

    # Hashing is slow on purpose: 40 of them queue for a while on two cores.
    async def sign_up_log_in_and_read(i: int) -> None:
        # Twenty people, each from an address of their own.
        async with server_client_at(server_url, loopback(i), timeout=60) as client:
            email = f"user{i}@example.com"
            body = {"email": email, "password": PASSWORD}
            statuses.append((await client.post("/users", json=body)).status_code)
            headers = await log_in(client, email)
            me = await client.get("/users/me", headers=headers)
            statuses.append(me.status_code)
            assert me.json()["email"] == email  # each worker finds every token
            ids.add(me.json()["id"])

    async with anyio.create_task_group() as tasks:
        for i in range(20):
            tasks.start_soon(sign_up_log_in_and_read, i)

    assert sorted(statuses) == [200] * 20 + [201] * 20
    assert len(ids) == 20  # twenty accounts, none given another's id

"""Several app processes (`uvicorn --workers 2`) serve the API on one database."""

from collections.abc import Iterator

import anyio
import httpx
import pytest

from support import PASSWORD, StartServer


@pytest.fixture
def server_url(migrated_url: str, start_server: StartServer) -> Iterator[str]:
    """Two workers on a new migrated database, as the README says."""
    with start_server(migrated_url, "--workers", "2") as server:
        yield server.url


async def log_in(client: httpx.AsyncClient, email: str) -> dict[str, str]:
    form = {"username": email, "password": PASSWORD}
    response = await client.post("/auth/token", data=form)
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


@pytest.mark.anyio
async def test_two_workers_serve_the_api_on_one_database(server_url: str) -> None:
    statuses: list[int] = []

    # Hashing is slow on purpose: 40 of them queue for a while on two cores.
    async with httpx.AsyncClient(base_url=server_url, timeout=60) as client:

        async def sign_up_log_in_and_read(i: int) -> None:
            email = f"user{i}@example.com"
            body = {"email": email, "password": PASSWORD}
            statuses.append((await client.post("/users", json=body)).status_code)
            headers = await log_in(client, email)
            me = await client.get("/users/me", headers=headers)
            statuses.append(me.status_code)
            assert me.json()["email"] == email  # each worker finds every token

        async with anyio.create_task_group() as tasks:
            for i in range(20):
                tasks.start_soon(sign_up_log_in_and_read, i)

        headers = await log_in(client, "user0@example.com")
        users = await client.get("/users", params={"limit": 100}, headers=headers)

    assert sorted(statuses) == [200] * 20 + [201] * 20
    assert len(users.json()) == 20

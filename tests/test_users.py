"""The users API, through the real app and its lifespan, on a migrated database."""

import time
from typing import Any

import anyio
import httpx
import pytest

from main import app

pytestmark = pytest.mark.anyio

USERS = app.url_path_for("list_users")


def user_url(user_id: int) -> str:
    return app.url_path_for("read_user", user_id=str(user_id))


async def create(
    client: httpx.AsyncClient, email: str, password: str = "s3cret-pass"
) -> Any:
    response = await client.post(USERS, json={"email": email, "password": password})
    assert response.status_code == 201, response.text
    return response.json()


async def test_create_user_returns_201_with_the_user(client: httpx.AsyncClient) -> None:
    response = await client.post(
        USERS, json={"email": "ann@example.com", "password": "s3cret-pass"}
    )
    assert response.status_code == 201
    body = response.json()
    assert body == {"id": body["id"], "email": "ann@example.com", "is_active": True}
    assert (await client.get(user_url(body["id"]))).json() == body


async def test_create_user_normalises_the_email(client: httpx.AsyncClient) -> None:
    user = await create(client, "Alice@Example.COM")
    assert user["email"] == "alice@example.com"
    response = await client.post(
        USERS, json={"email": "alice@example.com", "password": "other-pass"}
    )
    assert response.status_code == 409
    assert response.json() == {"detail": "Email already registered"}


@pytest.mark.parametrize(
    "body",
    [
        {"email": "not-an-email", "password": "s3cret-pass"},
        {"email": "ann@example.com", "password": "short"},
        {"email": "ann@example.com", "password": "x" * 129},
        {"email": f"{'a' * 60}@example.com", "password": "s3cret-pass"},
        {"email": "ann@example.com"},
        {"email": 42, "password": "s3cret-pass"},
        {"email": "ann@example.com", "password": None},
    ],
)
async def test_create_user_rejects_bad_bodies_with_422(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    response = await client.post(USERS, json=body)
    assert response.status_code == 422
    assert (await client.get(USERS)).json() == []


async def test_create_user_rejects_malformed_json_with_422(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        USERS, content=b'{"email": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422


async def test_create_user_ignores_a_client_sent_id(client: httpx.AsyncClient) -> None:
    first = await create(client, "first@example.com")
    response = await client.post(
        USERS,
        json={
            "id": first["id"],
            "email": "second@example.com",
            "password": "s3cret-pass",
        },
    )
    assert response.status_code == 201
    assert response.json()["id"] != first["id"]


async def test_list_users_pages_in_id_order(client: httpx.AsyncClient) -> None:
    created = [await create(client, f"user{i}@example.com") for i in range(5)]
    assert (await client.get(USERS)).json() == created
    page = await client.get(USERS, params={"limit": 2, "offset": 1})
    assert page.json() == created[1:3]


@pytest.mark.parametrize(
    "params", [{"limit": 0}, {"limit": 101}, {"offset": -1}, {"limit": "many"}]
)
async def test_list_users_rejects_paging_out_of_range_with_422(
    client: httpx.AsyncClient, params: dict[str, Any]
) -> None:
    assert (await client.get(USERS, params=params)).status_code == 422


async def test_read_unknown_user_returns_404(client: httpx.AsyncClient) -> None:
    response = await client.get(user_url(999999))
    assert response.status_code == 404
    assert response.json() == {"detail": "User not found"}


async def test_read_user_with_a_non_integer_id_returns_422(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get(f"{USERS}/abc")).status_code == 422


async def test_update_user_changes_only_the_sent_fields(
    client: httpx.AsyncClient,
) -> None:
    user = await create(client, "ann@example.com")
    response = await client.patch(user_url(user["id"]), json={"is_active": False})
    assert response.status_code == 200
    assert response.json() == user | {"is_active": False}

    response = await client.patch(
        user_url(user["id"]), json={"email": "Ann.New@Example.com"}
    )
    assert response.json() == user | {
        "is_active": False,
        "email": "ann.new@example.com",
    }
    assert (await client.get(user_url(user["id"]))).json() == response.json()


async def test_update_user_with_an_empty_body_changes_nothing(
    client: httpx.AsyncClient,
) -> None:
    user = await create(client, "ann@example.com")
    response = await client.patch(user_url(user["id"]), json={})
    assert response.status_code == 200
    assert response.json() == user


async def test_update_user_to_a_taken_email_returns_409(
    client: httpx.AsyncClient,
) -> None:
    ann = await create(client, "ann@example.com")
    await create(client, "bob@example.com")
    response = await client.patch(
        user_url(ann["id"]), json={"email": "BOB@example.com"}
    )
    assert response.status_code == 409
    assert response.json() == {"detail": "Email already registered"}
    assert (await client.get(user_url(ann["id"]))).json() == ann


async def test_update_unknown_user_returns_404(client: httpx.AsyncClient) -> None:
    response = await client.patch(user_url(999999), json={"is_active": False})
    assert response.status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"email": None},
        {"password": None},
        {"is_active": None},
        {"password": "short"},
        {"email": "nope"},
        {"is_active": "maybe"},
    ],
)
async def test_update_user_rejects_bad_values_with_422(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    user = await create(client, "ann@example.com")
    response = await client.patch(user_url(user["id"]), json=body)
    assert response.status_code == 422
    assert (await client.get(user_url(user["id"]))).json() == user


async def test_delete_user_returns_204_then_404(client: httpx.AsyncClient) -> None:
    user = await create(client, "ann@example.com")
    response = await client.delete(user_url(user["id"]))
    assert response.status_code == 204
    assert response.content == b""
    assert (await client.get(user_url(user["id"]))).status_code == 404
    assert (await client.delete(user_url(user["id"]))).status_code == 404


async def test_no_response_contains_the_password_or_its_hash(
    client: httpx.AsyncClient,
) -> None:
    password, new_password = "first-s3cret", "second-s3cret"
    user = await create(client, "ann@example.com", password)
    responses = [
        await client.get(USERS),
        await client.get(user_url(user["id"])),
        await client.patch(user_url(user["id"]), json={"password": new_password}),
        await client.post(
            USERS, json={"email": "ann@example.com", "password": password}
        ),
        await client.get(app.url_path_for("health")),
        await client.get("/openapi.json"),
        await client.delete(user_url(user["id"])),
    ]
    for response in responses:
        for secret in (password, new_password, "$argon2", '"password": "$'):
            assert secret not in response.text
    schemas = responses[-2].json()["components"]["schemas"]
    assert set(schemas["UserRead"]["properties"]) == {"id", "email", "is_active"}


async def test_passwords_are_stored_as_argon2id_hashes(
    client: httpx.AsyncClient,
) -> None:
    from db import Users
    from main import password_hash

    user = await create(client, "ann@example.com", "first-s3cret")
    stored = (await Users.objects.get(id=user["id"])).password
    assert stored.startswith("$argon2id$")
    assert password_hash.verify("first-s3cret", stored)

    await client.patch(user_url(user["id"]), json={"password": "second-s3cret"})
    stored = (await Users.objects.get(id=user["id"])).password
    assert password_hash.verify("second-s3cret", stored)


async def test_parallel_sign_ups_all_land(client: httpx.AsyncClient) -> None:
    emails = [f"user{i}@example.com" for i in range(30)]
    statuses: list[int] = []

    async def sign_up(email: str) -> None:
        response = await client.post(
            USERS, json={"email": email, "password": "s3cret-pass"}
        )
        statuses.append(response.status_code)

    async with anyio.create_task_group() as tasks:
        for email in emails:
            tasks.start_soon(sign_up, email)

    assert statuses == [201] * len(emails)
    listed = (await client.get(USERS, params={"limit": 100})).json()
    assert sorted(user["email"] for user in listed) == sorted(emails)


async def test_parallel_sign_ups_with_one_email_give_one_201_and_409s(
    client: httpx.AsyncClient,
) -> None:
    statuses: list[int] = []

    async def sign_up(password: str) -> None:
        response = await client.post(
            USERS, json={"email": "same@example.com", "password": password}
        )
        statuses.append(response.status_code)

    async with anyio.create_task_group() as tasks:
        for i in range(10):
            tasks.start_soon(sign_up, f"password-{i}")

    assert sorted(statuses) == [201] + [409] * 9
    assert len((await client.get(USERS)).json()) == 1


async def test_parallel_email_changes_to_one_address_give_one_200_and_409s(
    client: httpx.AsyncClient,
) -> None:
    # No hashing on this path, so the requests really meet at the unique constraint.
    users = [await create(client, f"user{i}@example.com") for i in range(10)]
    statuses: list[int] = []

    async def change_email(user_id: int) -> None:
        response = await client.patch(
            user_url(user_id), json={"email": "same@example.com"}
        )
        statuses.append(response.status_code)

    async with anyio.create_task_group() as tasks:
        for user in users:
            tasks.start_soon(change_email, user["id"])

    assert sorted(statuses) == [200] + [409] * 9
    listed = (await client.get(USERS)).json()
    assert [user["email"] for user in listed].count("same@example.com") == 1


async def test_other_requests_are_served_while_passwords_hash(
    client: httpx.AsyncClient,
) -> None:
    started = time.perf_counter()
    await create(client, "first@example.com")
    one_sign_up = time.perf_counter() - started

    waits: list[float] = []
    async with anyio.create_task_group() as tasks:
        started = time.perf_counter()
        for i in range(8):
            tasks.start_soon(create, client, f"user{i}@example.com")
        await anyio.sleep(0)  # let the sign-ups start hashing
        for _ in range(5):
            assert (await client.get(app.url_path_for("health"))).status_code == 200
            waits.append(time.perf_counter() - started)
            started = time.perf_counter()

    # Hashing on the event loop would hold the first of these for all eight hashes.
    assert max(waits) < one_sign_up

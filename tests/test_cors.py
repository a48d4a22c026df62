"""Browser front ends: the origins in CORS_ORIGINS may call the API with a bearer token.

Through a real server: tests/test_guessing.py, whose server lists two front ends."""

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from core.settings import Settings
from support import LoggedIn, imported_again

pytestmark = pytest.mark.anyio

FRONT_END = "https://app.example.com"


def preflight(origin: str) -> dict[str, str]:
    """What a browser sends before a cross-origin request with an Authorization header."""
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "authorization, content-type",
    }


async def test_no_origin_is_allowed_by_default(client: httpx.AsyncClient) -> None:
    response = await client.options("/users/me", headers=preflight(FRONT_END))
    assert "access-control-allow-origin" not in response.headers


def app_with(monkeypatch: pytest.MonkeyPatch, **environment: str) -> FastAPI:
    """The app that main.py builds in this environment (it reads it at import)."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    app = imported_again("main.py").app
    assert isinstance(app, FastAPI)
    return app


async def test_listed_origins_call_the_in_process_api_with_a_bearer_token(
    ann: LoggedIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `ann` has connected the database and logged in, through main.app.
    origins = f"{FRONT_END}, https://admin.example.com"
    transport = httpx.ASGITransport(app=app_with(monkeypatch, CORS_ORIGINS=origins))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        allowed = await client.options("/users/me", headers=preflight(FRONT_END))
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == FRONT_END
        assert "PATCH" in allowed.headers["access-control-allow-methods"]
        assert "Authorization" in allowed.headers["access-control-allow-headers"]

        other = await client.options(
            "/users/me", headers=preflight("https://evil.example")
        )
        assert other.status_code == 400
        assert "access-control-allow-origin" not in other.headers

        me = await client.get("/users/me", headers={"Origin": FRONT_END, **ann.headers})
        assert me.json()["email"] == "ann@example.com"
        assert me.headers["access-control-allow-origin"] == FRONT_END


@pytest.mark.parametrize(
    "origins", ["*", "https://app.example.com/path", "app.example.com"]
)
def test_a_cors_origins_value_that_is_no_origin_stops_main_at_import(
    origins: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match=r"CORS_ORIGINS(.|\n)*not an origin"):
        app_with(monkeypatch, CORS_ORIGINS=origins)


@pytest.mark.parametrize(
    ("value", "is_origin"),
    [
        ("https://app.example.com", True),
        ("http://localhost:5173", True),
        ("http://[::1]:8080", True),
        ("*", False),  # any page could use its visitors' browsers as log-in guessers
        ("https://*.example.com", False),
        ("app.example.com", False),
        ("https://app.example.com/", False),
        ("https://app.example.com/path", False),
        ("https://user@app.example.com", False),
        ("https://app.example.com:port", False),
        ("ftp://app.example.com", False),
    ],
)
def test_only_origins_are_taken(value: str, is_origin: bool) -> None:
    try:
        taken = Settings(CORS_ORIGINS=value).CORS_ORIGINS == [value]  # type: ignore[arg-type]
    except ValidationError as error:
        assert "CORS_ORIGINS" in str(error)
        taken = False
    assert taken is is_origin

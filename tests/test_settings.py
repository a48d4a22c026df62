"""Settings: each read from its environment variable (or .env), a bad value stopping the
start with a message naming it; DATABASE_URL in the forms hosting platforms hand out."""

import asyncio
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import make_url, pool
from sqlalchemy.ext.asyncio import create_async_engine

from core.settings import Settings, async_url
from support import PROJECT_DIR, imported_again


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://u:pw@host:5432/app", "postgresql+asyncpg://u:pw@host:5432/app"),
        ("postgresql://u:pw@host/app", "postgresql+asyncpg://u:pw@host/app"),
        ("postgresql+asyncpg://u@host/app", "postgresql+asyncpg://u@host/app"),
        (
            "postgres://u@host/app?sslmode=require",
            "postgresql+asyncpg://u@host/app?ssl=require",
        ),
        # A password with URL-escaped characters keeps its escapes.
        (
            "postgresql://u:p%40ss%2F@host/app",
            "postgresql+asyncpg://u:p%40ss%2F@host/app",
        ),
        ("sqlite:///db.sqlite", "sqlite+aiosqlite:///db.sqlite"),
        ("sqlite:////var/data/app.sqlite", "sqlite+aiosqlite:////var/data/app.sqlite"),
        ("sqlite+aiosqlite:///db.sqlite", "sqlite+aiosqlite:///db.sqlite"),
    ],
)
def test_accepted_forms_map_to_the_async_drivers(url: str, expected: str) -> None:
    assert async_url(url) == expected


@pytest.mark.parametrize(
    ("url", "instead"),
    [
        ("postgresql+psycopg2://u@host/app", "write postgresql+asyncpg:// instead"),
        ("postgresql+psycopg://u@host/app", "write postgresql+asyncpg:// instead"),
        ("sqlite+pysqlite:///db.sqlite", "write sqlite+aiosqlite:// instead"),
        (
            "mysql://u@host/app",
            "write postgresql+asyncpg:// or sqlite+aiosqlite:// instead",
        ),
    ],
)
def test_other_drivers_are_refused_with_what_to_write(url: str, instead: str) -> None:
    with pytest.raises(ValueError, match=re.escape(instead)) as error:
        async_url(url)
    assert str(error.value).startswith(f"{url.split('://')[0]}://")


@pytest.mark.slow
def test_an_unknown_driver_stops_the_start_naming_the_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import main"],
        cwd=PROJECT_DIR,
        env={**os.environ, "DATABASE_URL": "mysql://u:secret@host/app"},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "validation error for Settings\nDATABASE_URL\n" in result.stderr
    assert (
        "mysql:// needs a driver this project does not install; write"
        " postgresql+asyncpg:// or sqlite+aiosqlite:// instead" in result.stderr
    )
    assert "secret" not in result.stderr


# A value each setting refuses, and what it is.
REFUSED = {
    "DATABASE_URL": "mysql://u:secret@host/app",
    "DATABASE_POOL_SIZE": "-20",
    "DATABASE_MAX_OVERFLOW": "-1",
    "MAX_BODY_SIZE": "16k",
    "CORS_ORIGINS": "https://app.example.com, *",
    "TRUSTED_PROXIES": "10.0.0.2, proxy.internal",
    "TOKEN_LIFETIME_HOURS": "a day",
    "SESSIONS_PER_USER": "-10",
    "SMTP_URL": "http://user:secret@mail.example.com",
    "MAIL_FROM": "noreply",
    "PUBLIC_URL": "app.example.com",
    "PASSWORD_HASHING_THREADS": "-1",
    "PASSWORD_HASHING_QUEUE": "many",
    "PASSWORD_HASHING_SHARE": "-4",
    "LOG_IN_ATTEMPTS": "-3",
    "LOG_IN_ATTEMPTS_PER_ACCOUNT": "1e9",
    "LOG_IN_PERIOD_MINUTES": "-15",
    "SIGN_UPS_AND_RESETS_PER_MINUTE": "twenty",
}


def test_every_setting_refuses_a_bad_value() -> None:
    assert set(REFUSED) == set(Settings.model_fields)


@pytest.mark.parametrize(("name", "value"), REFUSED.items())
def test_a_bad_value_stops_the_start_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as error:
        imported_again("main.py")
    printed = "".join(traceback.format_exception(error.value))
    assert re.search(rf"1 validation error for Settings\n{name}\b", printed)
    assert value not in printed and "secret" not in printed


def test_the_settings_read_the_projects_env_file_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """So `uvicorn main:app` reads .env, as `pipenv run` does."""
    project = tmp_path / "project"
    (project / "core").mkdir(parents=True)
    shutil.copy(PROJECT_DIR / "core" / "settings.py", project / "core")
    (project / ".env").write_text("LOG_IN_ATTEMPTS=7\nMAIL_FROM=app@example.com\n")
    monkeypatch.delenv("LOG_IN_ATTEMPTS", raising=False)
    monkeypatch.setenv("MAIL_FROM", "set@example.com")  # the environment comes first
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location(
        "copied_settings", project / "core" / "settings.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.settings.LOG_IN_ATTEMPTS == 7
    assert module.settings.MAIL_FROM == "set@example.com"


def documented(text: str) -> set[str]:
    return set(re.findall(r"`([A-Z][A-Z_]+)`", text))


def test_the_readme_table_lists_exactly_the_settings() -> None:
    readme = (PROJECT_DIR / "README.md").read_text()
    section = readme.split("## Configuration")[1].split("\n## ")[0]
    rows = [
        line.split("|")[1] for line in section.splitlines() if line.startswith("| `")
    ]
    assert set().union(*map(documented, rows)) == set(Settings.model_fields)


def test_the_env_example_lists_exactly_the_settings() -> None:
    example = (PROJECT_DIR / ".env.example").read_text()
    names = re.findall(r"^#? ?([A-Z][A-Z_]+)=", example, re.MULTILINE)
    assert set(names) == set(Settings.model_fields)


def test_the_sync_form_of_the_test_database_connects(test_database_url: str) -> None:
    """What a platform would hand out for the test database works once mapped."""
    url = make_url(test_database_url)
    url = url.set(drivername=url.get_backend_name())  # postgresql://, sqlite://
    if url.get_backend_name() == "postgresql":
        # The test servers have no TLS; "require" would be refused, as it should be.
        url = url.update_query_dict({"sslmode": "disable"})

    async def select_one() -> int:
        engine = create_async_engine(
            async_url(url.render_as_string(hide_password=False)),
            poolclass=pool.NullPool,
        )
        async with engine.connect() as connection:
            value = (await connection.exec_driver_sql("SELECT 1")).scalar_one()
        await engine.dispose()
        return int(value)

    assert asyncio.run(select_one()) == 1

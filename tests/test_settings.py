"""DATABASE_URL: the forms hosting platforms hand out map to the async drivers."""

import asyncio
import os
import re
import subprocess
import sys
import traceback

import pytest
from sqlalchemy import make_url, pool
from sqlalchemy.ext.asyncio import create_async_engine

from db import async_url
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
    assert str(error.value).startswith(f"DATABASE_URL: {url.split('://')[0]}://")


@pytest.mark.slow
def test_an_unknown_driver_fails_at_import_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import db"],
        cwd=PROJECT_DIR,
        env={**os.environ, "DATABASE_URL": "mysql://u:secret@host/app"},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == (
        "ValueError: DATABASE_URL: mysql:// needs a driver this project does not "
        "install; write postgresql+asyncpg:// or sqlite+aiosqlite:// instead"
    )
    assert "secret" not in result.stderr


def test_an_unknown_driver_fails_at_import_in_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://u:secret@host/app")
    with pytest.raises(ValueError) as error:
        imported_again("db.py")
    printed = traceback.format_exception(error.value)  # as Python prints it, uncaught
    assert printed[-1] == (
        "ValueError: DATABASE_URL: mysql:// needs a driver this project does not "
        "install; write postgresql+asyncpg:// or sqlite+aiosqlite:// instead\n"
    )
    assert "secret" not in "".join(printed)


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

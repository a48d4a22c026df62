"""What the tests share besides fixtures: constants, helpers that need no fixture (for
clients of real servers), and the types of conftest's fixtures (the fixtures themselves
come as test arguments, never as imports)."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import httpx

PASSWORD = "s3cret-pass"

PROJECT_DIR = Path(__file__).parent.parent


def imported_again(file: str) -> ModuleType:
    """One of the project's files (main.py, db.py) run again as a module of its own:
    it reads os.environ at import, as in a new process, without starting one."""
    path = PROJECT_DIR / file
    spec = importlib.util.spec_from_file_location(f"{path.stem}_again", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class LoggedIn:
    """A signed-up user, and the headers that authenticate as them."""

    user: dict[str, Any]
    headers: dict[str, str]


def loopback(i: int) -> str:
    """Another loopback address for each i (127.0.0.2 up): uvicorn, like the app's
    per-address limits, sees each as another client."""
    return f"127.0.0.{i + 2}"


def server_client_at(url: str, address: str, **options: Any) -> httpx.AsyncClient:
    """A client of a real server whose connections come from `address`."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(base_url=url, transport=transport, **options)


async def sign_up_on(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD
) -> dict[str, Any]:
    """Create an account through the API that `client` talks to; return the user."""
    response = await client.post("/users", json={"email": email, "password": password})
    assert response.status_code == 201, response.text
    user: dict[str, Any] = response.json()
    return user


async def log_in_on(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD
) -> dict[str, str]:
    """Log in through the API; return the headers that authenticate as that user."""
    form = {"username": email, "password": password}
    response = await client.post("/auth/token", data=form)
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


class ClientAt(Protocol):
    """Another client of the in-process app, sending from `address`."""

    def __call__(self, address: str) -> httpx.AsyncClient: ...


class SignUp(Protocol):
    """Create an account through the API; return the user it answers."""

    async def __call__(
        self, email: str, password: str = PASSWORD
    ) -> dict[str, Any]: ...


class LogIn(Protocol):
    """Log in through the API; return the headers that authenticate as that user."""

    async def __call__(
        self, email: str, password: str = PASSWORD
    ) -> dict[str, str]: ...


@dataclass
class Server:
    """A `uvicorn main:app` process, and the file its stdout and stderr go to."""

    process: "subprocess.Popen[bytes]"
    url: str
    database_url: str
    log_path: Path

    def log(self) -> str:
        """Everything the process printed: uvicorn's access log and the app's errors."""
        return self.log_path.read_text(errors="replace")


class StartServer(Protocol):
    """Run `uvicorn main:app` in `project` (this one by default) on a database until it
    answers 200 on `ready_path`."""

    def __call__(
        self,
        database_url: str,
        *uvicorn_args: str,
        env: dict[str, str] | None = None,
        ready_path: str = "/health",
        project: Path = PROJECT_DIR,
    ) -> AbstractContextManager[Server]: ...


# A copy of the project, changed as a user changes theirs -----------------------------

# A field name no user will add to Users (the README's example is `nickname`): the
# tests add it to Users as the user has left it.
PROBE = "tutorial_test_probe"
PROBE_COLUMN = f"{PROBE}: str | None = ormar.String(max_length=32, nullable=True)"


def copy_project(tmp_path: Path) -> Path:
    """The whole project as it is now (with the user's own modules and revisions),
    copied so that the test may change it."""
    copy = tmp_path / "project"
    shutil.copytree(
        PROJECT_DIR,
        copy,
        ignore=shutil.ignore_patterns(
            ".venv",
            ".git",
            "__pycache__",
            ".pytest_cache",
            ".mypy_cache",
            ".ruff_cache",
            "db.sqlite*",
        ),
    )
    return copy


def add_users_field(project: Path, line: str) -> None:
    """Add a field to Users, wherever it stands in db.py among the user's models."""
    db = project / "db.py"
    anchor = r'^([ \t]*)ormar_config = BaseMeta\.copy\(tablename="users"\).*$'
    text, found = re.subn(
        anchor, lambda m: f"{m[0]}\n{m[1]}{line}", db.read_text(), count=1, flags=re.M
    )
    assert found, f"no line matching {anchor} in db.py"
    db.write_text(text)


def alembic(project: Path, database_url: str, *args: str, succeeds: bool = True) -> str:
    """Run the alembic command line in `project`; return what it printed.

    Warnings are errors, as in the test suite that runs the same migrations.
    """
    result = subprocess.run(
        [sys.executable, "-W", "error", "-m", "alembic", *args],
        cwd=project,
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
    )
    output = result.stdout + result.stderr
    assert (result.returncode == 0) == succeeds, output
    return output


def autogenerate(project: Path, database_url: str, message: str) -> str:
    return alembic(project, database_url, "revision", "--autogenerate", "-m", message)


def add_probe_column(project: Path, database_url: str) -> None:
    """Give Users a column of the test's own, and migrate."""
    add_users_field(project, PROBE_COLUMN)
    autogenerate(project, database_url, "add a probe column")
    alembic(project, database_url, "upgrade", "head")

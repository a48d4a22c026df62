"""What the tests share besides fixtures: constants, helpers that need no fixture (for
clients of real servers), and the types of the fixtures in tests/harness.py (the fixtures themselves
come as test arguments, never as imports)."""

import email
import importlib.util
import io
import itertools
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import (
    AbstractContextManager,
    contextmanager,
    redirect_stderr,
    redirect_stdout,
)
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import default
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, cast

import anyio.to_thread
import httpx
import pytest
import sqlalchemy
from aiosmtpd.smtp import Envelope
from alembic.config import CommandLine, Config
from pydantic import TypeAdapter
from zxcvbn.frequency_lists import FREQUENCY_LISTS

import core.settings
from accounts.schemas import Password
from db import Users

# The bounds the app sets, read from the code that sets them (the user's to change):
# the email's length from its column, the password's from the `Password` schema.
EMAIL_LENGTH = int(
    cast(sqlalchemy.String, Users.ormar_config.table.c.email.type).length or 0
)
_PASSWORD_SCHEMA = TypeAdapter(Password).json_schema()
PASSWORD_MIN: int = _PASSWORD_SCHEMA.get("minLength", 1)
PASSWORD_MAX: int = _PASSWORD_SCHEMA.get("maxLength", 1024)


def a_password(text: str) -> str:
    """`text` as a password within the bounds: repeated up to the least length, cut
    to the most."""
    stretched = text * (PASSWORD_MIN // len(text) + 1)
    return stretched[: max(PASSWORD_MIN, min(len(text), PASSWORD_MAX))]


def common_passwords(count: int) -> list[str]:
    """The `count` most common passwords (zxcvbn's list) that fit the bounds: refused
    for being common, not for their length."""
    fitting = (
        password
        for password in FREQUENCY_LISTS["passwords"]
        if PASSWORD_MIN <= len(password) <= PASSWORD_MAX
    )
    return list(itertools.islice(fitting, count))


def an_email(name: str, length: int) -> str:
    """An address `length` characters long: `name` padded, at example.com."""
    domain = "@example.com"
    return name + "a" * (length - len(name) - len(domain)) + domain


PASSWORD = a_password("s3cret-pass")

PROJECT_DIR = Path(__file__).parent.parent


def imported_again(file: str) -> ModuleType:
    """One of the project's files (main.py, db.py) run again as a module of its own,
    with the settings read again from os.environ, as in a new process, without one."""
    path = PROJECT_DIR / file
    spec = importlib.util.spec_from_file_location(f"{path.stem}_again", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(core.settings, "settings", core.settings.Settings())
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


class Mailbox:
    """What the tests' SMTP server (aiosmtpd, on a thread of this process) received:
    every server the tests start, and the in-process app, mail it (SMTP_URL)."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        message = email.message_from_bytes(content, policy=default)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.messages if m["To"] == address.lower()]

    def wait(self, address: str, count: int, timeout: float = 30) -> EmailMessage:
        """The `count`th message to `address`, once it has come."""
        deadline = time.monotonic() + timeout
        while len(self.to(address)) < count:
            assert time.monotonic() < deadline, f"no mail {count} to {address}"
            time.sleep(0.01)
        return self.to(address)[count - 1]

    async def arrived(self, address: str, count: int) -> EmailMessage:
        """`wait`, without holding up the event loop (the in-process app's mail)."""
        return await anyio.to_thread.run_sync(self.wait, address, count)


MAILBOX = Mailbox()


def link_token(message: EmailMessage) -> str:
    """The token of the link in a message, as a front end reads it from the URL."""
    found = re.search(r"#token=([A-Za-z0-9_-]+)", message.get_content())
    assert found, message.get_content()
    return found[1]


async def sign_up_on(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD
) -> None:
    """Create an account through the API that `client` talks to, and open the link
    mailed to its address."""
    mailed = len(MAILBOX.to(email))
    response = await client.post("/users", json={"email": email, "password": password})
    assert response.status_code == 202, response.text
    token = link_token(await MAILBOX.arrived(email, mailed + 1))
    body = {"token": token, "password": password}
    response = await client.post("/auth/verify-email", json=body)
    assert response.status_code == 204, response.text


def sign_up_with(client: httpx.Client, email: str, password: str = PASSWORD) -> None:
    """sign_up_on, for a client that is not async."""
    mailed = len(MAILBOX.to(email))
    response = client.post("/users", json={"email": email, "password": password})
    assert response.status_code == 202, response.text
    body = {"token": link_token(MAILBOX.wait(email, mailed + 1)), "password": password}
    assert client.post("/auth/verify-email", json=body).status_code == 204


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

    def log(self, since: int = 0) -> str:
        """What the process printed (uvicorn's access log and the app's errors), from
        `since`, a `log_size()` taken before: a test's own lines on a shared server."""
        with self.log_path.open("rb") as log:
            log.seek(since)
            return log.read().decode(errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size


def faults(log: str) -> list[str]:
    """The lines of a server's log that show a fault, for a failure message of a few
    lines: each 500, and each traceback's last frame and exception."""
    found, frame, in_traceback = [], "", False
    for line in log.splitlines():
        if line.startswith("Traceback"):
            in_traceback = True
        elif in_traceback and line.lstrip().startswith("File "):
            frame = line
        elif in_traceback and not line.startswith(" "):
            found += [frame, line]
            in_traceback = False
        elif '" 500' in line or "Exception in ASGI application" in line:
            found.append(line)
    return found


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


def in_project(module: ModuleType, project: Path) -> bool:
    """Whether `module` was imported from a file of `project`, not of its tests."""
    file = Path(getattr(module, "__file__", None) or "/")
    # Not the tests, nor the installed packages of a virtualenv inside the project.
    return file.is_relative_to(project) and not any(
        file.is_relative_to(other) for other in (project / "tests", sys.prefix)
    )


def project_modules() -> list[str]:
    """The modules imported from this project's own files (db, accounts, ...)."""
    return [n for n, m in list(sys.modules.items()) if in_project(m, PROJECT_DIR)]


@contextmanager
def as_alembic_in(project: Path, database_url: str) -> Iterator[None]:
    """This process, for one alembic command, as if started in `project`: its modules
    imported from `project` (and put back after), DATABASE_URL, the logging that
    env.py configures (put back after)."""
    modules, path, cwd = dict(sys.modules), list(sys.path), os.getcwd()
    # Their finders: the one of "." (pythonpath, alembic's prepend_sys_path) holds the
    # directory it was made in.
    finders = dict(sys.path_importer_cache)
    sys.path_importer_cache.clear()
    environ = os.environ.copy()
    loggers = [logging.getLogger(n) for n in ("", "sqlalchemy.engine", "alembic")]
    logged = [(lg.level, list(lg.handlers), lg.propagate) for lg in loggers]
    for name in project_modules():
        del sys.modules[name]
    sys.path.insert(0, str(project))
    os.chdir(project)
    os.environ["DATABASE_URL"] = database_url
    # A file rewritten within a second, same size, must not be read from its .pyc.
    sys.dont_write_bytecode, writing = True, sys.dont_write_bytecode
    try:
        yield
    finally:
        sys.dont_write_bytecode = writing
        os.chdir(cwd)
        sys.path[:] = path
        sys.path_importer_cache.clear()
        sys.path_importer_cache.update(finders)
        os.environ.clear()
        os.environ.update(environ)
        for name in project_modules() + [
            n for n, m in sys.modules.items() if in_project(m, project)
        ]:
            del sys.modules[name]
        sys.modules.update(modules)
        for logger, (level, handlers, propagate) in zip(loggers, logged, strict=True):
            logger.setLevel(level)
            logger.handlers[:] = handlers
            logger.propagate = propagate


def run_alembic(project: Path, output: io.StringIO, args: tuple[str, ...]) -> bool:
    """What the `alembic` command does, printing to `output` (Config's default stdout
    is the one at import); whether it succeeded."""
    try:
        command_line = CommandLine()
        options = command_line.parser.parse_args(args)
        config = Config(
            project / "alembic.ini",
            ini_section=options.name,
            stdout=output,
            cmd_opts=options,
        )
        command_line.run_cmd(config, options)
        return True
    except SystemExit as exit:  # alembic's errors: a message, exit status 1
        return exit.code in (0, None)
    except Exception:
        traceback.print_exc(file=output)
        return False


def alembic(project: Path, database_url: str, *args: str, succeeds: bool = True) -> str:
    """Run the alembic command line in `project`, in this process (the project's
    modules imported from there, without the 1 s of CPU of a new Python); return what
    it printed. Warnings are errors, as in the whole test suite.

    On a thread of its own: env.py runs an event loop, which an async test's thread
    has already.
    """
    output = io.StringIO()
    succeeded: list[bool] = []
    with (
        as_alembic_in(project, database_url),
        redirect_stdout(output),
        redirect_stderr(output),
    ):
        thread = threading.Thread(
            target=lambda: succeeded.append(run_alembic(project, output, args))
        )
        thread.start()
        thread.join()
    assert succeeded == [succeeds], output.getvalue()
    return output.getvalue()


def autogenerate(project: Path, database_url: str, message: str) -> str:
    return alembic(project, database_url, "revision", "--autogenerate", "-m", message)


def add_probe_column(project: Path, database_url: str) -> None:
    """Give Users a column of the test's own, and migrate."""
    add_users_field(project, PROBE_COLUMN)
    autogenerate(project, database_url, "add a probe column")
    alembic(project, database_url, "upgrade", "head")

"""What the tests share besides fixtures: constants, and the types of conftest's fixtures
(the fixtures themselves come as test arguments, never as imports)."""

import subprocess
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

PASSWORD = "s3cret-pass"

PROJECT_DIR = Path(__file__).parent.parent


@dataclass
class LoggedIn:
    """A signed-up user, and the headers that authenticate as them."""

    user: dict[str, Any]
    headers: dict[str, str]


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
    """Run `uvicorn main:app` on a database until it answers 200 on `ready_path`."""

    def __call__(
        self,
        database_url: str,
        *uvicorn_args: str,
        env: dict[str, str] | None = None,
        ready_path: str = "/health",
    ) -> AbstractContextManager[Server]: ...

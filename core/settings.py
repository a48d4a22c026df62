"""The service's settings: each one an environment variable of its name, or a line of
the project's `.env`, typed and defaulted here. A bad value stops the start with a
message that names the variable (and never quotes the value: it may be a password)."""

from datetime import timedelta
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import sqlalchemy
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    IPvAnyNetwork,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The async driver for each URL scheme we accept: hosting platforms hand out the sync
# forms (postgres://, postgresql://, sqlite:///), and the app and alembic need async ones.
ASYNC_DRIVERS = {
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
}


def async_url(url: str) -> str:
    """The URL with the async driver installed here; ValueError for other drivers."""
    parsed = sqlalchemy.make_url(url)
    driver = ASYNC_DRIVERS.get(parsed.drivername)
    if driver is None:
        backend = parsed.get_backend_name()
        instead = ASYNC_DRIVERS.get(
            backend, "postgresql+asyncpg:// or sqlite+aiosqlite"
        )
        raise ValueError(
            f"{parsed.drivername}:// needs a driver this project does not install;"
            f" write {instead}:// instead"
        )
    parsed = parsed.set(drivername=driver)
    if "sslmode" in parsed.query:
        # Platform URLs carry libpq's sslmode=...; asyncpg takes the same values as ssl=
        # (and raises TypeError on sslmode).
        sslmode = parsed.query["sslmode"]
        parsed = parsed.difference_update_query(["sslmode"]).update_query_dict(
            {"ssl": sslmode}
        )
    return parsed.render_as_string(hide_password=False)


def words(value: object) -> object:
    """A list written as `a,b` or `a b` (an environment variable's form)."""
    return value.replace(",", " ").split() if isinstance(value, str) else value


def origin(value: str) -> str:
    """scheme://host[:port], as browsers send it: no path, no user, no wildcard ("*"
    would let any page use its visitors' browsers as log-in guessers)."""
    parts = urlsplit(value)
    parts.port  # noqa: B018  (raises ValueError for a port that is no number)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or value != f"{parts.scheme}://{parts.netloc}"
        or {"*", "@"} & set(value)
    ):
        raise ValueError(
            "not an origin; list each front end's own as scheme://host[:port],"
            " such as https://app.example.com"
        )
    return value


def url_of(*schemes: str) -> AfterValidator:
    def checked(value: str) -> str:
        if value and urlsplit(value).scheme not in schemes:
            raise ValueError(
                f"write a {' or '.join(schemes)} URL, such as {schemes[0]}://host"
            )
        return value.rstrip("/")

    return AfterValidator(checked)


Words = BeforeValidator(words)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=Path(__file__).parent.parent / ".env", hide_input_in_errors=True
    )

    # The one database, for the app and alembic alike (postgres:// and sqlite:// work).
    DATABASE_URL: Annotated[str, AfterValidator(async_url)] = (
        "sqlite+aiosqlite:///db.sqlite"
    )
    # PostgreSQL connections per process: the pool, and extra ones opened per request.
    DATABASE_POOL_SIZE: PositiveInt = 20
    DATABASE_MAX_OVERFLOW: NonNegativeInt = 0
    # The largest request body, in bytes; past it, a 413.
    MAX_BODY_SIZE: PositiveInt = 16384
    # Browser origins (scheme://host[:port], comma-separated) whose pages may call the API.
    CORS_ORIGINS: Annotated[
        list[Annotated[str, AfterValidator(origin)]], NoDecode, Words
    ] = []
    # Sign-ups, and password reset requests, per client address within a minute of each
    # other (django-allauth's default); past it, a 429.
    SIGN_UPS_AND_RESETS_PER_MINUTE: PositiveInt = 20
    # Proxies (addresses or networks) whose X-Forwarded-For names the client.
    TRUSTED_PROXIES: Annotated[list[IPvAnyNetwork], NoDecode, Words] = []
    # How long a log-in lasts, in hours.
    TOKEN_LIFETIME_HOURS: PositiveFloat = 24
    # Live log-ins (and devices) per account; a log-in past it ends the oldest.
    SESSIONS_PER_USER: PositiveInt = 10
    # smtp://user:password@host:587 (STARTTLS if offered) or smtps://...; unset, mail is
    # written to the output instead.
    SMTP_URL: Annotated[str, url_of("smtp", "smtps")] = ""
    # The sender of the mail.
    MAIL_FROM: Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+$")] = "noreply@localhost"
    # The front end that links lead to (never the request's Host).
    PUBLIC_URL: Annotated[str, url_of("http", "https")] = "http://localhost:8000"
    # Parallel password hashes (64 MiB each); unset, the CPUs this process may use - 1.
    PASSWORD_HASHING_THREADS: PositiveInt | None = None
    # Sign-ups and log-ins that may wait for a hashing thread; past it, a 503.
    PASSWORD_HASHING_QUEUE: NonNegativeInt = 32
    # Of those, how many one client address may have; past it, a 429.
    PASSWORD_HASHING_SHARE: NonNegativeInt = 4
    # Password checks per account and client within LOG_IN_PERIOD_MINUTES of each other.
    LOG_IN_ATTEMPTS: PositiveInt = 10
    # The same for all clients without the account's device cookie together.
    LOG_IN_ATTEMPTS_PER_ACCOUNT: PositiveInt = 100
    # A count ends this long after the last attempt it let through, in minutes.
    LOG_IN_PERIOD_MINUTES: PositiveFloat = 15

    @property
    def LOG_IN_PERIOD(self) -> timedelta:
        return timedelta(minutes=self.LOG_IN_PERIOD_MINUTES)

    @property
    def TOKEN_LIFETIME(self) -> timedelta:
        return timedelta(hours=self.TOKEN_LIFETIME_HOURS)


settings = Settings()

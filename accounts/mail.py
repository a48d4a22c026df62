"""Mail: plain-text messages, sent through SMTP_URL's server outside the requests,
retried; without SMTP_URL, written whole to the server's output (for development)."""

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from email.message import EmailMessage
from urllib.parse import unquote, urlsplit

import aiosmtplib
import anyio
from anyio.abc import TaskGroup

from core.settings import settings

logger = logging.getLogger(__name__)

RETRY_DELAYS = (1.0, 10.0, 60.0)  # seconds before each retry of a failed send
SHUTDOWN_GRACE = 3.0  # seconds that mail still on its way gets at shutdown

outbox: TaskGroup | None = None


@asynccontextmanager
async def open_outbox() -> AsyncIterator[None]:
    """Run what `later` is given while the app runs (the lifespan opens it)."""
    global outbox
    if not settings.SMTP_URL:
        logger.warning("SMTP_URL is not set: mail is written here, not sent")
    async with anyio.create_task_group() as outbox:
        yield
        outbox.cancel_scope.deadline = anyio.current_time() + SHUTDOWN_GRACE
    outbox = None


def later(function: Callable[..., Awaitable[object]], *args: object) -> None:
    """Run `function(*args)` in the outbox: no request waits for it, or for its retries."""

    async def logged() -> None:
        try:
            await function(*args)
        except Exception:
            logger.exception("%s failed", function.__name__)

    assert outbox is not None, "the app's lifespan opens the outbox"
    outbox.start_soon(logged)


def message(to: str, subject: str, text: str) -> EmailMessage:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = settings.MAIL_FROM, to, subject
    message.set_content(text)
    return message


async def send(message: EmailMessage) -> None:
    """Send `message`, retried after each of RETRY_DELAYS; log a failure, without the
    message (it may hold a token)."""
    if not settings.SMTP_URL:
        headers = "".join(
            f"{name}: {message[name]}\n" for name in ("From", "To", "Subject")
        )
        logger.warning(
            "Mail (not sent: no SMTP_URL):\n%s\n%s", headers, message.get_content()
        )
        return
    smtp = urlsplit(settings.SMTP_URL)
    for retry in (*RETRY_DELAYS, None):
        try:
            await aiosmtplib.send(
                message,
                hostname=smtp.hostname,
                port=smtp.port,
                username=unquote(smtp.username) if smtp.username else None,
                password=unquote(smtp.password) if smtp.password else None,
                use_tls=smtp.scheme == "smtps",
                timeout=30,
            )
            return
        except (aiosmtplib.SMTPException, OSError) as error:
            if retry is None:
                tries = len(RETRY_DELAYS) + 1
                logger.error(
                    "Mail %r not sent (%d tries): %s", message["Subject"], tries, error
                )
                return
            await anyio.sleep(retry)

"""Mail: plain-text messages sent through SMTP_URL (by accounts.outbox), or written
to the output without it."""

import logging
from email.message import EmailMessage
from urllib.parse import unquote, urlsplit

import aiosmtplib

from core.settings import settings

logger = logging.getLogger(__name__)


def message(to: str, subject: str, text: str) -> EmailMessage:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = settings.MAIL_FROM, to, subject
    message.set_content(text)
    return message


async def send(message: EmailMessage) -> None:
    """Send `message` once: aiosmtplib.SMTPException or OSError if it fails."""
    if not settings.SMTP_URL:
        headers = "".join(
            f"{name}: {message[name]}\n" for name in ("From", "To", "Subject")
        )
        logger.warning(
            "Mail (not sent: no SMTP_URL):\n%s\n%s", headers, message.get_content()
        )
        return
    smtp = urlsplit(settings.SMTP_URL)
    await aiosmtplib.send(
        message,
        hostname=smtp.hostname,
        port=smtp.port,
        username=unquote(smtp.username) if smtp.username else None,
        password=unquote(smtp.password) if smtp.password else None,
        use_tls=smtp.scheme == "smtps",
        timeout=30,
    )

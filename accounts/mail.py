"""Mail: plain-text messages, sent through SMTP_URL's server (by the outbox,
accounts.outbox); without SMTP_URL, written whole to the server's output (for
development)."""

import logging
import os
from email.message import EmailMessage
from urllib.parse import unquote, urlsplit

import aiosmtplib

logger = logging.getLogger(__name__)

# smtp://user:password@host:587 (STARTTLS when the server offers it), or smtps://...
# (TLS from the start). Unset: each message is written to the output instead.
SMTP_URL = os.environ.get("SMTP_URL", "")
if SMTP_URL and urlsplit(SMTP_URL).scheme not in ("smtp", "smtps"):
    raise ValueError("SMTP_URL: write smtp://user:password@host:587 or smtps://...")
MAIL_FROM = os.environ.get("MAIL_FROM", "noreply@localhost")
# The front end's address, which every link starts with: never the request's Host.
PUBLIC_URL = os.environ.get("PUBLIC_URL", "http://localhost:8000").rstrip("/")
if urlsplit(PUBLIC_URL).scheme not in ("http", "https"):
    raise ValueError("PUBLIC_URL: write the front end's https://host[/path]")


def message(to: str, subject: str, text: str) -> EmailMessage:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = MAIL_FROM, to, subject
    message.set_content(text)
    return message


async def send(message: EmailMessage) -> None:
    """Send `message` once: aiosmtplib.SMTPException or OSError if it fails."""
    if not SMTP_URL:
        headers = "".join(
            f"{name}: {message[name]}\n" for name in ("From", "To", "Subject")
        )
        logger.warning(
            "Mail (not sent: no SMTP_URL):\n%s\n%s", headers, message.get_content()
        )
        return
    smtp = urlsplit(SMTP_URL)
    await aiosmtplib.send(
        message,
        hostname=smtp.hostname,
        port=smtp.port,
        username=unquote(smtp.username) if smtp.username else None,
        password=unquote(smtp.password) if smtp.password else None,
        use_tls=smtp.scheme == "smtps",
        timeout=30,
    )

"""Links mailed to an address (to prove it, to reset the password) and notices to the
owner. A link's token is random, stored as a digest like a session's, and used once;
what a stranger can have mailed to an address is capped with the log-in throttle's
counts. The functions that take `allowed` run after the answer, doing the same work
for every address; creating a link and sending it happen in the outbox."""

import secrets
from datetime import UTC, datetime, timedelta

import sqlalchemy
from sqlalchemy import RowMapping
from sqlalchemy.exc import IntegrityError

from accounts import mail, throttle
from accounts.models import Links
from accounts.sessions import token_digest
from core.settings import settings
from db import Users, database

RESET_LIFETIME = timedelta(hours=1)
ADDRESS_LIFETIME = timedelta(hours=24)  # a link that proves an address
# Mails of each kind (sign-up, reset, email change) to one address within the
# log-in throttle's period (LOG_IN_PERIOD_MINUTES); past it, none.
MAILS_PER_KIND = 3

PAGES = {"verify": "verify-email", "email": "verify-email", "reset": "reset-password"}
IF_NOT_YOU = "If it was not you, do not open the link."
LINKS = {
    "verify": (
        "Confirm your email address",
        f"Someone, hopefully you, signed up at {{site}} with this address.\n"
        f"To confirm it, open this link within {{hours}} h:\n\n{{link}}\n\n{IF_NOT_YOU}",
    ),
    "email": (
        "Confirm your new email address",
        f"Someone, hopefully you, asked to move their account at {{site}} to this\n"
        f"address. To confirm it, open this link within {{hours}} h:\n\n{{link}}\n\n"
        f"{IF_NOT_YOU}",
    ),
    "reset": (
        "Reset your password",
        "Someone, hopefully you, asked to reset the password of your account at\n"
        "{site}. To choose a new one, open this link within {hours} h:\n\n{link}\n\n"
        "If it was not you, ignore this message: your password stays as it is.",
    ),
}
NOTICES = {
    "exists": (
        "Someone tried to sign up with your address",
        "Someone tried to sign up at {site} with this address, which has an account\n"
        "already; the account is as it was. If it was you, log in, or reset your\n"
        "password if you have forgotten it.",
    ),
    "password": (
        "Your password was changed",
        "The password of your account at {site} was changed, and every other\n"
        "session ended. If it was not you, reset your password at once.",
    ),
    "email": (
        "Your email address was changed",
        "Your account at {site} now has another email address: this one no longer\n"
        "logs in to it.",
    ),
}


async def within_cap(kind: str, address: str) -> bool:
    """Count a mail of `kind` to `address`: whether it may be sent."""
    key = throttle.log_in_key("mail", kind, address)
    allowed, _ = await throttle.count_attempt(key, MAILS_PER_KIND)
    return allowed


async def send_link(user: Users, purpose: str, address: str) -> None:
    """Mail `address` a new link of `purpose` ("verify", "email", "reset") for the
    account, if it still has the email and password it had when `user` was read."""
    token = secrets.token_urlsafe(32)  # 256 random bits
    now = datetime.now(UTC)
    lifetime = RESET_LIFETIME if purpose == "reset" else ADDRESS_LIFETIME
    users, links = Users.ormar_config.table, Links.ormar_config.table
    link = {
        "digest": token_digest(token),
        "purpose": purpose,
        "email": address,
        "expires_at": now + lifetime,
    }
    # A condition of the insert: no link that a change made meanwhile (an email, a
    # password, a deletion) would have ended. PostgreSQL: a change in progress
    # commits before this reads the row.
    account = sqlalchemy.select(
        users.c.id, *(sqlalchemy.literal(v, links.c[k].type) for k, v in link.items())
    ).where(
        users.c.id == user.id,
        users.c.email == user.email,
        users.c.password == user.password,
    )
    insert = links.insert().from_select(
        ["user_id", *link], account.with_for_update(read=True)
    )
    async with database.get_query_executor() as executor:
        await executor.execute(links.delete().where(links.c.expires_at <= now))
        if await executor.fetch_one(insert.returning(links.c.digest)) is None:
            return
    subject, text = LINKS[purpose]
    url = f"{settings.PUBLIC_URL}/{PAGES[purpose]}#token={token}"
    hours = lifetime // timedelta(hours=1)
    text = text.format(site=settings.PUBLIC_URL, hours=hours, link=url)
    await mail.send(mail.message(address, subject, text))


def notify(address: str, notice: str) -> None:
    """Mail `address` one of the NOTICES, in the outbox."""
    subject, text = NOTICES[notice]
    message = mail.message(address, subject, text.format(site=settings.PUBLIC_URL))
    mail.later(mail.send, message)


async def use_link(token: str, *purposes: str) -> RowMapping | None:
    """Delete the token's link if it is live and for one of `purposes`; what it was
    (`user_id`, `purpose`, `email`). One statement: of two uses at once, one wins."""
    links = Links.ormar_config.table
    used = links.delete().where(
        links.c.digest == token_digest(token),
        links.c.purpose.in_(purposes),
        links.c.expires_at > datetime.now(UTC),
    )
    async with database.get_query_executor() as executor:
        return await executor.fetch_one(
            used.returning(links.c.user_id, links.c.purpose, links.c.email)
        )


def is_unique_violation(error: IntegrityError) -> bool:
    postgresql_code = getattr(error.orig, "sqlstate", None)
    sqlite_code = getattr(error.orig, "sqlite_errorname", None)
    return postgresql_code == "23505" or sqlite_code == "SQLITE_CONSTRAINT_UNIQUE"


async def sign_up(email: str, password: str, allowed: bool) -> None:
    """A new, unverified account and its link; for a taken address, a notice, and
    the account stays as it is (its password, its links)."""
    try:
        user = await Users.objects.create(email=email, password=password)
    except IntegrityError as error:
        if not is_unique_violation(error):
            raise
        user = None
    if user is not None:  # made once per account: its link is not capped
        mail.later(send_link, user, "verify", email)
    elif allowed:
        notify(email, "exists")


async def reset_requested(email: str, allowed: bool) -> None:
    """A reset link, if the address has an account."""
    user = await Users.objects.get_or_none(email=email)
    if allowed and user is not None:
        mail.later(send_link, user, "reset", email)


async def email_change_requested(user: Users, email: str, allowed: bool) -> None:
    """A link to the new address, unless an account has it."""
    taken = await Users.objects.filter(email=email).exists()
    if allowed and not taken:
        mail.later(send_link, user, "email", email)

"""Links mailed to prove an address or reset a password, and notices to the owner. A
token is random, stored as a digest, used once; mail to an address is capped with the
log-in throttle's counts. A link or a notice: decided as the outbox sends it."""

import secrets
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

import sqlalchemy
from sqlalchemy import RowMapping
from sqlalchemy.exc import IntegrityError

from accounts import mail, throttle
from accounts.models import Links, Mails
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
        f"To confirm it, open this link within {{hours}} h, and enter the password\n"
        f"you signed up with:\n\n{{link}}\n\n{IF_NOT_YOU}",
    ),
    "email": (
        "Confirm your new email address",
        f"Someone, hopefully you, asked to move their account at {{site}} to this\n"
        f"address. To confirm it, open this link within {{hours}} h, and enter the\n"
        f"account's password:\n\n{{link}}\n\n{IF_NOT_YOU}",
    ),
    "reset": (
        "Reset your password",
        "Someone, hopefully you, asked to reset the password of your account at\n"
        "{site}. To choose a new one, open this link within {hours} h:\n\n{link}\n\n"
        "If it was not you, ignore this message: your password stays as it is.",
    ),
}
# The notice that goes instead of a link of each kind when no link can be made.
INSTEAD = {"verify": "exists", "reset": "unknown", "email": "taken"}
NOTICES = {
    "exists": (
        "Someone tried to sign up with your address",
        "Someone tried to sign up at {site} with this address, which has an account\n"
        "already. If it was you, log in; if you cannot, reset your password: a reset\n"
        "lets the address's owner in, whoever signed up first. Links mailed before\n"
        "to confirm this address no longer work.",
    ),
    "unknown": (
        "Someone asked to reset a password",
        "Someone asked to reset a password at {site} for this address, but no\n"
        "account has it. If it was you, you may have signed up with another address.\n"
        "If it was not you, ignore this message.",
    ),
    "taken": (
        "Someone tried to move an account to your address",
        "Someone tried to move an account at {site} to this address, which has an\n"
        "account already; nothing changed. If it was not you, ignore this message.",
    ),
    "password": (
        "Your password was changed",
        "The password of your account at {site} was changed, and every other\n"
        "session ended. If it was not you, reset your password at once.",
    ),
    "moved": (
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


def lifetime(kind: str) -> timedelta:
    """How long a mail of `kind` is tried for, and its link lives."""
    return RESET_LIFETIME if kind == "reset" else ADDRESS_LIFETIME


async def made_link(mail_row: RowMapping, held: datetime, digest: str) -> bool | None:
    """Store the row's link if its account is as it should be (the new one, the
    address's, none at a new address); None if a change ended the row meanwhile."""
    users, links, mails = (m.ormar_config.table for m in (Users, Links, Mails))
    now = datetime.now(UTC)
    kind, taken = mail_row["kind"], sqlalchemy.alias(users)
    account = {
        "verify": users.c.id == mails.c.user_id,
        "reset": users.c.email == mails.c.email,
        "email": (users.c.id == mails.c.user_id)
        & ~sqlalchemy.exists().where(taken.c.email == mails.c.email),
    }[kind]
    values = {"digest": digest, "purpose": kind, "expires_at": now + lifetime(kind)}
    mine = (mails.c.id == mail_row["id"]) & (mails.c.due_at == held)
    select = sqlalchemy.select(
        users.c.id,
        mails.c.email,
        *(sqlalchemy.literal(v, links.c[k].type) for k, v in values.items()),
    ).where(mine, account)
    insert = links.insert().from_select(["user_id", "email", *values], select)
    async with database.transaction(), database.connection() as connection:
        tried = mails.update().where(mine).values(tries=mails.c.tries + 1)
        if not (await connection.execute(tried)).rowcount:
            return None
        # Rows another sender is deleting are its to delete: none waits on another.
        expired = sqlalchemy.select(links.c.digest).where(links.c.expires_at <= now)
        expired = expired.with_for_update(skip_locked=True)
        await connection.execute(links.delete().where(links.c.digest.in_(expired)))
        return (await connection.execute(insert)).rowcount == 1


async def compose(
    mail_row: RowMapping, held: datetime
) -> tuple[EmailMessage, str] | None:
    """The row's message and its link's digest ("" for a notice); None if ended."""
    kind, site = mail_row["kind"], settings.PUBLIC_URL
    token = secrets.token_urlsafe(32)  # 256 random bits
    digest = token_digest(token)
    made = await made_link(mail_row, held, digest) if kind in LINKS else False
    if made is None:
        return None
    if made:
        subject, text = LINKS[kind]
        url = f"{site}/{PAGES[kind]}#token={token}"
        hours = lifetime(kind) // timedelta(hours=1)
        text = text.format(site=site, hours=hours, link=url)
    else:
        subject, text = NOTICES[INSTEAD.get(kind, kind)]
        text, digest = text.format(site=site), ""
    return mail.message(mail_row["email"], subject, text), digest


async def use_link(token: str, *purposes: str, keep: bool = False) -> RowMapping | None:
    """Delete the token's link (if `keep`, only read it) if it is live and for one of
    `purposes`; what it was (`user_id`, `purpose`, `email`). One statement: of two
    uses at once, one wins."""
    links = Links.ormar_config.table
    columns = (links.c.user_id, links.c.purpose, links.c.email)
    live = sqlalchemy.and_(
        links.c.digest == token_digest(token),
        links.c.purpose.in_(purposes),
        links.c.expires_at > datetime.now(UTC),
    )
    read = sqlalchemy.select(*columns).where(live)
    used = links.delete().where(live).returning(*columns)
    async with database.get_query_executor() as executor:
        return await executor.fetch_one(read if keep else used)


def is_unique_violation(error: IntegrityError) -> bool:
    postgresql_code = getattr(error.orig, "sqlstate", None)
    sqlite_code = getattr(error.orig, "sqlite_errorname", None)
    return postgresql_code == "23505" or sqlite_code == "SQLITE_CONSTRAINT_UNIQUE"

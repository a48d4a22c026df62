"""The accounts' own tables, beside `Users` in db.py: sessions, log-in counts, devices,
mailed links, the outbox."""

from datetime import datetime

import ormar

from db import BaseMeta, Users


class Tokens(ormar.Model):
    """A log-in session: the SHA-256 digest of a bearer token, never the token itself."""

    ormar_config = BaseMeta.copy(tablename="tokens")

    digest: str = ormar.String(primary_key=True, max_length=64)
    user: Users = ormar.ForeignKey(
        Users,
        name="user_id",
        nullable=False,
        ondelete=ormar.ReferentialAction.CASCADE,
        related_name="tokens",
        index=True,
    )
    created_at: datetime = ormar.DateTime(timezone=True)
    # Indexed: every log-in deletes the expired sessions, everyone's.
    expires_at: datetime = ormar.DateTime(timezone=True, index=True)


class LogInAttempts(ormar.Model):
    """Password checks counted for the throttle: per account and client (an address,
    or a device), and per account for all clients without a device; and mails per
    kind and address, for the mail cap.

    Keyed by a SHA-256 digest of the client and the email as typed (normalized), so
    that an unknown email is counted like a real one and no typed email is stored.
    """

    ormar_config = BaseMeta.copy(tablename="log_in_attempts")

    digest: str = ormar.String(primary_key=True, max_length=64)
    attempts: int = ormar.Integer()
    # The last attempt that was let through; a count is over a period after it.
    # Indexed: log-ins delete the counts that are over, everyone's.
    last_attempt_at: datetime = ormar.DateTime(timezone=True, index=True)


class Devices(ormar.Model):
    """A client that has logged in to an account: the SHA-256 digest of the random
    value in its `device` cookie and the account's id. The log-in throttle counts it
    on its own."""

    ormar_config = BaseMeta.copy(tablename="devices")

    digest: str = ormar.String(primary_key=True, max_length=64)
    user: Users = ormar.ForeignKey(
        Users,
        name="user_id",
        nullable=False,
        ondelete=ormar.ReferentialAction.CASCADE,
        related_name="devices",
        index=True,
    )
    # Its last log-in: past SESSIONS_PER_USER, the device used longest ago goes.
    last_used_at: datetime = ormar.DateTime(timezone=True)


class Links(ormar.Model):
    """A link mailed to an address (to verify it, or to reset the password): the
    SHA-256 digest of its token, never the token itself. Deleted when it is used."""

    ormar_config = BaseMeta.copy(tablename="links")

    digest: str = ormar.String(primary_key=True, max_length=64)
    user: Users = ormar.ForeignKey(
        Users,
        name="user_id",
        nullable=False,
        ondelete=ormar.ReferentialAction.CASCADE,
        related_name="links",
        index=True,
    )
    purpose: str = ormar.String(max_length=16)  # "verify", "email" (a change), "reset"
    # The address it was sent to (for an email change, the new one), as long as
    # Users.email is, however long a user makes that.
    email: str = ormar.String(
        max_length=Users.ormar_config.table.c.email.type.length  # type: ignore[attr-defined]
    )
    # Indexed: each new link deletes the expired ones, everyone's.
    expires_at: datetime = ormar.DateTime(timezone=True, index=True)


class Mails(ormar.Model):
    """The outbox: a mail to send (a link's token is made as it is sent)."""

    ormar_config = BaseMeta.copy(tablename="mails")

    id: int = ormar.Integer(primary_key=True)
    kind: str = ormar.String(max_length=16)  # a key of accounts.links.LINKS or NOTICES
    email: str = ormar.String(max_length=Links.ormar_config.table.c.email.type.length)  # type: ignore[attr-defined]
    # The account it is for, if the request knew it (an email change, a new account).
    user: Users | None = ormar.ForeignKey(
        Users,
        name="user_id",
        nullable=True,
        ondelete=ormar.ReferentialAction.CASCADE,
        related_name="mails",
        index=True,
    )
    created_at: datetime = ormar.DateTime(timezone=True, index=True)
    tries: int = ormar.Integer(default=0, nullable=False)
    # Until then a sender holds it, or the next try waits. Indexed: the first due goes.
    due_at: datetime = ormar.DateTime(timezone=True, index=True)

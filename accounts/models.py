"""The accounts' own tables, beside `Users` in db.py: sessions, log-in counts, devices."""

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
    or a device), and per account for all clients without a device.

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
    """A client that has logged in to an account before: the SHA-256 digest of the
    random value in its `device` cookie. The log-in throttle counts it on its own."""

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
    created_at: datetime = ormar.DateTime(timezone=True)

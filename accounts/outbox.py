"""The outbox: each mail is a row written in the transaction of its change, sent by a
task the lifespan runs (by one of many processes; twice at most after a crash)."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import aiosmtplib
import anyio
import sqlalchemy
from sqlalchemy.dialects import postgresql, sqlite

from accounts import links, mail
from accounts.models import Links, Mails
from core.settings import settings
from db import Users, database

logger = logging.getLogger(__name__)

LEASE = timedelta(seconds=90)  # a sender holds a row this long: more than a send
POLL = 1.0  # seconds between looks for rows that other processes wrote
FIRST_RETRY, LAST_RETRY = 1.0, 300.0  # seconds; each retry waits twice the last
SHUTDOWN_GRACE = 5.0  # seconds a send under way gets to finish at shutdown
woken: anyio.Event | None = None
stopping = False


async def post(kind: str, email: str, user_id: int | None = None) -> None:
    """Put a mail of `kind` (links.LINKS, links.NOTICES) to `email` in the outbox."""
    mails = Mails.ormar_config.table
    now = datetime.now(UTC)
    row = {"kind": kind, "email": email, "user_id": user_id, "tries": 0}
    async with database.get_query_executor() as executor:
        await executor.execute(mails.insert().values(**row, created_at=now, due_at=now))
    if woken is not None:
        woken.set()


async def end_links(user_id: int, email: str) -> None:
    """End the account's links: those made, and those still in the outbox."""
    mails, link_rows = Mails.ormar_config.table, Links.ormar_config.table
    reset = (mails.c.kind == "reset") & (mails.c.email == email)
    ended = sqlalchemy.select(mails.c.id).where((mails.c.user_id == user_id) | reset)
    ended = ended.order_by(mails.c.id).with_for_update()  # as sign_up locks them
    async with database.get_query_executor() as executor:
        # The rows first: a link being made for one is then in before the next.
        await executor.execute(mails.delete().where(mails.c.id.in_(ended)))
        await executor.execute(link_rows.delete().where(link_rows.c.user_id == user_id))


async def sign_up(email: str, password: str, allowed: bool) -> None:
    """A new, unverified account and (if `allowed`) its mail, alike for every address;
    an unverified account's links end, made or in the outbox (a stranger's, maybe)."""
    users, link_rows = Users.ormar_config.table, Links.ormar_config.table
    mails = Mails.ormar_config.table
    now = datetime.now(UTC)
    dialect = postgresql if database.dialect.name == "postgresql" else sqlite
    account = dialect.insert(users).values(
        email=email,
        password=password,
        is_active=True,
        is_verified=False,
        created_at=now,
    )
    account = account.on_conflict_do_nothing(index_elements=[users.c.email])
    unverified = sqlalchemy.select(users.c.id).where(
        users.c.email == email, ~users.c.is_verified
    )
    async with database.transaction(), database.connection() as connection:
        created = (await connection.execute(account.returning(users.c.id))).scalar()
        # The rows first: a link being made for one is then in before the next.
        # Locked in one order (PostgreSQL), or sign-ups at once could deadlock.
        verify = (mails.c.kind == "verify") & (mails.c.email == email)
        earlier = sqlalchemy.select(mails.c.id).where(verify).order_by(mails.c.id)
        notices = mails.update().where(mails.c.id.in_(earlier.with_for_update()))
        await connection.execute(notices.values(user_id=None))
        ended = link_rows.c.user_id.in_(unverified) & (link_rows.c.purpose == "verify")
        await connection.execute(link_rows.delete().where(ended))
        if allowed:
            await post("verify", email, created)
    # Unverified accounts past their links' lifetime and tries, everyone's.
    live = sqlalchemy.exists().where(link_rows.c.user_id == users.c.id)
    live = live.where(link_rows.c.expires_at > now)
    old = users.c.created_at <= now - 2 * links.ADDRESS_LIFETIME
    async with database.get_query_executor() as executor:
        await executor.execute(users.delete().where(~users.c.is_verified, old, ~live))


async def send_next() -> bool:
    """Take the next mail that is due, and try to send it; whether there was one."""
    mails, link_rows = Mails.ormar_config.table, Links.ormar_config.table
    now = datetime.now(UTC)
    held = now + LEASE  # also tells this claim from a later one
    due = sqlalchemy.select(mails.c.id).where(mails.c.due_at <= now)
    due = due.order_by(mails.c.due_at).limit(1).with_for_update(skip_locked=True)
    claim = mails.update().where(mails.c.id == due.scalar_subquery())
    async with database.get_query_executor() as executor:
        row = await executor.fetch_one(claim.values(due_at=held).returning(*mails.c))
    if row is None:
        return False
    mine = (mails.c.id == row["id"]) & (mails.c.due_at == held)
    done: sqlalchemy.Delete | sqlalchemy.Update = mails.delete().where(mine)
    created = row["created_at"].replace(tzinfo=row["created_at"].tzinfo or UTC)
    tries = row["tries"] + 1
    retry = timedelta(seconds=min(FIRST_RETRY * 2 ** (tries - 1), LAST_RETRY))
    # Tried while its link would live (from the request on).
    given_up = now + retry >= created + links.lifetime(row["kind"])
    composed = await links.compose(row, held)
    if composed is None:  # ended meanwhile, by a password change say
        return True
    message, digest = composed
    try:
        await mail.send(message)
    except (aiosmtplib.SMTPException, OSError) as error:
        if not given_up:
            done = mails.update().where(mine).values(tries=tries, due_at=now + retry)
        async with database.get_query_executor() as executor:
            unsent = link_rows.delete().where(link_rows.c.digest == digest)
            await executor.execute(unsent)
            await executor.execute(done)
        logger.error(  # once the row says what follows; never the message (a token)
            "Mail %s (%s) not sent, try %d, %s: %s",
            row["id"],
            row["kind"],
            tries,
            "given up" if given_up else f"next in {retry.total_seconds():g} s",
            error,
        )
        return True
    async with database.get_query_executor() as executor:
        await executor.execute(done)
    return True


async def send_all() -> None:
    """Send what is due, then wait for a row (`post`) or POLL seconds; until stopped."""
    global woken
    pause, down = POLL, 0.0
    while not stopping:
        woken = anyio.Event()
        try:
            while not stopping and await send_next():
                pass
            down = 0.0
        except Exception:  # the database is down, say: the rows wait for it
            if not down:
                logger.exception("The outbox could not be read; retrying, less often")
            down = min(2 * down or POLL, LAST_RETRY)
        with anyio.move_on_after(down or pause):
            await woken.wait()
        # A row posted in a transaction shows once that commits: soon after.
        pause = 0.05 if woken.is_set() else min(2 * pause, POLL)


@asynccontextmanager
async def sending() -> AsyncIterator[None]:
    """Send the outbox's mail while the app runs (the lifespan opens it)."""
    global stopping
    if not settings.SMTP_URL:
        logger.warning("SMTP_URL is not set: mail is written here, not sent")
    stopping = False
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(send_all)
        yield
        # Stopped between two rows: a query cut off could hold up the shutdown.
        stopping = True
        tasks.cancel_scope.deadline = anyio.current_time() + SHUTDOWN_GRACE
        if woken is not None:
            woken.set()

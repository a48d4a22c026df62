"""users ids are never reused

Revision ID: f4bb32321b26
Revises: 3ee6784e9947
Create Date: 2026-12-01 09:30:21.310508

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "f4bb32321b26"
down_revision: str | Sequence[str] | None = "3ee6784e9947"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def users_at_this_revision() -> sa.Table:
    """`users` as the revisions before this one built it.

    Given to batch mode as `copy_from`, so that it needs no reflection and
    `alembic upgrade head --sql` works.
    """
    return sa.Table(
        "users",
        sa.MetaData(),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("email", sa.String(length=64), nullable=False),
        sa.Column("password", sa.String(length=128), nullable=False),
        sa.Column("is_active", sa.Boolean(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("email", name="uq_users_email"),
    )


def rebuild_users(autoincrement: bool) -> None:
    # Only SQLite reuses ids (the highest + 1); PostgreSQL's sequences never do.
    if op.get_context().dialect.name != "sqlite":
        return
    with op.batch_alter_table(
        "users",
        copy_from=users_at_this_revision(),
        recreate="always",
        table_kwargs={"sqlite_autoincrement": autoincrement},
    ):
        pass


def upgrade() -> None:
    """Upgrade schema."""
    # AUTOINCREMENT: a new account never gets the id of one deleted, so a session or a
    # change decided for the old account cannot land on the new one. (The primary key
    # becomes an inline, unnamed `PRIMARY KEY AUTOINCREMENT`: SQLite allows no other.)
    rebuild_users(autoincrement=True)


def downgrade() -> None:
    """Downgrade schema."""
    rebuild_users(autoincrement=False)

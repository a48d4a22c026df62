"""devices kept by last use

Revision ID: 56889ad717ee
Revises: c5dda1d9eb23
Create Date: 2026-12-05 09:12:14.456478

"""

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "56889ad717ee"
down_revision: str | Sequence[str] | None = "c5dda1d9eb23"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    # A device's digest was its cookie's alone; now it is its cookie's and its
    # account's, which the cookie's digest cannot give: the rows match nothing. Each
    # client becomes a device again at its next log-in, and keeps its cookie.
    op.execute("DELETE FROM devices")
    # Renamed, not added and dropped: SQLite renames in place (3.25+), so this needs
    # no batch-mode rebuild, and `alembic upgrade head --sql` still works.
    op.alter_column("devices", "created_at", new_column_name="last_used_at")


def downgrade() -> None:
    """Downgrade schema."""
    op.execute("DELETE FROM devices")  # digests the code before cannot match
    op.alter_column("devices", "last_used_at", new_column_name="created_at")

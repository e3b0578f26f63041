"""Owned layers remember their size on disk (the build cache's byte budget counts it).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26

Self-contained on purpose (no imports from the models): a migration describes the schema as it was
when it was written, whatever the models say later.

owned_layers gains:
  size_bytes  the layer directory's disk usage (allocated blocks, each inode once), measured once
              after the layer is made (layers never change); NULL until then. Layers owned before
              this revision are measured by the server in the background after it starts.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("owned_layers") as batch:
        batch.add_column(sa.Column("size_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("owned_layers") as batch:
        batch.drop_column("size_bytes")

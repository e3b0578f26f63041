"""Network policy: each sandbox's E2B `network` config and its traffic access token.

Revision ID: 0003
Revises: 0002
Create Date: 2025-11-27

Self-contained on purpose (no imports from the models): a migration describes the schema as it was
when it was written, whatever the models say later.

sandbox_networks (one row per sandbox created with a `network` config or updated later):
  config                the config as the API reports it (allowOut, denyOut, allowPublicTraffic,
                        maskRequestHost, ...): camelCase JSON
  traffic_access_token  required on the sandbox's public ports when allowPublicTraffic=false
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sandbox_networks",
        sa.Column("sandbox_id", sa.String(64), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("traffic_access_token", sa.String(128), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sandbox_id", name="pk_sandbox_networks"),
        sa.ForeignKeyConstraint(
            ["sandbox_id"],
            ["sandboxes.sandbox_id"],
            name="fk_sandbox_networks_sandbox_id_sandboxes",
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("sandbox_networks")

"""caller_credentials: callers managed in the database (bearer token hashes, expiry, rotation, revocation)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "caller_credentials",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("caller_id", sa.String(length=63), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("platform_id", sa.String(length=63), nullable=False),
        sa.Column("advisor_id", sa.String(length=63), nullable=False),
        sa.Column("agency_code", sa.String(length=63), nullable=False),
        sa.Column("funder_id", sa.String(length=63), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rotated_from", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("uq_caller_credentials_token", "caller_credentials", ["token_sha256"], unique=True)
    op.create_index("ix_caller_credentials_caller", "caller_credentials", ["caller_id", "created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_caller_credentials_caller", table_name="caller_credentials")
    op.drop_index("uq_caller_credentials_token", table_name="caller_credentials")
    op.drop_table("caller_credentials")

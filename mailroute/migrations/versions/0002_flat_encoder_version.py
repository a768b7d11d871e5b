"""predictions.flat_encoder_version

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

A classifier version may fuse the flat classifier into its answer (contract.FLAT_ENCODER, pinned like the two
encoders): its version is part of what made a prediction, so a prediction row keeps it beside the other three.
Rows written before this revision keep NULL, as do predictions of versions that pin no flat encoder.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:  # batch: SQLite cannot drop a column in place (the downgrade copies)
        batch.add_column(sa.Column("flat_encoder_version", sa.String(20), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("flat_encoder_version")

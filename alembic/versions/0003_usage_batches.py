"""usage_batches: ids of the usage batches written, so a batch sent twice is applied once

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('usage_batches',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_usage_batches'))
    )
    with op.batch_alter_table('usage_batches', schema=None) as batch_op:
        batch_op.create_index('ix_usage_batches_created_at', ['created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('usage_batches', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_batches_created_at')

    op.drop_table('usage_batches')

"""llm_holds: leased holds per web process, so a killed process's holds come back

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('llm_holds',
    sa.Column('owner', sa.String(length=100), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_llm_holds_account_id_accounts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('owner', 'account_id', name=op.f('pk_llm_holds'))
    )
    with op.batch_alter_table('llm_holds', schema=None) as batch_op:
        batch_op.create_index('ix_llm_holds_expires_at', ['expires_at'], unique=False)
    # Holds taken before this revision have no owner to renew them: give them one whose lease
    # has already run out, so the next sweep hands them back (through app.core.ledger, keeping
    # accounts.held equal to the sum of the rows). Upgrade with the web processes stopped, as
    # for any migration, so no call from before settles afterwards.
    op.execute("INSERT INTO llm_holds (owner, account_id, amount, expires_at, created_at) "
               "SELECT 'before-0002', id, held, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP FROM accounts WHERE held > 0")


def downgrade() -> None:
    with op.batch_alter_table('llm_holds', schema=None) as batch_op:
        batch_op.drop_index('ix_llm_holds_expires_at')

    op.drop_table('llm_holds')

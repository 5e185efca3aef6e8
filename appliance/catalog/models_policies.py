"""Which assets a policy covers (revision 0009), kept apart from ``models`` so it stays small.

Imported by the policy repository (so by :class:`~appliance.catalog.Catalog`), which puts this
table in the same metadata as every other model.

``policy_assets`` holds one row per (policy, asset) with the asset's ``position`` in the
policy's list: the order the user gave is the order the scheduler backs the assets up in. A
policy's rows go with it (``ON DELETE CASCADE``); an asset named by a policy cannot be deleted
(the foreign key has no cascade, and the asset repository refuses first, in words).
"""

from __future__ import annotations

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from appliance.catalog.models import NAME, Base


class PolicyAssetRow(Base):
    __tablename__ = "policy_assets"

    policy: Mapped[str] = mapped_column(
        String(NAME), ForeignKey("policies.name", ondelete="CASCADE"), primary_key=True
    )
    asset: Mapped[str] = mapped_column(
        String(NAME), ForeignKey("assets.name"), primary_key=True, index=True
    )
    position: Mapped[int] = mapped_column(Integer)

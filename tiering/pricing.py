"""What tiering costs: monthly storage and request charges from a dated price file.

The prices (``tiering/data/prices.json``, with the date they were taken and their source) are
list prices of one provider and region; the settings may override them (catalog settings key
``tiering_prices``, same shape). Estimates only: the page says so, with the date.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from appliance.errors import InvalidInput
from appliance.store import format as fmt

GIB = 1 << 30


def default_prices() -> dict[str, Any]:
    text = resources.files("tiering").joinpath("data/prices.json").read_text()
    prices: dict[str, Any] = json.loads(text)
    return prices


_PRICE_FIELDS = {"gb_month", "put_per_1000", "min_days", "min_object_kb", "overhead_kb"}
_RETRIEVAL_FIELDS = {"per_gb", "per_1000", "typical"}


def check_prices(document: object) -> dict[str, Any]:
    """A price override, checked: ``{classes: {CLASS: {gb_month, ...}}, retrieval: {CLASS:
    {TIER: {per_gb, per_1000}}}, as_of, source, currency}``, every number zero or more."""
    if not isinstance(document, dict):
        raise InvalidInput("prices are an object")
    unknown = sorted(set(document) - {"classes", "retrieval", "as_of", "source", "currency"})
    if unknown:
        raise InvalidInput(f"unknown price field(s): {', '.join(unknown)}")

    def numbers(table: object, allowed: set[str], where: str) -> None:
        if not isinstance(table, dict):
            raise InvalidInput(f"{where} is an object")
        for key, value in table.items():
            if key not in allowed:
                raise InvalidInput(f"{where}: unknown field {key!r}")
            if key == "typical":
                if not isinstance(value, str):
                    raise InvalidInput(f"{where}: typical is text")
            elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise InvalidInput(f"{where}: {key} is a number, zero or more")

    classes = document.get("classes") or {}
    if not isinstance(classes, dict):
        raise InvalidInput("classes is an object")
    for name, table in classes.items():
        numbers(table, _PRICE_FIELDS, f"class {name}")
    retrieval = document.get("retrieval") or {}
    if not isinstance(retrieval, dict):
        raise InvalidInput("retrieval is an object")
    for name, tiers in retrieval.items():
        if not isinstance(tiers, dict):
            raise InvalidInput(f"retrieval of {name} is an object")
        for tier, table in tiers.items():
            numbers(table, _RETRIEVAL_FIELDS, f"retrieval {name} {tier}")
    for key in ("as_of", "source", "currency"):
        if key in document and not isinstance(document[key], str):
            raise InvalidInput(f"{key} is text")
    return document


def effective_prices(override: Mapping[str, Any] | None) -> dict[str, Any]:
    """The shipped prices with the settings' override laid over them (per class, per tier)."""
    prices = default_prices()
    if not override:
        return prices
    for section in ("classes", "retrieval"):
        for name, values in dict(override.get(section) or {}).items():
            prices[section].setdefault(name, {}).update(values)
    for key in ("as_of", "source", "currency"):
        if key in override:
            prices[key] = override[key]
    return prices


@dataclass(frozen=True)
class CostEstimate:
    currency: str
    as_of: str
    #: Per storage class: the monthly storage charge of the bytes moved there.
    monthly: Mapping[str, float]
    #: The one-off charge of the uploads (PUT requests).
    uploads: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "currency": self.currency,
            "as_of": self.as_of,
            "monthly": {k: round(v, 8) for k, v in self.monthly.items()},
            "monthly_total": round(sum(self.monthly.values()), 8),
            "uploads": round(self.uploads, 8),
        }


def requests_for(byte_count: int, pack_size: int = fmt.PACK_TARGET_SIZE) -> int:
    """About how many objects ``byte_count`` of packs make (each pack one PUT)."""
    return (byte_count + pack_size - 1) // pack_size if byte_count else 0


def storage_cost(bytes_by_class: Mapping[str, int], prices: Mapping[str, Any]) -> CostEstimate:
    """The monthly storage charge of bytes per class, and the PUTs that put them there."""
    monthly: dict[str, float] = {}
    uploads = 0.0
    for name, byte_count in bytes_by_class.items():
        table = prices["classes"].get(name) or prices["classes"]["STANDARD"]
        objects = requests_for(byte_count)
        # Cold classes bill ~40 KiB of index per object on top of the data.
        billed = byte_count + objects * table.get("overhead_kb", 0) * 1024
        monthly[name] = billed / GIB * float(table["gb_month"])
        uploads += objects / 1000 * float(table["put_per_1000"])
    return CostEstimate(str(prices["currency"]), str(prices["as_of"]), monthly, uploads)


def recall_cost(
    storage_class: str, tier: str, byte_count: int, objects: int, prices: Mapping[str, Any]
) -> float | None:
    """The charge of restoring ``objects`` objects of ``byte_count`` bytes; None when the class
    has no such tier (DEEP_ARCHIVE has no Expedited) or no price is known."""
    table = prices.get("retrieval", {}).get(storage_class, {}).get(tier)
    if table is None:
        return None
    return byte_count / GIB * float(table["per_gb"]) + objects / 1000 * float(table["per_1000"])

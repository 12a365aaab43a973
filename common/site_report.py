"""What a site reports about one round, in one place.

The site builds a `SiteReport` after training (or refusing); it travels as Flower's two records
(the ``metrics`` MetricRecord and the ``privacy`` ConfigRecord, or one flat metrics dict under
SecAgg+); the aggregator rebuilds it from a reply (`from_wire`), or makes a ``failed`` one for a
site that did not answer; the privacy ledger and the round recorder read its `ledger_row`.
Nothing else spells these keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Final

TRAINED, REFUSED, FAILED = "trained", "refused", "failed"
STATUSES: Final = (TRAINED, REFUSED, FAILED)
# The DP accounting a trained site reports (a refusing one: what it has spent, as "epsilon").
ACCOUNTING: Final = ("steps", "sample_rate", "noise_multiplier", "max_grad_norm", "epsilon", "delta",
                     "budget_epsilon")
# Provenance of the accounting, as the ledger names it; on the wire with "-" for "_".
PROVENANCE: Final = ("accountant", "budget_bound", "unit")
NUM_EXAMPLES: Final = "num-examples"  # Flower's aggregation weight, also the ledger's "images"
REASON_LIMIT: Final = 200


@dataclass(frozen=True)
class SiteReport:
    site: str
    status: str
    round: int | None = None  # set by the aggregator, which knows the round it asked for
    steps: int | None = None
    sample_rate: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    budget_epsilon: float | None = None
    images: int | None = None  # trained: the images (or patients' images) the update came from
    accountant: str | None = None
    budget_bound: str | None = None
    unit: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"site report status {self.status!r} is not one of {', '.join(STATUSES)}")

    @classmethod
    def failed(cls, site: str, server_round: int, reason: str) -> SiteReport:
        return cls(site=site, status=FAILED, round=server_round, reason=reason[:REASON_LIMIT])

    # --- the site's side ----------------------------------------------------------------------

    def wire(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(metrics, privacy): what the site sends, as Flower's MetricRecord and ConfigRecord hold it."""
        metrics: dict[str, Any] = {NUM_EXAMPLES: self.images or 0}
        metrics |= {key: getattr(self, key) for key in ACCOUNTING if getattr(self, key) is not None}
        privacy = {"site-id": self.site, "status": self.status}
        privacy |= {key.replace("_", "-"): getattr(self, key) for key in PROVENANCE if getattr(self, key) is not None}
        if self.reason is not None:
            privacy["reason"] = self.reason
        return metrics, privacy

    # --- the aggregator's side ----------------------------------------------------------------

    @classmethod
    def from_wire(cls, server_round: int, metrics: Mapping[str, Any], privacy: Mapping[str, Any]) -> SiteReport:
        """The report in a reply (under SecAgg+, `metrics` and `privacy` are the same flat dict)."""
        status = str(privacy["status"])
        values: dict[str, Any] = {key: metrics[key] for key in ACCOUNTING if key in metrics}
        values |= {key: str(privacy[key.replace("_", "-")]) for key in PROVENANCE if key.replace("_", "-") in privacy}
        if status == TRAINED and NUM_EXAMPLES in metrics:
            values["images"] = int(metrics[NUM_EXAMPLES])
        if status == REFUSED:
            values["reason"] = str(privacy["reason"])
        return cls(site=str(privacy["site-id"]), status=status, round=server_round, **values)

    def ledger_row(self) -> dict[str, Any]:
        """The privacy ledger's row: site, round, status, then only what the report holds."""
        row: dict[str, Any] = {"site": self.site, "round": self.round, "status": self.status}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in ("site", "round", "status") or value is None:
                continue
            row[field.name] = value
        return row

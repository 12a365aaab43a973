"""A site's privacy budget, kept on the site's own disk across rounds and restarts.

Flower's own Opacus example builds a new PrivacyEngine every round, so its accountant
starts from zero each time and the epsilon it reports is that of one round only. Here the
accountant's full history -- (noise multiplier, sample rate, steps) per stretch of
training -- is written to the site's state directory after every round and fed back into
a fresh accountant before the next, so the epsilon is that of everything the site has
ever released in this run.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common.config import PrivacyConfig
from common.errors import MammoflError

STATE_FILE = "privacy_state.json"


class BudgetExhaustedError(MammoflError):
    """Training one more round would take a site past its (epsilon, delta) budget."""


Stretch = tuple[float, float, int]
"""(noise multiplier, sample rate, steps): one entry of an Opacus accountant's history."""


def epsilon_of(history: list[Stretch], *, accountant: str, delta: float) -> float:
    """The epsilon that `accountant` gives for `history` at `delta` (0 for no training)."""
    if not history:
        return 0.0
    instance = create_accountant(mechanism=accountant)
    instance.history = [tuple(stretch) for stretch in history]
    return float(instance.get_epsilon(delta=delta))


@dataclass
class SitePrivacyState:
    """Everything a site must remember to account its privacy over the whole run."""

    site_id: str
    accountant: str
    delta: float
    budget_epsilon: float
    max_grad_norm: float
    noise_multiplier: float | None = None
    history: list[Stretch] = field(default_factory=list)
    rounds_trained: list[int] = field(default_factory=list)

    @classmethod
    def load_or_create(cls, state_dir: Path, site_id: str, privacy: PrivacyConfig) -> "SitePrivacyState":
        path = state_dir / STATE_FILE
        if path.exists():
            state = cls(**json.loads(path.read_text()))
            state.history = [tuple(stretch) for stretch in state.history]
            return state
        return cls(
            site_id=site_id,
            accountant=privacy.accountant,
            delta=privacy.target_delta,
            budget_epsilon=privacy.budget_for(site_id),
            max_grad_norm=privacy.max_grad_norm,
            noise_multiplier=privacy.noise_multiplier,
        )

    def save(self, state_dir: Path) -> None:
        """Atomic write: a site killed mid-save keeps its previous, consistent state."""
        state_dir.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=state_dir, prefix=".privacy_state.")
        with os.fdopen(handle, "w") as stream:
            json.dump(asdict(self), stream, indent=2)
        os.replace(temporary, state_dir / STATE_FILE)

    @property
    def spent_epsilon(self) -> float:
        return epsilon_of(self.history, accountant=self.accountant, delta=self.delta)

    def plan_noise(self, privacy: PrivacyConfig, *, sample_rate: float, planned_steps: int) -> float:
        """Fix the noise multiplier once, for the whole run: the one that spends exactly
        ``target_epsilon`` over the planned steps (or the configured multiplier)."""
        if self.noise_multiplier is None:
            self.noise_multiplier = float(
                get_noise_multiplier(
                    target_epsilon=privacy.target_epsilon,
                    target_delta=self.delta,
                    sample_rate=sample_rate,
                    steps=planned_steps,
                    accountant=self.accountant,
                )
            )
        return self.noise_multiplier

    def check_round(self, *, sample_rate: float, steps: int) -> float:
        """The epsilon after a round of `steps` more steps; raises if it would pass the budget."""
        assert self.noise_multiplier is not None, "plan_noise() first"
        projected = epsilon_of(
            [*self.history, (self.noise_multiplier, sample_rate, steps)], accountant=self.accountant, delta=self.delta
        )
        if projected > self.budget_epsilon:
            raise BudgetExhaustedError(
                f"site {self.site_id}: another round ({steps} steps at sample rate {sample_rate:.4f}) would "
                f"reach epsilon {projected:.3f} > budget {self.budget_epsilon:g} (spent so far "
                f"{self.spent_epsilon:.3f}, delta {self.delta:g}); the site refuses the round"
            )
        return projected

    def record_round(self, server_round: int, history: list[Stretch]) -> None:
        self.history = [tuple(stretch) for stretch in history]
        self.rounds_trained.append(server_round)

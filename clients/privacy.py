"""A site's privacy budget, kept on the site's own disk across rounds and restarts.

Flower's own Opacus example builds a new PrivacyEngine every round, so its accountant
starts from zero each time and the epsilon it reports is that of one round only. Here the
accountant's full history -- (noise multiplier, sample rate, steps) per stretch of
training -- is written to the site's state directory after every round and fed back into
a fresh accountant before the next, so the epsilon is that of everything the site has
ever released in this run.

Two things the guarantee needs that the accountant does not see:

- **Secret randomness.** The Gaussian noise and the Poisson sample of every round come from
  generators seeded with fresh operating-system entropy (`fresh_generator`), never from the
  config's seed, which the aggregator wrote and knows; nothing stores those seeds.
- **The site's own limits.** A deployed site's operator sets its budget, its largest delta
  and whether it trains without DP at all (`SiteLimits`, from ``mammofl site run``); a run
  config may ask for less, never for more.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common.config import ACCOUNTANT_NAMES, PrivacyConfig
from common.errors import MammoflError

STATE_FILE = "privacy_state.json"


class SiteRefusal(MammoflError):
    """A site declines a round: its message is the reason the ledger records."""


class BudgetExhaustedError(SiteRefusal):
    """Training one more round would take a site past its (epsilon, delta) budget."""


def fresh_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from 64 bits of operating-system entropy, for DP noise or sampling.

    Seeded anew for every round and never written down, so the aggregator (who knows the
    config seed) cannot predict, reproduce or cancel a site's noise. Torch's generators are
    not cryptographic (Mersenne Twister on the CPU, Philox on CUDA); the residual risks are
    in the privacy report.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return generator


@dataclass(frozen=True)
class SiteLimits:
    """What the site's own operator allows, whatever a run config asks.

    In simulation the run config is the sites' own (one operator plays every part): no
    limits. A deployed site takes them from ``mammofl site run`` (node config keys
    ``budget-epsilon``, ``max-delta``, ``allow-non-private``, ``allow-evaluation``); without a
    budget it refuses every private run, it refuses non-private runs unless allowed, and it
    sends validation metrics (not DP-protected) only if allowed.
    """

    deployed: bool = False
    budget_epsilon: float | None = None
    max_delta: float | None = None
    allow_non_private: bool = True
    allow_evaluation: bool = True
    privacy_unit: str = "image"  # "patient": the site refuses image-level runs

    @classmethod
    def from_node_config(cls, node: dict) -> "SiteLimits":
        if "data-dir" not in node:
            return cls()
        budget, delta = node.get("budget-epsilon"), node.get("max-delta")
        return cls(deployed=True, budget_epsilon=float(budget) if budget is not None else None,
                   max_delta=float(delta) if delta is not None else None,
                   allow_non_private=str(node.get("allow-non-private", "false")).lower() == "true",
                   allow_evaluation=str(node.get("allow-evaluation", "true")).lower() == "true",
                   privacy_unit=str(node.get("privacy-unit", "image")))

    def require_allowed(self, site_id: str, privacy: PrivacyConfig, num_images: int) -> tuple[float, str]:
        """The epsilon this run may take the site to and which bound set it ("run" or "site").

        `num_images` counts the units DP protects: images, or patients with ``privacy.unit`` "patient".

        Raises SiteRefusal when the run asks for more than the site allows.
        """
        if not privacy.enabled:
            if not self.allow_non_private:
                raise SiteRefusal(f"site {site_id}: the run asks for training without DP, which this site does "
                                  "not allow (mammofl site run --allow-non-private)")
            return float("inf"), "run"
        if self.privacy_unit == "patient" and privacy.unit != "patient":
            raise SiteRefusal(f"site {site_id}: the run asks image-level DP (privacy.unit {privacy.unit!r}); this site "
                              "trains patient-level DP only (mammofl site run --privacy-unit patient)")
        if privacy.target_delta >= 1.0 / (10 * num_images):
            raise SiteRefusal(f"site {site_id}: delta {privacy.target_delta:g} is not below 1/(10 n) = "
                              f"{1 / (10 * num_images):.2g} for its {num_images} training {privacy.unit}s; a smaller "
                              "delta is needed")
        run_budget = privacy.budget_for(site_id)
        if not self.deployed:
            return run_budget, "run"
        if self.budget_epsilon is None:
            raise SiteRefusal(f"site {site_id}: no budget of its own is set (mammofl site run --budget-epsilon), "
                              "so it trains no private run")
        if self.max_delta is not None and privacy.target_delta > self.max_delta:
            raise SiteRefusal(f"site {site_id}: the run asks delta {privacy.target_delta:g}, above the site's "
                              f"maximum {self.max_delta:g}")
        if run_budget > self.budget_epsilon:
            raise SiteRefusal(f"site {site_id}: the run asks a budget of epsilon {run_budget:g}, above the site's "
                              f"own {self.budget_epsilon:g}")
        return run_budget, "run" if run_budget < self.budget_epsilon else "site"


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
    unit: str = "image"  # what the history accounts: images or patients (never mixed)

    @classmethod
    def load_or_create(cls, state_dir: Path, site_id: str, privacy: PrivacyConfig) -> "SitePrivacyState":
        path = state_dir / STATE_FILE
        if path.exists():
            state = cls(**json.loads(path.read_text()))
            if state.accountant not in ACCOUNTANT_NAMES:
                raise MammoflError(f"{path}: accountant {state.accountant!r} is not offered (valid: "
                                   f"{', '.join(ACCOUNTANT_NAMES)}); its epsilon cannot be trusted, so the site stops")
            state.history = [tuple(stretch) for stretch in state.history]
            if state.unit != privacy.unit and state.history:
                # Image-level epsilons do not bound a patient's loss, nor the reverse: one history, one unit.
                raise SiteRefusal(f"site {site_id}: its privacy history is accounted per {state.unit}; a run with "
                                  f"privacy.unit {privacy.unit!r} cannot be composed with it (use another state "
                                  "folder, or the same unit)")
            state.unit = privacy.unit
            return state
        return cls(
            site_id=site_id,
            accountant=privacy.accountant,
            delta=privacy.target_delta,
            budget_epsilon=privacy.budget_for(site_id),
            max_grad_norm=privacy.max_grad_norm,
            noise_multiplier=privacy.noise_multiplier,
            unit=privacy.unit,
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

    def check_round(self, *, sample_rate: float, steps: int, budget_epsilon: float | None = None) -> float:
        """The epsilon after a round of `steps` more steps; raises if it would pass the budget.

        `budget_epsilon` is this run's limit (see `SiteLimits.require_allowed`); it replaces
        the stored one, so a site's operator can lower its budget between runs.
        """
        assert self.noise_multiplier is not None, "plan_noise() first"
        if budget_epsilon is not None:
            self.budget_epsilon = budget_epsilon
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

"""One round of training at one site: plain SGD, or DP-SGD through Opacus.

Privacy is a switch on the same path: with ``privacy.enabled`` the model, optimizer and
loader are wrapped by Opacus' PrivacyEngine (per-sample clipping, Gaussian noise, Poisson
sampling) and physical batches are capped by BatchMemoryManager; everything else -- the
loop, the loss, the FedProx step -- is shared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn

from clients.privacy import SitePrivacyState
from common.config import ExperimentConfig
from common.data.pipeline import class_counts, make_loader
from common.data.records import ImageRecord
from common.losses import build_loss
from common.models.configured import freeze_schedule_from_config
from common.training import build_optimizer, train_one_epoch


@dataclass(frozen=True)
class PrivacyRound:
    """What a site reports of one round's privacy cost: the ledger's row."""

    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    epsilon: float
    delta: float
    budget_epsilon: float
    accountant: str


@dataclass(frozen=True)
class LocalResult:
    num_examples: int
    train_loss: float
    privacy: PrivacyRound | None


def proximal_step(model: nn.Module, learning_rate: float, mu: float) -> Callable[[], None]:
    """FedProx as a proximal step after each optimizer step: w <- w - lr * mu * (w - w_global).

    Adding mu/2 ||w - w_global||^2 to the loss instead would be silently dropped under
    DP-SGD (Opacus privatises per-sample gradients of the data loss only); as a separate,
    data-independent step it is post-processing and costs no privacy.
    """
    anchors = [parameter.detach().clone() for parameter in model.parameters()]

    @torch.no_grad()
    def step() -> None:
        for parameter, anchor in zip(model.parameters(), anchors):
            parameter.sub_(learning_rate * mu * (parameter - anchor))

    return step


def make_private(engine: PrivacyEngine, model: nn.Module, optimizer: torch.optim.Optimizer, loader, loss_fn: nn.Module,
                 *, noise_multiplier: float, config: ExperimentConfig):
    """Opacus' private model, optimizer, loss and Poisson-sampled loader for this round.

    ``privacy.clipping`` "ghost" selects Opacus' ghost clipping: per-sample gradient norms
    come from a first backward pass without materialising per-sample gradients (the wrapped
    loss runs the second, clipped pass), which saves memory on wide layers. The guarantee is
    the same as flat clipping: each example's whole gradient is clipped to ``max_grad_norm``.
    """
    common = {"module": model, "optimizer": optimizer, "data_loader": loader, "noise_multiplier": noise_multiplier,
              "max_grad_norm": config.privacy.max_grad_norm, "poisson_sampling": True}
    if config.privacy.clipping == "ghost":
        return engine.make_private(**common, criterion=loss_fn, grad_sample_mode="ghost")
    private_model, private_optimizer, private_loader = engine.make_private(**common)
    return private_model, private_optimizer, loss_fn, private_loader


def train_site_round(
    model: nn.Module,
    records: list[ImageRecord],
    config: ExperimentConfig,
    *,
    server_round: int,
    device: torch.device,
    privacy_state: SitePrivacyState | None,
    state_dir: Path | None,
    proximal_mu: float = 0.0,
    generator: torch.Generator | None = None,
) -> LocalResult:
    """Train `model` in place for ``federation.local_epochs`` epochs on the site's records.

    With privacy on, the site first checks that this round fits its remaining budget
    (raising BudgetExhaustedError if not), then trains and persists its accountant.
    """
    model.to(device)
    epochs = config.federation.local_epochs
    # The transfer schedule counts the site's local epochs across rounds; a frozen parameter
    # gets no gradient, so DP-SGD neither clips nor noises it (fewer dimensions, less noise).
    freeze_schedule_from_config(config).apply(model, (server_round - 1) * epochs)
    loader = make_loader(records, config, train=True, generator=generator)
    optimizer = build_optimizer(
        config.optimizer, model.parameters(), learning_rate=config.learning_rate, weight_decay=config.weight_decay
    )
    loss_fn = build_loss(config.loss, class_counts(records)).to(device)
    after_step = proximal_step(model, config.learning_rate, proximal_mu) if proximal_mu > 0 else None

    if not config.privacy.enabled:
        losses = [train_one_epoch(model, loader, optimizer, loss_fn, device=device, after_step=after_step)
                  for _ in range(epochs)]
        return LocalResult(num_examples=len(records), train_loss=losses[-1], privacy=None)

    assert privacy_state is not None and state_dir is not None
    sample_rate = 1.0 / len(loader)  # what Opacus uses for Poisson sampling of this loader
    steps = len(loader) * epochs
    noise = privacy_state.plan_noise(
        config.privacy, sample_rate=sample_rate, planned_steps=steps * config.federation.rounds
    )
    privacy_state.check_round(sample_rate=sample_rate, steps=steps)

    engine = PrivacyEngine(accountant=privacy_state.accountant)
    engine.accountant.history = list(privacy_state.history)
    private_model, private_optimizer, loss_fn, private_loader = make_private(
        engine, model, optimizer, loader, loss_fn, noise_multiplier=noise, config=config)
    losses = []
    for _ in range(epochs):
        with BatchMemoryManager(
            data_loader=private_loader,
            max_physical_batch_size=config.privacy.max_physical_batch_size,
            optimizer=private_optimizer,
        ) as physical_loader:
            losses.append(
                train_one_epoch(private_model, physical_loader, private_optimizer, loss_fn,
                                device=device, after_step=after_step)
            )
    # The wrapped module is `model` itself, already trained; only Opacus' hooks must go.
    private_model.remove_hooks()
    private_model.cleanup()
    privacy_state.record_round(server_round, engine.accountant.history)
    privacy_state.save(state_dir)
    return LocalResult(
        num_examples=len(records),
        train_loss=losses[-1],
        privacy=PrivacyRound(
            steps=steps,
            sample_rate=sample_rate,
            noise_multiplier=noise,
            max_grad_norm=config.privacy.max_grad_norm,
            epsilon=privacy_state.spent_epsilon,
            delta=privacy_state.delta,
            budget_epsilon=privacy_state.budget_epsilon,
            accountant=privacy_state.accountant,
        ),
    )

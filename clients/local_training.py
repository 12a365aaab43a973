"""One round of training at one site: plain SGD, or DP-SGD through Opacus.

While the encoder is frozen (the scattering encoder always is) only the head trains, on
features computed once per image and cached (`common.data.features`), with
``augmentation.multiplicity`` views per image averaged before clipping; otherwise the whole
model trains on augmented images. With ``federation.ema_decay`` the site releases the
moving average of its iterates.

Privacy is a switch on the same path: with ``privacy.enabled`` the model, optimizer and
loader are wrapped by Opacus' PrivacyEngine (per-sample clipping, Gaussian noise, Poisson
sampling) and physical batches are capped by BatchMemoryManager; everything else -- the
loop, the loss, the FedProx step -- is shared.

Under DP the noise and the Poisson sample come from fresh OS entropy each round (see
`clients.privacy.fresh_generator`), frozen BatchNorm layers are held in eval mode (batch
statistics would mix examples and move buffers that leave the site), and the training loss
is not reported: it is computed from the site's images without noise.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader

from clients.privacy import SitePrivacyState, Stretch, fresh_generator
from common.config import ExperimentConfig
from common.data.features import PatientLoss, ViewsLoss, patient_training_data, view_training_data
from common.data.pipeline import class_counts, make_loader
from common.data.records import ImageRecord
from common.errors import MammoflError
from common.losses import build_loss
from common.models.configured import freeze_schedule_from_config
from common.training import ExponentialAverage, build_optimizer, chained, train_one_epoch


class AccountingError(MammoflError):
    """What Opacus accounted differs from what the site checked against its budget."""


def steps_in(history: list[Stretch]) -> int:
    return sum(int(steps) for _, _, steps in history)


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
    budget_bound: str  # "run" or "site": whose limit applied
    unit: str = "image"  # what one DP "record" is: an image or a patient


@dataclass(frozen=True)
class LocalResult:
    num_examples: int
    train_loss: float | None  # None under DP: a noise-free statistic of the site's images
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


@contextmanager
def frozen_batch_norms_held(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers without a trainable parameter run in eval mode, whatever model.train() says.

    In train mode such a layer normalises each example with its batch's statistics (so one
    example's gradient depends on the others, which per-example clipping cannot bound) and
    moves its running statistics, buffers that travel in the update outside any accounting.
    """
    frozen = [module for module in model.modules()
              if isinstance(module, nn.modules.batchnorm._BatchNorm)
              and not any(parameter.requires_grad for parameter in module.parameters())]
    handles = [module.register_forward_pre_hook(_hold_in_eval) for module in frozen]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hold_in_eval(module: nn.Module, args: tuple) -> None:
    module.training = False


def make_private(engine: PrivacyEngine, model: nn.Module, optimizer: torch.optim.Optimizer, loader, loss_fn: nn.Module,
                 *, noise_multiplier: float, config: ExperimentConfig,
                 noise_generator: torch.Generator | None = None, ghost: bool | None = None):
    """Opacus' private model, optimizer, loss and Poisson-sampled loader for this round.

    ``privacy.clipping`` "ghost" (or `ghost`) selects Opacus' ghost clipping: per-sample
    gradient norms come from a first backward pass without materialising per-sample gradients
    (the wrapped loss runs the second, clipped pass), which saves memory on wide layers. The
    guarantee is the same as flat clipping: each example's whole gradient is clipped to
    ``max_grad_norm``.
    """
    common = {"module": model, "optimizer": optimizer, "data_loader": loader, "noise_multiplier": noise_multiplier,
              "max_grad_norm": config.privacy.max_grad_norm, "poisson_sampling": True,
              "noise_generator": noise_generator}
    if config.privacy.clipping == "ghost" if ghost is None else ghost:
        return engine.make_private(**common, criterion=loss_fn, grad_sample_mode="ghost")
    private_model, private_optimizer, private_loader = engine.make_private(**common)
    return private_model, private_optimizer, loss_fn, private_loader


def encoder_frozen(model: nn.Module) -> bool:
    """True when no encoder parameter trains (the schedule is applied once, at the round's start)."""
    return not any(parameter.requires_grad for parameter in model.encoder.parameters())


def _training_data(model: nn.Module, records: list[ImageRecord], config: ExperimentConfig, *, device: torch.device,
                   private: bool, generator: torch.Generator | None) -> tuple[nn.Module, DataLoader, bool]:
    """What trains this round, on what: (module, loader, whether a Poisson batch may be split).

    With the encoder frozen the head trains on cached features of
    ``augmentation.multiplicity`` views per image (`common.data.features`); otherwise the
    whole model trains on augmented images.
    """
    sampling = fresh_generator() if private else generator
    per_patient = private and config.privacy.unit == "patient"
    if per_patient and not encoder_frozen(model):
        raise MammoflError("privacy.unit 'patient' needs the encoder frozen this round (patients are clipped on "
                           "cached features); the config's freeze schedule trains it")
    if per_patient:
        head, loader = patient_training_data(model, records, config, device=device, generator=sampling)
        return head, loader, False
    if encoder_frozen(model):
        head, loader = view_training_data(model, records, config, device=device, shuffle=not private,
                                          generator=sampling)
        return head, loader, False
    # Opacus' BatchMemoryManager tells the optimizer which physical batch ends a logical one as
    # the sampler yields it; DataLoader workers fetch ahead, and the signals then slip (measured:
    # 18 and 41 accounted steps where 20 and 40 were taken). Where a Poisson batch can be split,
    # the private loader reads in this process.
    splittable = private and len(records) > config.privacy.max_physical_batch_size
    loader = make_loader(records, config, train=True, generator=sampling, num_workers=0 if splittable else None)
    return model, loader, splittable


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
    budget_epsilon: float | None = None,
    budget_bound: str = "run",
) -> LocalResult:
    """Train `model` in place for ``federation.local_epochs`` epochs on the site's records.

    With privacy on, the site first checks that this round fits its remaining budget
    (`budget_epsilon`, else the stored one; raising BudgetExhaustedError if not), then
    trains and persists its accountant. `generator` (shuffling, augmentation workers) is
    ignored under DP: sampling and noise then draw on fresh entropy.
    """
    model.to(device)
    epochs = config.federation.local_epochs
    # The transfer schedule counts the site's local epochs across rounds; a frozen parameter
    # gets no gradient, so DP-SGD neither clips nor noises it (fewer dimensions, less noise).
    freeze_schedule_from_config(config).apply(model, (server_round - 1) * epochs)
    private = config.privacy.enabled
    trained, loader, splittable = _training_data(model, records, config, device=device, private=private,
                                                 generator=generator)
    cached = trained is not model
    optimizer = build_optimizer(
        config.optimizer, trained.parameters(), learning_rate=config.learning_rate, weight_decay=config.weight_decay
    )
    loss_fn = build_loss(config.loss, class_counts(records), class_weights=config.class_weights,
                         private=private)
    if cached:
        loss_fn = PatientLoss(loss_fn) if private and config.privacy.unit == "patient" else ViewsLoss(loss_fn)
    loss_fn = loss_fn.to(device)
    average = ExponentialAverage(trained.parameters(), config.federation.ema_decay) \
        if config.federation.ema_decay > 0 else None
    after_step = chained(proximal_step(trained, config.learning_rate, proximal_mu) if proximal_mu > 0 else None,
                         average.update if average is not None else None)

    if not private:
        losses = [train_one_epoch(trained, loader, optimizer, loss_fn, device=device, after_step=after_step)
                  for _ in range(epochs)]
        if average is not None:
            average.copy_to()
        return LocalResult(num_examples=len(records), train_loss=losses[-1], privacy=None)

    assert privacy_state is not None and state_dir is not None
    sample_rate = 1.0 / len(loader)  # what Opacus uses for Poisson sampling of this loader
    # ...and its sampler draws int(1 / q) batches an epoch: 92, not 93, for 93 batches.
    steps = int(1 / sample_rate) * epochs
    noise = privacy_state.plan_noise(
        config.privacy, sample_rate=sample_rate, planned_steps=steps * config.federation.rounds
    )
    privacy_state.check_round(sample_rate=sample_rate, steps=steps, budget_epsilon=budget_epsilon)

    with warnings.catch_warnings():
        # Opacus warns, every round, that its secure_mode (torchcsprng) is off. Our noise and sampling
        # come from `fresh_generator` instead (OS entropy, never the config seed); what that leaves
        # open is stated in every privacy report (`server.privacy_ledger.RANDOMNESS`).
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = PrivacyEngine(accountant=privacy_state.accountant)
    engine.accountant.history = list(privacy_state.history)
    # On cached features the head is all that trains: flat clipping is as cheap as ghost there.
    private_model, private_optimizer, loss_fn, private_loader = make_private(
        engine, trained, optimizer, loader, loss_fn, noise_multiplier=noise, config=config,
        noise_generator=fresh_generator(device), ghost=False if cached else None)
    with frozen_batch_norms_held(model), warnings.catch_warnings():
        # Opacus' hooks on a head fed cached features (data, needing no gradient) say so each step.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        for _ in range(epochs):
            if not splittable:
                train_one_epoch(private_model, private_loader, private_optimizer, loss_fn,
                                device=device, after_step=after_step)
                continue
            with BatchMemoryManager(
                data_loader=private_loader,
                max_physical_batch_size=config.privacy.max_physical_batch_size,
                optimizer=private_optimizer,
            ) as physical_loader:
                train_one_epoch(private_model, physical_loader, private_optimizer, loss_fn,
                                device=device, after_step=after_step)
    # The wrapped module is `trained` itself (the model or its head), already trained; only
    # Opacus' hooks must go.
    private_model.remove_hooks()
    private_model.cleanup()
    if average is not None:
        average.copy_to()
    taken = steps_in(engine.accountant.history) - steps_in(privacy_state.history)
    if taken != steps:
        # Fail closed: the budget check projected `steps`; an update from more (or other) steps
        # than were checked is never released.
        raise AccountingError(f"the accountant recorded {taken} DP-SGD steps where {steps} were planned and "
                              "checked against the budget; the round's update is withheld")
    privacy_state.record_round(server_round, engine.accountant.history)
    privacy_state.save(state_dir)
    return LocalResult(
        num_examples=len(records),
        train_loss=None,
        privacy=PrivacyRound(
            steps=steps,
            sample_rate=sample_rate,
            noise_multiplier=noise,
            max_grad_norm=config.privacy.max_grad_norm,
            epsilon=privacy_state.spent_epsilon,
            delta=privacy_state.delta,
            budget_epsilon=privacy_state.budget_epsilon,
            accountant=privacy_state.accountant,
            budget_bound=budget_bound,
            unit=config.privacy.unit,
        ),
    )

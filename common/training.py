"""The train / evaluate loop shared by centralised training and every federated site.

Plain PyTorch, readable top to bottom: one function per pass over the data. A site's
DP-SGD training passes an Opacus-wrapped model, optimizer and loader through the same
functions; nothing here knows whether privacy is on.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from common.errors import ConfigError
from common.metrics import classification_metrics

OPTIMIZER_NAMES = ("adam", "adamw", "sgd")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a generator for DataLoader shuffling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(name)


def build_optimizer(
    name: str, params: Iterable[nn.Parameter], *, learning_rate: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (momentum 0.9). All parameters are handed over, frozen ones too:
    a parameter without a gradient is skipped by every torch optimizer, so a freeze
    schedule can open blocks later without rebuilding the optimizer."""
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZER_NAMES)}")


class ExponentialAverage:
    """An exponential moving average of parameters, updated after each optimizer step.

    The decay warms up as min(decay, (1 + t) / (10 + t)) so that the first steps, far from
    where training ends up, are forgotten quickly. `copy_to` writes the average into the
    parameters; under DP-SGD it is a function of the noised iterates only (post-processing).
    """

    def __init__(self, parameters: Iterable[nn.Parameter], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"ema decay {decay} is invalid; valid: 0 <= decay < 1")
        self.decay = decay
        self.parameters = [parameter for parameter in parameters if parameter.requires_grad]
        self.average = [parameter.detach().clone() for parameter in self.parameters]
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for average, parameter in zip(self.average, self.parameters):
            average.mul_(decay).add_(parameter.detach(), alpha=1 - decay)

    @torch.no_grad()
    def copy_to(self) -> None:
        for average, parameter in zip(self.average, self.parameters):
            parameter.copy_(average)


def chained(*steps: Callable[[], None] | None) -> Callable[[], None] | None:
    """One after-step callback running `steps` in order (None where none is given)."""
    present = [step for step in steps if step is not None]
    if not present:
        return None

    def run() -> None:
        for step in present:
            step()

    return run


def show_progress(verbose: int) -> bool:
    """Progress bars only for verbose >= 1 on an interactive terminal (never in CI logs)."""
    return verbose >= 1 and sys.stderr.isatty()


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    *,
    device: torch.device,
    after_step: Callable[[], None] | None = None,
    progress: bool = False,
    description: str = "train",
) -> float:
    """One pass over `loader`; returns the mean training loss per example.

    `after_step` runs after every optimizer step (FedProx's proximal step). An empty batch,
    which Poisson sampling produces now and then, still takes its optimizer step: under
    DP-SGD that step releases noise and must be accounted like any other.
    """
    model.train()
    total_loss, total_examples = 0.0, 0
    for images, labels in tqdm(loader, desc=description, disable=not progress, leave=False):
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        if len(labels):
            total_loss += float(loss.detach()) * len(labels)
            total_examples += len(labels)
    return total_loss / max(total_examples, 1)


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: DataLoader, *, device: torch.device, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] and true labels [N] over `loader`, in loader order, on the CPU."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in tqdm(loader, desc="predict", disable=not progress, leave=False):
        all_logits.append(model(images.to(device)).float().cpu())
        all_labels.append(labels.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    *,
    device: torch.device,
    progress: bool = False,
) -> dict[str, float]:
    """The training loss and every classification metric over `loader`."""
    logits, labels = predict_logits(model, loader, device=device, progress=progress)
    loss = float(loss_fn.cpu()(logits, labels))
    loss_fn.to(device)
    probs = torch.softmax(logits, dim=1).numpy()
    return {"loss": loss, **classification_metrics(labels.numpy(), probs)}

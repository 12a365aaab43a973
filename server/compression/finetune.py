"""Short repair fine-tunes on the server's calibration images, by distillation.

The server holds no labelled site data, so a pruned or quantisation-aware student learns
to reproduce the fp32 teacher's probabilities (KL divergence) rather than labels: it needs
no labels and pulls the student back to the behaviour the federation trained.

The student runs in eval mode while it learns: BatchNorm keeps the statistics learnt from
the sites (a few dozen server images would only add noise to them) and dropout stays off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

DISTILLATION_BATCH = 16
# A repair step applied to a student model in place (`distil` with its data bound).
Finetune = Callable[[nn.Module], None]


def distil(
    student: nn.Module, teacher: nn.Module, images: Tensor, *, epochs: int, learning_rate: float, seed: int
) -> None:
    """Train `student` in place for `epochs` passes over `images` [K, 1, S, S] towards `teacher`."""
    teacher.eval()
    student.eval()
    with torch.no_grad():
        targets = torch.softmax(teacher(images), dim=1)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(DISTILLATION_BATCH):
            optimizer.zero_grad(set_to_none=True)
            log_probs = torch.log_softmax(student(images[batch]), dim=1)
            loss = nn.functional.kl_div(log_probs, targets[batch], reduction="batchmean")
            loss.backward()
            optimizer.step()

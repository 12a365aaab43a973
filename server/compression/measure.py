"""What a variant costs and what it still knows: speed, parameter counts, test predictions.

Every variant is timed in the same process, through the same `predict` entry point the
API uses (numpy in, probabilities out), with the same thread budget, so the ratios
between variants mean something even on a busy machine where absolute times do not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

Predict = Callable[[np.ndarray], np.ndarray]
WARMUP_CALLS = 3


@dataclass(frozen=True)
class Speed:
    latency_ms_p50: float
    latency_ms_p95: float
    throughput_images_per_s: float


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Limit PyTorch's intra-op threads for the block (ONNX Runtime sessions get theirs at creation)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_speed(predict: Predict, images: np.ndarray, *, latency_runs: int, batch: int, batch_runs: int) -> Speed:
    """p50/p95 latency of single-image calls and images per second at `batch` (images tiled if short)."""
    single = images[:1]
    batched = np.resize(images, (batch, *images.shape[1:]))
    latencies = _timed_calls(predict, single, latency_runs)
    batch_seconds = _timed_calls(predict, batched, batch_runs)
    return Speed(
        latency_ms_p50=float(np.percentile(latencies, 50) * 1000),
        latency_ms_p95=float(np.percentile(latencies, 95) * 1000),
        throughput_images_per_s=float(batch * batch_runs / batch_seconds.sum()),
    )


def predict_in_batches(predict: Predict, images: np.ndarray, batch: int) -> np.ndarray:
    """Probabilities [N, classes] for all `images`, `batch` at a time."""
    return np.concatenate([predict(images[start : start + batch]) for start in range(0, len(images), batch)])


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(non-zero, total) learnable parameters: what pruning removes or zeroes."""
    parameters = list(model.parameters())
    return sum(int(torch.count_nonzero(p)) for p in parameters), sum(p.numel() for p in parameters)


def _timed_calls(predict: Predict, inputs: np.ndarray, runs: int) -> np.ndarray:
    for _ in range(WARMUP_CALLS):
        predict(inputs)
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        predict(inputs)
        seconds.append(time.perf_counter() - started)
    return np.asarray(seconds)

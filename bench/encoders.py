"""Training and inference throughput (images/s) of every encoder on this CPU.

Prints a table per image size, with each encoder's speed as a ratio to `smallcnn`
measured in the same run (absolute numbers on a shared machine are noisy; ratios less so).

    .venv/bin/python bench/encoders.py [--sizes 128 224] [--batch 8] [--seconds 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from common.config import ENCODER_NAMES
from common.models.classifier import build_classifier


def images_per_second(step, batch: int, seconds: float) -> float:
    step()  # warm-up: allocations, lazy initialisation
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done < 2:
        step()
        done += 1
    return done * batch / (time.perf_counter() - started)


def measure(name: str, size: int, batch: int, seconds: float) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_classifier(name, norm="batch")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = torch.rand(batch, 1, size, size), torch.randint(0, 3, (batch,))

    def train_step() -> None:
        model.train()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    @torch.no_grad()
    def infer_step() -> None:
        model.eval()
        model(images)

    return images_per_second(train_step, batch, seconds), images_per_second(infer_step, batch, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per cell")
    parser.add_argument("--encoders", nargs="+", default=list(ENCODER_NAMES), choices=ENCODER_NAMES)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    for size in args.sizes:
        results = {name: measure(name, size, args.batch, args.seconds) for name in args.encoders}
        base_train, base_infer = results.get("smallcnn", next(iter(results.values())))
        print(f"\n{size} px | train img/s | infer img/s | train vs smallcnn | infer vs smallcnn")
        print("---|---|---|---|---")
        for name, (train, infer) in results.items():
            print(f"{name} | {train:.1f} | {infer:.1f} | {train / base_train:.3f} | {infer / base_infer:.3f}")


if __name__ == "__main__":
    main()

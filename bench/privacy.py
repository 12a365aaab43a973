"""What DP-SGD and federation cost, as ratios measured in the same run.

(a) local training throughput, DP-SGD (Opacus, Poisson sampling, per-sample clipping) vs
    non-private, same model (GroupNorm variant), images and logical batch (aim: DP <= 2x slower);
(b) peak resident memory of the two, each measured in a fresh process;
(c) with --federated: a federated simulation's wall time vs centralised training on the same
    data and the same number of epochs (aim: <= 1.3x).

    .venv/bin/python bench/privacy.py [--encoder smallcnn] [--size 96] [--images 256] [--federated]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset


def train_throughput(private: bool, encoder: str, size: int, images: int, batch: int, epochs: int) -> dict:
    from opacus import PrivacyEngine

    from common.models.classifier import build_classifier
    from common.training import train_one_epoch

    torch.manual_seed(0)
    data = TensorDataset(torch.rand(images, 1, size, size), torch.randint(0, 3, (images,)))
    model = build_classifier(encoder, norm="group")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(data, batch_size=batch, shuffle=True)
    if private:
        model, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    loss_fn = torch.nn.CrossEntropyLoss()
    train_one_epoch(model, loader, optimizer, loss_fn, device=torch.device("cpu"))  # warm-up
    started = time.perf_counter()
    for _ in range(epochs):
        train_one_epoch(model, loader, optimizer, loss_fn, device=torch.device("cpu"))
    seconds = time.perf_counter() - started
    return {"images_per_s": epochs * images / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_in_subprocess(private: bool, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", "dp" if private else "plain", "--encoder", args.encoder,
               "--size", str(args.size), "--images", str(args.images), "--batch", str(args.batch),
               "--epochs", str(args.epochs)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def federated_vs_centralised(args: argparse.Namespace) -> tuple[float, float]:
    from common.config import parse_config
    from simulations.centralised import train_centralised
    from simulations.federated import simulate

    root = Path(tempfile.mkdtemp(prefix="mammofl-bench-"))
    common = {"seed": 0, "device": "cpu", "num_workers": 0, "verbose": 0, "encoder": args.encoder,
              "batch_size": args.batch, "model": {"image_size": args.size, "norm": "group"},
              "augmentation": False,
              "data": {"root": str(root / "data"), "cache_dir": str(root / "cache"),
                       "synthetic": {"sites": 3, "per_site": args.images // 3, "size": 2 * args.size}},
              "tracking": {"runs_dir": str(root / "runs"), "wandb_mode": "disabled"}}
    central = parse_config({**common, "epochs": 4})
    federated = parse_config({**common, "training": "federated", "federation": {"rounds": 2, "local_epochs": 2}})
    from common.data.pipeline import load_records

    load_records(central.data)  # generate and cache outside the timings
    started = time.perf_counter()
    train_centralised(central, log=lambda message: None)
    central_seconds = time.perf_counter() - started
    started = time.perf_counter()
    simulate(federated, log=lambda message: None)
    return central_seconds, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="smallcnn")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--federated", action="store_true", help="also time a simulation against centralised")
    parser.add_argument("--worker", choices=("dp", "plain"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(train_throughput(args.worker == "dp", args.encoder, args.size, args.images,
                                          args.batch, args.epochs)))
        return
    plain, private = measure_in_subprocess(False, args), measure_in_subprocess(True, args)
    print(f"{args.encoder} GroupNorm, {args.size} px, {args.images} images, logical batch {args.batch}")
    print("mode | train img/s | peak RSS MB")
    print("---|---|---")
    print(f"non-private | {plain['images_per_s']:.1f} | {plain['peak_rss_mb']:.0f}")
    print(f"DP-SGD | {private['images_per_s']:.1f} | {private['peak_rss_mb']:.0f}")
    print(f"DP slowdown: {plain['images_per_s'] / private['images_per_s']:.2f}x (aim <= 2x); "
          f"DP memory: {private['peak_rss_mb'] / plain['peak_rss_mb']:.2f}x")
    if args.federated:
        central, federated = federated_vs_centralised(args)
        print(f"centralised {central:.1f} s, federated simulation {federated:.1f} s: "
              f"{federated / central:.2f}x (aim <= 1.3x)")


if __name__ == "__main__":
    main()

"""What DP-SGD and federation cost, as ratios measured in the same run.

(a) local training throughput, DP-SGD (Opacus, Poisson sampling, per-sample clipping) vs
    non-private, same model (GroupNorm variant), images and logical batch (aim: DP <= 2x slower);
(b) peak memory of the two (resident set; on CUDA also the GPU's), each in a fresh process;
    DP-SGD is measured with flat clipping and with Opacus' ghost clipping;
(c) with --federated: a federated simulation's wall time vs centralised training on the same
    data and the same number of epochs (aim: <= 1.3x).

    .venv/bin/python bench/privacy.py [--encoder smallcnn] [--size 96] [--images 256] [--device cuda] [--federated]
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

MODES = ("plain", "flat", "ghost")


def train_throughput(mode: str, encoder: str, size: int, images: int, batch: int, epochs: int,
                     device: torch.device) -> dict:
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    from common.models.classifier import build_classifier
    from common.training import train_one_epoch

    torch.manual_seed(0)
    data = TensorDataset(torch.rand(images, 1, size, size), torch.randint(0, 3, (images,)))
    model = build_classifier(encoder, norm="group").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(data, batch_size=batch, shuffle=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    if mode != "plain":
        private = {"module": model, "optimizer": optimizer, "data_loader": loader, "noise_multiplier": 1.0,
                   "max_grad_norm": 1.0}
        if mode == "ghost":
            model, optimizer, loss_fn, loader = PrivacyEngine(accountant="rdp").make_private(
                **private, criterion=loss_fn, grad_sample_mode="ghost")
        else:
            model, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(**private)

    def epoch() -> None:
        if mode == "plain":
            train_one_epoch(model, loader, optimizer, loss_fn, device=device)
            return
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=batch, optimizer=optimizer) as physical:
            train_one_epoch(model, physical, optimizer, loss_fn, device=device)

    epoch()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(epochs):
        epoch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"images_per_s": epochs * images / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}


def measure_in_subprocess(mode: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--encoder", args.encoder,
               "--size", str(args.size), "--images", str(args.images), "--batch", str(args.batch),
               "--epochs", str(args.epochs), "--device", args.device]
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
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the throughput part only)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(train_throughput(args.worker, args.encoder, args.size, args.images,
                                          args.batch, args.epochs, torch.device(args.device))))
        return
    results = {mode: measure_in_subprocess(mode, args) for mode in MODES}
    memory = "peak_gpu_mb" if args.device.startswith("cuda") else "peak_rss_mb"
    print(f"{args.encoder} GroupNorm, {args.size} px, {args.images} images, logical batch {args.batch}, {args.device}")
    print(f"mode | train img/s | {memory}")
    print("---|---|---")
    for mode, label in zip(MODES, ("non-private", "DP-SGD, flat clipping", "DP-SGD, ghost clipping")):
        print(f"{label} | {results[mode]['images_per_s']:.1f} | {results[mode][memory]:.0f}")
    plain = results["plain"]
    for mode in ("flat", "ghost"):
        print(f"DP ({mode}) slowdown: {plain['images_per_s'] / results[mode]['images_per_s']:.2f}x (aim <= 2x); "
              f"memory: {results[mode][memory] / plain[memory]:.2f}x")
    if args.federated:
        central, federated = federated_vs_centralised(args)
        print(f"centralised {central:.1f} s, federated simulation {federated:.1f} s: "
              f"{federated / central:.2f}x (aim <= 1.3x)")


if __name__ == "__main__":
    main()

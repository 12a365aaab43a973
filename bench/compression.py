"""Compression benchmark: every variant of one run, measured in one process, against the aims.

Aims (from the compression issue), all on CPU at batch 1 unless noted:
  int8 static vs fp32: at least 2x faster, at most 1 accuracy point lost, file at least 3.5x smaller;
  50 % structured pruning: at least 1.5x faster; PyTorch vs ONNX Runtime for each variant that has both.

Without --run it first trains a fresh model briefly (default resnet18, 128 px, synthetic
mammograms with doubled lesion contrast) so that the accuracy columns mean something;
latency does not depend on the weights.
fp16, bf16 and int8_qat are left out unless named with --variants: on CPUs without native
half-precision arithmetic (AVX2) eager fp16/bf16 resnet18 takes over a second per image,
which alone would stretch the benchmark by ten minutes.

    .venv/bin/python bench/compression.py [--run RUN_DIR] [--encoder resnet18] [--image-size 128]
        [--epochs 2] [--threads 1] [--latency-runs 30]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common.config import ENCODER_NAMES, parse_config
from server.compression import (
    VARIANT_NAMES,
    CompressionConfig,
    CompressionReport,
    compress_run,
)
from simulations.centralised import train_centralised

# (variant, reference, what is compared, aim) - speed-ups are reference p50 / variant p50.
SPEED_AIMS = (
    ("int8_static", "fp32", "int8 static vs fp32 PyTorch", 2.0),
    ("int8_static", "onnx_fp32", "int8 static vs fp32 ONNX Runtime", 2.0),
    ("pruned_structured", "fp32", "50 % channels pruned vs fp32 (PyTorch)", 1.5),
    ("pruned_structured_onnx", "onnx_fp32", "50 % channels pruned vs fp32 (ONNX Runtime)", 1.5),
)
BACKEND_PAIRS = (("fp32", "onnx_fp32"), ("pruned_structured", "pruned_structured_onnx"))
DEFAULT_VARIANTS = tuple(name for name in VARIANT_NAMES if name not in {"fp16", "bf16", "int8_qat"})


def train_briefly(root: Path, encoder: str, image_size: int, epochs: int) -> Path:
    config = parse_config({
        "name": f"bench-{encoder}",
        "device": "cpu",
        "epochs": epochs,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "loss": "weighted_cross_entropy",
        "num_workers": 0,
        "verbose": 0,
        "encoder": encoder,
        "augmentation": False,
        "callbacks": [{"class_name": "ModelCheckpoint", "config": {"monitor": "val_macro_auc"}}],
        "model": {"image_size": image_size},
        "data": {"source": "synthetic", "root": str(root / "data"), "cache_dir": str(root / "cache"),
                 "synthetic": {"sites": 2, "per_site": 100, "size": 2 * image_size, "test_fraction": 0.4,
                               "lesion_contrast": 2.0}},
        "tracking": {"runs_dir": str(root / "runs"), "wandb_mode": "disabled"},
    })
    return train_centralised(config).run.root


def speed_ratio(report: CompressionReport, variant: str, reference: str) -> float:
    return report.variant(reference).latency_ms_p50 / report.variant(variant).latency_ms_p50


def print_aims(report: CompressionReport) -> None:
    measured = {result.variant for result in report.variants}
    print("\naim | measured | target | met")
    print("---|---|---|---")
    for variant, reference, label, aim in SPEED_AIMS:
        if {variant, reference} <= measured:
            ratio = speed_ratio(report, variant, reference)
            print(f"{label}: p50 speed-up | {ratio:.2f}x | >= {aim}x | {'yes' if ratio >= aim else 'NO'}")
    if {"int8_static", "fp32"} <= measured:
        int8 = report.variant("int8_static")
        change = (int8.change["accuracy"] or 0.0) * 100
        print(f"int8 static accuracy change | {change:+.1f} points | >= -1 | {'yes' if change >= -1.0 else 'NO'}")
        print(f"int8 static file vs fp32 | {int8.size_ratio:.2f}x smaller | >= 3.5x | {'yes' if int8.size_ratio >= 3.5 else 'NO'}")
        print(f"int8 static agrees with fp32 | {int8.agreement_with_fp32:.1%} | - | -")
    print("\nPyTorch vs ONNX Runtime | PyTorch p50 ms | ORT p50 ms | ORT speed-up | PyTorch img/s | ORT img/s")
    print("---|---|---|---|---|---")
    for torch_variant, onnx_variant in BACKEND_PAIRS:
        if {torch_variant, onnx_variant} <= measured:
            eager, ort = report.variant(torch_variant), report.variant(onnx_variant)
            print(f"{torch_variant} | {eager.latency_ms_p50:.2f} | {ort.latency_ms_p50:.2f} | "
                  f"{eager.latency_ms_p50 / ort.latency_ms_p50:.2f}x | {eager.throughput_images_per_s:.1f} | "
                  f"{ort.throughput_images_per_s:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="an existing run to compress (default: train one)")
    parser.add_argument("--encoder", default="resnet18", choices=ENCODER_NAMES)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4, help="training epochs of the fresh model")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for every backend")
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--throughput-runs", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANT_NAMES)
    args = parser.parse_args()
    settings = CompressionConfig(
        variants=tuple(args.variants), threads=args.threads, latency_runs=args.latency_runs,
        throughput_runs=args.throughput_runs,
    )
    with tempfile.TemporaryDirectory(prefix="mammofl-bench-") as scratch:
        if args.run is None:
            print(f"model: {args.encoder} at {args.image_size} px, trained {args.epochs} epoch(s) on synthetic "
                  "mammograms in this run (accuracy columns from this model; latency does not depend on the weights)")
            run_dir = train_briefly(Path(scratch), args.encoder, args.image_size, args.epochs)
        else:
            run_dir = args.run
            print(f"model: the best model of run {run_dir}")
        print(f"torch {torch.__version__}, {args.threads} thread(s) for every backend, batch 1 latency, "
              f"throughput at batch {settings.throughput_batch}")
        report = compress_run(run_dir, settings)
        print()
        print(report.markdown_table())
        print_aims(report)


if __name__ == "__main__":
    main()

"""What SecAgg+ costs: per-round wall time of a federation with and without it, same config.

Both runs: the tests' tiny DP federation (3 synthetic sites x 60 images, 64 px, smallcnn,
2 local epochs per round), one after the other in the simulation engine, data generated
and cached before either. A round's time is the ``seconds`` the aggregator logs (training,
aggregation, central and federated evaluation); round 1 also pays for starting the
simulated sites, so the ratio that counts is that of the later rounds.

    .venv/bin/python bench/secure_aggregation.py [--rounds 3] [--sites 3] [--per-site 60] [--size 64]

SecAgg+'s cost in a real deployment (one process per site, TLS gRPC) is measured by
``bench/federation.py``, beside its cost in simulation on the same small config.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common.config import ExperimentConfig, parse_config
from common.data.pipeline import load_records
from simulations.federated import simulate


def bench_config(root: Path, args: argparse.Namespace, *, secure_aggregation: bool) -> ExperimentConfig:
    return parse_config({
        "name": "secagg" if secure_aggregation else "plain", "seed": 11, "device": "cpu", "training": "federated",
        "batch_size": 16, "learning_rate": 0.003, "num_workers": 0, "encoder": "smallcnn", "verbose": 0,
        "augmentation": False, "validation_split": 0.2, "model": {"image_size": args.size},
        "data": {"root": str(root / "data"), "cache_dir": str(root / "cache"),
                 "synthetic": {"sites": args.sites, "per_site": args.per_site, "size": 96, "seed": 11,
                               "burned_in_text": 0.0}},
        "federation": {"rounds": args.rounds, "local_epochs": 2, "min_train_sites": args.sites,
                       "secure_aggregation": secure_aggregation},
        "privacy": {"enabled": True, "target_epsilon": 8.0, "max_grad_norm": 1.0},
        "tracking": {"runs_dir": str(root / "runs"), "wandb_mode": "disabled"},
    })


def round_seconds(config: ExperimentConfig) -> list[float]:
    result = simulate(config, log=lambda message: None)
    return [float(row["seconds"]) for row in result.run.read_metrics() if "round" in row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--per-site", type=int, default=60)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mammofl-bench-secagg-"))
    plain_config = bench_config(root, args, secure_aggregation=False)
    load_records(plain_config.data)  # generate and cache outside the timings
    plain = round_seconds(plain_config)
    secure = round_seconds(bench_config(root, args, secure_aggregation=True))
    print(f"{'round':>5} {'plain s':>9} {'SecAgg+ s':>10} {'ratio':>6}")
    for server_round, (plain_s, secure_s) in enumerate(zip(plain, secure), start=1):
        print(f"{server_round:>5} {plain_s:>9.2f} {secure_s:>10.2f} {secure_s / plain_s:>6.2f}")
    if len(plain) > 1:
        steady_plain, steady_secure = sum(plain[1:]), sum(secure[1:])
        print(f"rounds 2-{len(plain)}: SecAgg+ / plain = {steady_secure / steady_plain:.2f}x")


if __name__ == "__main__":
    main()

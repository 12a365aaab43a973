"""``mammofl simulate CONFIG``: every site of a config as a virtual SuperNode in one machine.

Flower's simulation engine runs the same ServerApp and ClientApp a deployment runs; each
virtual SuperNode is one site with its own partition. The run directory is created here
and its resolved ``config.json`` is what every site reads, so all sides see one config.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.simulation import run_simulation

from clients.client_app import make_client_app
from common.config import ExperimentConfig
from common.data.pipeline import load_records, site_partitions
from common.errors import ConfigError
from common.models.transfer import require_site_free_weights
from common.runs import AppSettings, RunDirectory
from server.compression import check_compression
from server.secure_aggregation import sampled_sites
from server.federation import UpdateObserver
from server.server_app import make_server_app
from simulations.tracking import Tracker


@dataclass(frozen=True)
class FederatedResult:
    run: RunDirectory
    final_metrics: dict[str, Any]


def simulate(config: ExperimentConfig, *, resume: Path | None = None, log=print, canaries: Path | None = None,
             update_observer: UpdateObserver | None = None) -> FederatedResult:
    """Run (or resume) the federated simulation the config describes.

    `canaries` and `update_observer` serve a privacy audit (`simulations.audit`): the canary
    site's extra training records, and a hook seeing every update the aggregator sees.
    """
    if config.compression.enabled:
        check_compression(config, config.compression)
    if config.model.pretrained is not None:
        require_site_free_weights(config.model.pretrained)  # before a site image is read
    records = load_records(config.data)  # generates synthetic data before any site starts
    sites = site_partitions(records, config)
    if len(sites) < config.federation.min_available_sites:
        raise ConfigError(
            f"federation.min_available_sites is {config.federation.min_available_sites} but the data has "
            f"{len(sites)} site(s); lower it or add sites"
        )
    if config.federation.secure_aggregation:
        sampled_sites(config.federation, len(sites))  # SecAgg+ needs three sites a round: say so now
    logging.getLogger("flwr").setLevel(logging.INFO if config.verbose >= 2 else logging.ERROR)
    # Ray warns (FutureWarning, every run) that it will stop overriding CUDA_VISIBLE_DEVICES for
    # actors that ask for no GPU; ours ask for none and need no override: opt in to the future.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run = _run_directory(config, resume)
    settings = AppSettings(config_path=run.root / "config.json", run_dir=run.root, canaries=canaries)
    tracker = Tracker(config, run)
    if config.verbose:
        log(f"run {run.run_id}: {len(sites)} sites ({', '.join(f'{s}: {len(r)}' for s, r in sorted(sites.items()))} "
            f"training images), {config.federation.rounds} rounds of {config.federation.strategy}")
    try:
        run_simulation(
            server_app=make_server_app(settings, observer=tracker.log_round, update_observer=update_observer),
            client_app=make_client_app(settings),
            num_supernodes=len(sites),
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                              "logging_level": logging.ERROR, "log_to_driver": False},
            },
        )
    finally:
        tracker.finish(run.model_dir / "best.pt")
    metrics = [row for row in run.read_metrics() if "round" in row]
    return FederatedResult(run=run, final_metrics=metrics[-1] if metrics else {})


def _run_directory(config: ExperimentConfig, resume: Path | None) -> RunDirectory:
    if resume is None:
        run = RunDirectory.create(config.tracking.runs_dir, config.name)
        run.write_config(config)
        return run
    if not (resume / "config.json").is_file():
        raise ConfigError(f"--resume {resume}: not a run directory (no config.json)")
    return RunDirectory(resume)

"""A hospital's site process: a Flower SuperNode carrying our ClientApp.

``mammofl site run`` starts ``flower-supernode`` against the aggregator's SuperLink. The
node config tells our ClientApp who the site is and where its two folders are:

- ``data-dir``: the site's CBIS-DDSM tree (de-identified by ``mammofl anonymize``; the gate
  checks it when the config asks). The images are read in this machine and never sent.
- ``state-dir``: the site's own state, ``privacy_state.json`` above all: the accountant
  history of every round the site ever trained and its budget. It outlives the process, so
  a restarted site keeps its spent epsilon and still refuses rounds beyond its budget.
- ``budget-epsilon``, ``max-delta``, ``allow-non-private``, ``allow-evaluation``, ``privacy-unit``: the site's own privacy limits
  (`clients.privacy.SiteLimits`). The aggregator sends the run config, so its budget is only
  a request: the site refuses a run asking a larger epsilon or delta than its own, or (unless
  allowed) training without DP.
- ``deidentification-secret`` (optional): the keyed secret the site de-identified its
  images with; the ClientApp's gate checks the images against it when the config asks
  (``data.require_deidentified``). Without it the config's ``data.deidentification_secret``
  is used, which on another machine than the aggregator rarely exists.

The experiment config itself comes with each run (``mammofl federation run`` puts it in the
run config), so a site needs nothing from the aggregator but the CA certificate.

TLS (``--root-certificates``, the federation's CA) is on unless ``--insecure`` is given;
``--auth-key`` is the site's private key whose public half the aggregator enrolled.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from clients.flower_processes import SITE_STATE_ENV, SITE_THREADS_ENV, flower_environment
from common.data.cbis import load_cbis_ddsm
from common.errors import ConfigError, DataError


@dataclass(frozen=True)
class SiteNode:
    """Everything one SuperNode process needs; `state_dir` is private to the site."""

    site_id: str
    data_dir: Path
    state_dir: Path
    superlink: str
    root_certificates: Path | None
    auth_private_key: Path | None
    budget_epsilon: float
    max_delta: float = 1e-5
    allow_non_private: bool = False
    allow_evaluation: bool = True
    privacy_unit: str = "image"
    clientappio_address: str = "127.0.0.1:9094"
    deidentification_secret: Path | None = None
    # Threads the site worker's PyTorch may use (None: all cores). Sites sharing one machine (the
    # loopback demo, the benchmark) split the cores, as one process simulating them all does.
    cpu_threads: int | None = None

    def node_config(self) -> str:
        """Flower's ``--node-config`` string: what ``load_site`` reads in the ClientApp."""
        config = (f'site-id="{self.site_id}" data-dir="{self.data_dir.resolve()}" '
                  f'state-dir="{self.state_dir.resolve()}" budget-epsilon={self.budget_epsilon!r} '
                  f'max-delta={self.max_delta!r} allow-non-private="{str(self.allow_non_private).lower()}" '
                  f'allow-evaluation="{str(self.allow_evaluation).lower()}" privacy-unit="{self.privacy_unit}"')
        if self.deidentification_secret is not None:
            config += f' deidentification-secret="{self.deidentification_secret.resolve()}"'
        return config


def supernode_command(node: SiteNode) -> list[str]:
    """The ``flower-supernode`` command line for `node` (run through `clients.flower_processes`)."""
    # Flower's flower-supernode, with its idle waits shortened (`clients.flower_processes`).
    command = [sys.executable, "-m", "clients.flower_processes", "supernode", "--superlink", node.superlink,
               "--clientappio-api-address", node.clientappio_address, "--node-config", node.node_config()]
    command += ["--insecure"] if node.root_certificates is None else ["--root-certificates", str(node.root_certificates)]
    if node.auth_private_key is not None:
        command += ["--auth-supernode-private-key", str(node.auth_private_key)]
    return command


def check_site(node: SiteNode) -> int:
    """Refuse to start a site that could not train: returns its number of training images."""
    for path in (node.root_certificates, node.auth_private_key, node.deidentification_secret):
        if path is not None and not path.is_file():
            raise ConfigError(f"site {node.site_id}: {path} does not exist")
    if not node.budget_epsilon > 0 or not 0 < node.max_delta < 1:
        raise ConfigError(f"site {node.site_id}: --budget-epsilon must be > 0 and --max-delta in (0, 1); got "
                          f"{node.budget_epsilon:g} and {node.max_delta:g}")
    if '"' in node.site_id or not node.site_id.strip():
        raise ConfigError(f"--site-id {node.site_id!r}: give a non-empty name without quotes")
    for path in (node.data_dir, node.state_dir, node.deidentification_secret):
        if path is not None and '"' in str(path.resolve()):
            raise ConfigError(f"{path}: Flower's node config cannot carry a path with a double quote; rename it")
    training = [record for record in load_cbis_ddsm(node.data_dir) if record.split == "train"]
    if not training:
        raise DataError(f"site {node.site_id}: {node.data_dir} holds no training images")
    return len(training)


def prepare_state_dir(node: SiteNode) -> Path:
    """The site's state folder, readable by the site only."""
    node.state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(node.state_dir, 0o700)
    return node.state_dir


def site_environment(node: SiteNode) -> dict[str, str]:
    """The SuperNode's environment: this one's binaries first (Flower starts its SuperExec and
    ClientApp processes by name) and a Flower home inside the site's state folder."""
    env = flower_environment(node.state_dir.resolve() / "flwr")
    env[SITE_STATE_ENV] = str(node.state_dir.resolve())
    if node.cpu_threads is not None:
        env[SITE_THREADS_ENV] = str(node.cpu_threads)
    return env


def shared_machine_threads(sites: int) -> int:
    """Threads per site when `sites` site processes share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, sites))


def run_site(node: SiteNode) -> int:
    """Run the SuperNode in the foreground until it stops; returns its exit status."""
    check_site(node)
    prepare_state_dir(node)
    return subprocess.run(supernode_command(node), env=site_environment(node), check=False).returncode

"""``mammofl`` subcommands of a deployed federation: ``certs create``, ``site run``, ``federation up|run``.

`mammofl.cli` calls :func:`add_commands`. Here the aggregator side (`server.deployment`) and
the site side (`clients.site`) meet only for the loopback demo, where one machine plays both.
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path


def _certs_create(args: argparse.Namespace) -> int:
    from common.certs import create_node_keys, create_tls_files

    tls = create_tls_files(args.out, args.host, overwrite=args.overwrite)
    print(f"CA certificate (give it to every site and to whoever submits runs): {tls.ca_certificate}")
    print(f"SuperLink certificate for {', '.join(args.host)}: {tls.server_certificate} (key {tls.server_key})")
    for site_id in args.site:
        keys = create_node_keys(args.out / "sites", site_id, overwrite=args.overwrite)
        print(f"{site_id}: private key {keys.private_key} (stays at the site), public key {keys.public_key} (enrol it)")
    return 0


def _site_run(args: argparse.Namespace) -> int:
    from clients.site import SiteNode, run_site
    from common.errors import ConfigError

    if (args.root_certificates is None) == (not args.insecure):
        raise ConfigError("site run: give --root-certificates CA_FILE (TLS), or --insecure for a plaintext test setup")
    if args.insecure and args.auth_key is not None:
        raise ConfigError("site run: --auth-key needs TLS (--root-certificates); Flower signs requests only over TLS")
    node = SiteNode(site_id=args.site_id, data_dir=args.data, superlink=args.superlink,
                    state_dir=args.state_dir or args.data.parent / f"{args.site_id}-state",
                    root_certificates=args.root_certificates, auth_private_key=args.auth_key,
                    clientappio_address=args.clientappio_address,
                    deidentification_secret=args.deidentification_secret,
                    budget_epsilon=args.budget_epsilon, max_delta=args.max_delta,
                    allow_non_private=args.allow_non_private, allow_evaluation=not args.no_evaluation,
                    privacy_unit=args.privacy_unit)
    return run_site(node)


def _federation_up(args: argparse.Namespace) -> int:
    from server.deployment import enrol_site, start_superlink, stop

    deployment, tls = _deployment_from(args)
    superlink = start_superlink(deployment, tls)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    sites: list = []
    try:
        print(f"SuperLink: Fleet API {deployment.fleet_address}, Control API {deployment.control_address} "
              f"({'plaintext' if tls is None else 'TLS'}, "
              f"SuperNode authentication {'on' if deployment.node_auth else 'off'})")
        print(f"flwr CLI: FLWR_HOME={deployment.write_flower_config().parent} flwr ls mammofl")
        for public_key in args.enrol:
            node_id = enrol_site(deployment, public_key)
            print(f"{public_key}: " + (f"enrolled as node {node_id}" if node_id else "already enrolled"))
        if args.local_sites:
            _start_local_sites(deployment, args.local_sites, tls, sites)
        print(f"deployment: {deployment.folder / 'deployment.json'}; submit with "
              f"`mammofl federation run CONFIG --dir {deployment.folder}`; Ctrl-C stops everything")
        while superlink.poll() is None:
            time.sleep(1.0)
        print(f"the SuperLink exited with status {superlink.returncode}; see {deployment.folder / 'superlink.log'}")
        return 1
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: how this command is meant to end
        print(f"federation up: stopping the SuperLink and {len(sites)} site process(es)")
        return 0
    finally:
        for process in [*sites, superlink]:
            stop(process)


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt


def _deployment_from(args: argparse.Namespace):
    from common.certs import TlsFiles, create_tls_files
    from common.errors import ConfigError
    from server.deployment import Deployment

    if args.insecure and not args.no_node_auth:
        raise ConfigError("federation up: SuperNode authentication needs TLS; with --insecure add --no-node-auth")
    folder = args.dir.resolve()
    tls = None
    if not args.insecure:
        certs = args.certs or folder / "secrets"
        tls = TlsFiles.in_folder(certs)
        if args.certs is None and not tls.ca_certificate.exists():
            tls = create_tls_files(certs, [args.host])
        tls.require()
    address = f"{args.host}:{{}}"
    deployment = Deployment(folder=folder, fleet_address=address.format(args.fleet_port),
                            control_address=address.format(args.control_port),
                            serverappio_address=f"127.0.0.1:{args.serverappio_port}",
                            ca_certificate=tls.ca_certificate.resolve() if tls else None,
                            node_auth=not args.no_node_auth)
    return deployment, tls


def _start_local_sites(deployment, config_path: Path, tls, processes: list) -> None:
    """The loopback demo: one site process per site folder of the config's data, each enrolled.

    Started processes are appended to `processes` at once, so that a failure stops them too.
    """
    from clients.site import (
        SiteNode,
        prepare_state_dir,
        shared_machine_threads,
        site_environment,
        supernode_command,
    )
    from common.certs import NodeKeys, create_node_keys
    from common.config import load_config
    from common.data.cbis import load_site_folders
    from common.data.pipeline import load_records
    from server.deployment import enrol_site, free_port, spawn

    config = load_config(config_path)
    load_records(config.data)  # makes the synthetic sites on first use
    sites = load_site_folders(config.data.root, config.data.layout, skip_missing=config.data.skip_missing)
    for site_id in sorted(sites):
        keys = NodeKeys.in_folder(deployment.folder / "secrets" / "sites", site_id)
        if not keys.private_key.exists():
            keys = create_node_keys(keys.private_key.parent, site_id)
        if deployment.node_auth:
            enrol_site(deployment, keys.public_key)
        # The loopback demo plays every part: each site allows what the config asks of it.
        node = SiteNode(site_id=site_id, data_dir=(config.data.root / site_id).resolve(),
                        budget_epsilon=config.privacy.budget_for(site_id) if config.privacy.enabled else 1.0,
                        max_delta=config.privacy.target_delta, allow_non_private=not config.privacy.enabled,
                        state_dir=deployment.folder / "sites" / site_id / "state",
                        superlink=deployment.fleet_address, root_certificates=tls.ca_certificate if tls else None,
                        auth_private_key=keys.private_key if deployment.node_auth else None,
                        clientappio_address=f"127.0.0.1:{free_port()}",
                        deidentification_secret=config.data.deidentification_secret,
                        cpu_threads=shared_machine_threads(len(sites)))
        prepare_state_dir(node)
        processes.append(spawn(supernode_command(node), deployment.folder / "sites" / site_id / "supernode.log",
                               env=site_environment(node)))
        print(f"{site_id}: SuperNode pid {processes[-1].pid}, data {node.data_dir}, state {node.state_dir}")


def _federation_run(args: argparse.Namespace) -> int:
    from mammofl.cli import print_run_outputs
    from server.deployment import Deployment, run_federation

    deployment = Deployment.load(args.dir.resolve(), wait=args.wait)
    run, _ = run_federation(deployment, args.config, resume=args.resume, timeout=args.timeout)
    print_run_outputs(run.root)
    return 0


def add_commands(commands) -> None:
    """Adds this area's subcommands to the top-level subparsers ``commands``."""
    certs = commands.add_parser("certs", help="TLS certificates and SuperNode keys of a deployed federation")
    certs_commands = certs.add_subparsers(dest="certs_command", metavar="CERTS_COMMAND", required=True)
    create = certs_commands.add_parser(
        "create", help="a CA, a SuperLink certificate for the given hosts, and site key pairs",
        description="Write ca.crt, server.pem/server.key (and sites/<id>.key/.pub with --site) into OUT. "
        "Private keys are mode 0600; keep OUT out of git (secrets/ is ignored).")
    create.add_argument("--out", type=Path, default=Path("secrets/federation"), help="folder (default secrets/federation)")
    create.add_argument("--host", action="append", required=True,
                        help="a name or IP address sites use to reach the SuperLink (repeat for several)")
    create.add_argument("--site", action="append", default=[], help="also make a key pair for this site id (repeatable)")
    create.add_argument("--overwrite", action="store_true", help="replace existing files")
    create.set_defaults(handler=_certs_create)

    site = commands.add_parser("site", help="a hospital's site process (a Flower SuperNode)")
    site_commands = site.add_subparsers(dest="site_command", metavar="SITE_COMMAND", required=True)
    run_site = site_commands.add_parser(
        "run", help="join a federation: train on this site's images, which never leave this machine",
        description="Start a Flower SuperNode carrying the mammofl ClientApp for one site. The site's privacy "
        "state (spent epsilon, budget) lives in --state-dir and survives restarts.")
    run_site.add_argument("--site-id", required=True, help="the site's name, as in the ledger and site_budgets")
    run_site.add_argument("--data", type=Path, required=True, help="the site's CBIS-DDSM tree (de-identified)")
    run_site.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's Fleet API")
    run_site.add_argument("--root-certificates", type=Path, help="the federation's CA certificate (TLS)")
    run_site.add_argument("--insecure", action="store_true", help="plaintext gRPC (tests on one machine only)")
    run_site.add_argument("--auth-key", type=Path, help="the site's private key (its public key enrolled at the aggregator)")
    run_site.add_argument("--state-dir", type=Path, help="the site's state folder (default DATA/../<site-id>-state)")
    run_site.add_argument("--budget-epsilon", type=float, required=True,
                          help="the site's own privacy budget: the largest epsilon its images may ever be spent to, "
                               "over every run (a run asking more is refused)")
    run_site.add_argument("--max-delta", type=float, default=1e-5,
                          help="the largest delta a run may ask of this site (default 1e-5)")
    run_site.add_argument("--privacy-unit", choices=("image", "patient"), default="image",
                          help="what the site's budget protects: 'patient' refuses every run with image-level DP "
                               "(default image: both)")
    run_site.add_argument("--allow-non-private", action="store_true",
                          help="also train runs without DP-SGD (their updates are not differentially private)")
    run_site.add_argument("--no-evaluation", action="store_true",
                          help="never send validation metrics (they are computed on held-out patients without DP)")
    run_site.add_argument("--deidentification-secret", type=Path, metavar="SECRET_FILE",
                          help="the secret this site de-identified its images with (`mammofl anonymize "
                          "--secret-file`); the gate checks the images against it when a run's config asks")
    run_site.add_argument("--clientappio-address", default="127.0.0.1:9094",
                          help="local address of the SuperNode's ClientAppIo API (default 127.0.0.1:9094)")
    run_site.set_defaults(handler=_site_run)

    federation = commands.add_parser("federation", help="the aggregator of a deployed federation (Flower SuperLink)")
    federation_commands = federation.add_subparsers(dest="federation_command", metavar="FEDERATION_COMMAND",
                                                    required=True)
    up = federation_commands.add_parser(
        "up", help="start a SuperLink (and, for a local demo, one site process per site folder)",
        description="Start a Flower SuperLink with TLS and SuperNode authentication; runs until Ctrl-C.")
    up.add_argument("--dir", type=Path, default=Path("runs/federation"), help="deployment folder (default runs/federation)")
    up.add_argument("--host", default="127.0.0.1", help="address the SuperLink listens on and is reached at")
    up.add_argument("--fleet-port", type=int, default=9092)
    up.add_argument("--control-port", type=int, default=9093)
    up.add_argument("--serverappio-port", type=int, default=9091)
    up.add_argument("--certs", type=Path, help="folder made by `mammofl certs create` (default: made in DIR/secrets)")
    up.add_argument("--insecure", action="store_true", help="plaintext gRPC (tests on one machine only)")
    up.add_argument("--no-node-auth", action="store_true", help="let any SuperNode join (no enrolment)")
    up.add_argument("--enrol", type=Path, action="append", default=[], metavar="PUBLIC_KEY",
                    help="enrol a site's public key (repeatable)")
    up.add_argument("--local-sites", type=Path, metavar="CONFIG",
                    help="loopback demo: also start one site process per site folder of CONFIG's data")
    up.set_defaults(handler=_federation_up)

    run = federation_commands.add_parser(
        "run", help="submit a federated run to the SuperLink and wait for it",
        description="Submit CONFIG (or resume RUN_DIR) to the deployment's SuperLink; the run writes "
        "runs/<id>/ as a simulation does.")
    run.add_argument("config", type=Path, nargs="?", metavar="CONFIG")
    run.add_argument("--dir", type=Path, default=Path("runs/federation"), help="deployment folder (default runs/federation)")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run after an aggregator restart")
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run (default 3600)")
    run.add_argument("--wait", type=float, default=0.0,
                     help="seconds to wait for `federation up` to be ready (default 0: it must be up)")
    run.set_defaults(handler=_federation_run)

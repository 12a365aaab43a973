"""The ``mammofl`` command line: one entry point, one subcommand per job.

Heavy imports (torch, pydicom...) happen inside the command that needs them, so that
``mammofl --help`` answers at once. Every error mammofl raises on purpose is printed as
one clear message with exit status 2; nothing is printed that came from a patient record.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

from mammofl import __version__

EXIT_USAGE = 2


def _synth(args: argparse.Namespace) -> int:
    from common.data.synthetic_dicom import synthesize_dataset

    summary = synthesize_dataset(
        args.out,
        sites=args.sites,
        per_site=args.per_site,
        size=args.size,
        seed=args.seed,
        test_fraction=args.test_fraction,
        burned_in_text=args.burned_in_text,
        lesion_contrast=args.lesion_contrast,
        progress=sys.stderr.isatty(),
    )
    for site, splits in summary.counts.items():
        print(f"{site}: " + "; ".join(f"{split} {counts}" for split, counts in splits.items()))
    print(f"wrote {summary.out_dir}")
    return 0


def _config_check(args: argparse.Namespace) -> int:
    from common.config import load_config

    for path in args.configs:
        config = load_config(path)
        print(config.model_dump_json(indent=2) if args.show else f"{path}: ok")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from common.config import load_config
    from common.pretraining import FeatureStatistics
    from simulations.pretrain import pretrain_from_config

    config = load_config(args.config)
    result = pretrain_from_config(config, out_path=args.out)
    if isinstance(result, FeatureStatistics):
        print(f"encoder '{config.encoder}' has no learned weights; its feature statistics were measured on "
              f"{result.images} {config.pretraining.source} images: {result.out_path}")
    else:
        print(f"pretrained encoder '{config.encoder}' for {result.epochs} epochs, "
              f"final reconstruction loss {result.final_loss:.5f}: {result.out_path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from common.config import load_config
    from simulations.centralised import train_centralised

    config = load_config(args.config)
    if args.runs_dir is not None:
        config = config.model_copy(update={"tracking": config.tracking.model_copy(update={"runs_dir": args.runs_dir})})
    result = train_centralised(config)
    print(result.run.summary_path.read_text())
    print(f"run directory: {result.run.root}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from common.config import load_config
    from common.errors import ConfigError
    from simulations.federated import simulate

    if (args.config is None) == (args.resume is None):
        raise ConfigError("simulate needs a CONFIG, or --resume RUN_DIR (which carries its own config)")
    config = load_config(args.resume / "config.json" if args.resume else args.config)
    result = simulate(config, resume=args.resume)
    print_run_outputs(result.run.root)
    return 0


def print_run_outputs(run_root: Path) -> None:
    """Where a finished federated run's directory, reports and serving artefacts are."""
    print(f"run directory: {run_root}")
    for title, report in (("privacy", "privacy/report.md"), ("compression", "compression/report.md")):
        if (run_root / report).exists():
            print(f"{title} report: {run_root / report}")
    if (run_root / "serving").is_dir():
        print(f"serving artefacts: {run_root / 'serving'} (mammofl serve loads them)")


def _experiments(args: argparse.Namespace) -> int:
    from simulations.experiments import (
        comparison_table,
        compression_table,
        run_experiments,
        write_comparison,
    )

    rows = run_experiments(args.configs)
    print(comparison_table(rows))
    compressed = compression_table(rows)
    if compressed:
        print("\ncompression (each variant against its run's fp32):\n" + compressed)
    print(f"comparison: {write_comparison(rows, args.runs_dir)}")
    return 1 if any(row.error for row in rows) else 0


def _compress(args: argparse.Namespace) -> int:
    from common.config import load_config
    from server.compression import compress_run, settings_with

    base = load_config(args.run_dir / "config.json").compression
    changes = {key: value for key, value in {
        "variants": tuple(args.variants) if args.variants else None, "sparsity": args.sparsity,
        "channel_sparsity": args.channel_sparsity, "finetune_epochs": args.finetune_epochs,
        "threads": args.threads}.items() if value is not None}
    if args.calibration_folder is not None:
        changes["calibration"] = {**base.calibration.model_dump(), "source": "folder", "folder": args.calibration_folder}
    report = compress_run(args.run_dir, settings_with(base, **changes))
    print(report.markdown_table())
    print(f"report: {args.run_dir / 'compression' / 'report.md'}")
    return 0


def _privacy_report(args: argparse.Namespace) -> int:
    from server.privacy_ledger import PrivacyLedger, write_report

    report = write_report(PrivacyLedger(args.run_dir / "privacy"))
    for site in report["sites"]:
        print(f"{site['site']}: epsilon {site['epsilon']:.4f} (budget {site['budget_epsilon']}, delta {site['delta']})")
    if report["client_level"] is not None:
        client_level = report["client_level"]
        print(f"client level ({client_level['mode']}): epsilon {client_level['epsilon']:.4f}, delta {client_level['delta']}")
    print(f"wrote {args.run_dir / 'privacy' / 'report.md'}")
    return 0


def _privacy_audit(args: argparse.Namespace) -> int:
    from common.config import load_config
    from common.errors import ConfigError
    from simulations.audit import run_audit

    if args.canaries < 10:
        raise ConfigError(f"--canaries {args.canaries}: an audit needs at least 10 canaries (valid: 10 or more; "
                          "a few hundred give a useful bound)")
    if args.out.exists() and any(args.out.iterdir()):
        raise ConfigError(f"--out {args.out} exists and is not empty; an audit writes into a new folder")
    result = run_audit(load_config(args.config), args.out, canaries=args.canaries,
                       images_per_canary=args.images_per_canary, canary_site=args.canary_site,
                       inclusion_seed=args.inclusion_seed)
    report = result.report
    for name, attacker in report["attackers"].items():
        print(f"{name}: epsilon >= {attacker['epsilon_lower_bound']:.3f} ({attacker['correct']}/{attacker['guesses']} "
              f"guesses right, canary AUC {attacker['canary_auc']:.3f})")
    mia = report["membership_inference"]
    print(f"membership inference on ordinary images: AUC {mia['auc']:.3f}, TPR {mia['tpr_at_1pct_fpr']:.3f} at 1% FPR")
    if report["privacy_enabled"] and report["passed"] is None:
        print("audit inconclusive: the canary site trained no private round")
    elif report["privacy_enabled"]:
        print(f"audit {'passed' if report['passed'] else 'FAILED'}: lower bound {report['epsilon_lower_bound']:.3f}, "
              f"accounted epsilon {report['epsilon']}")
    else:
        print(f"no DP: measured leak epsilon >= {report['epsilon_lower_bound']:.3f}")
    print(f"wrote {result.directory / 'audit.md'}")
    return 0 if report["passed"] is not False else 1


def _model_card(args: argparse.Namespace) -> int:
    from server.model_card import read_card, write_model_cards

    for path in write_model_cards(args.run_dir, audit_dir=args.audit):
        checks = read_card(path.parent)["privacy_checks"]
        state = "privacy checks passed" if checks["passed"] else "PRIVACY CHECKS FAILED: " + "; ".join(checks["failures"])
        print(f"{path}: {state}" + "".join(f"\n  warning: {warning}" for warning in checks["warnings"]))
    return 0


def _add_privacy_commands(commands) -> None:
    card = commands.add_parser(
        "model-card", help="(re)write the model card of every serving variant of a run",
        description="Write RUN_DIR/serving/<variant>/model_card.json and .md: sites and image counts, privacy "
        "unit and per-site epsilon, the audit's lower bound (--audit, else RUN_DIR/privacy/audit when present), "
        "utility with intervals, compression changes, provenance. `mammofl compress` writes them too.")
    card.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    card.add_argument("--audit", type=Path, default=None, metavar="AUDIT_DIR",
                      help="a `mammofl privacy audit` output folder to attach")
    card.set_defaults(handler=_model_card)

    privacy = commands.add_parser("privacy", help="privacy: rebuild a run's report, audit a config empirically")
    privacy_commands = privacy.add_subparsers(dest="privacy_command", metavar="PRIVACY_COMMAND", required=True)
    report = privacy_commands.add_parser("report", help="rebuild a run's privacy report from its ledger")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    report.set_defaults(handler=_privacy_report)
    audit = privacy_commands.add_parser(
        "audit", help="measure a lower bound on epsilon: plant canaries, run the configured federation once, attack it",
        description="One-run privacy audit (Steinke, Nasr & Jagielski 2023): canaries planted at one site, each "
        "included with probability 1/2, the configured federation run once, every canary scored by the model "
        "user and by the aggregator; writes OUT/audit.json and OUT/audit.md. Exits 1 when a DP run's lower "
        "bound exceeds its accounted epsilon.")
    audit.add_argument("config", type=Path, metavar="CONFIG")
    audit.add_argument("--out", type=Path, required=True, help="a new folder for the audit (its run, canaries, report)")
    audit.add_argument("--canaries", type=int, default=200, help="number of canaries (default 200)")
    audit.add_argument("--images-per-canary", type=int, default=None,
                       help="images per canary patient (default 1; 3 with privacy.unit 'patient')")
    audit.add_argument("--canary-site", default=None, help="the site that trains on the canaries (default: the first)")
    audit.add_argument("--inclusion-seed", type=int, default=None,
                       help="draw the canaries' inclusion from this seed (default: fresh entropy); for repeatable audits")
    audit.set_defaults(handler=_privacy_audit)


def _anonymize(args: argparse.Namespace) -> int:
    from anonymize.batch import run_anonymize
    from anonymize.profile import DEFAULT_OPTION_NAMES, parse_options
    from anonymize.secret import create_secret
    from common.allocator import keep_freed_memory

    keep_freed_memory()  # this process runs only the batch (common.allocator)
    if args.create_secret:
        create_secret(args.secret_file)
    options = parse_options(args.options if args.options is not None else ",".join(DEFAULT_OPTION_NAMES))
    summary = run_anonymize(
        args.input, args.output, options=options, secret_file=args.secret_file, workers=args.workers,
        progress=sys.stderr.isatty(), layout=args.layout, safe_private_file=args.safe_private,
        vocabulary_file=args.descriptor_vocabulary,
    )
    kinds = ", ".join(f"{count} {kind}" for kind, count in summary.not_dicom.items())
    reasons = ", ".join(f"{reason}: {count}" + (f" [{kinds}; not written, copy them yourself if they carry no PHI]"
                                                 if reason == "not-dicom" and kinds else "")
                        for reason, count in sorted(summary.reasons.items())) or "none"
    print(f"written {summary.written}, quarantined {summary.quarantined} ({reasons}), "
          f"skipped {summary.skipped} (already done), failed {summary.failed}; audit {summary.audit_path}")
    return 1 if summary.failed else 0


def _add_anonymize_command(commands) -> None:
    from anonymize.profile import DEFAULT_OPTION_NAMES, OPTION_HELP
    from anonymize.secret import DEFAULT_SECRET_FILE

    anonymize = commands.add_parser(
        "anonymize",
        help="de-identify DICOM files (PS3.15 Basic Profile + options, burned-in text removal)",
        description="De-identify a DICOM file or folder (recursive) into OUT: every attribute per "
        "PS3.15 Table E.1-1, keyed UIDs, pseudonyms and date shifts, burned-in text blanked; files "
        "that cannot be cleaned with confidence are quarantined. Resumable and idempotent.",
    )
    anonymize.add_argument("input", type=Path, metavar="IN")
    anonymize.add_argument("output", type=Path, metavar="OUT")
    anonymize.add_argument(
        "--options",
        help="comma-separated profile options ('' = Basic Profile only); default "
        + ",".join(DEFAULT_OPTION_NAMES) + ". Valid: " + "; ".join(f"{k} ({v})" for k, v in OPTION_HELP.items()),
    )
    anonymize.add_argument("--secret-file", type=Path, default=DEFAULT_SECRET_FILE,
                           help=f"keyed-hash secret shared by the sites (default {DEFAULT_SECRET_FILE}; never commit it)")
    anonymize.add_argument("--create-secret", action="store_true", help="create the secret file (mode 0600) first")
    anonymize.add_argument("--workers", type=int, help="parallel worker processes (default: all cores)")
    anonymize.add_argument("--layout", choices=("mirror", "uid"), default="mirror",
                           help="output paths: mirror the input tree, or name files by their new UIDs (strict)")
    anonymize.add_argument("--safe-private", type=Path, help="JSON allow-list of safe private attributes")
    anonymize.add_argument("--descriptor-vocabulary", type=Path, metavar="FILE",
                           help="more words that descriptors kept by clean_descriptors/clean_structured_content may "
                                "retain (one word per line, or the JSON format of the shipped list)")
    anonymize.set_defaults(handler=_anonymize)


DEFAULT_KEYRING = Path("secrets/keyring.json")


def _keys_create(args: argparse.Namespace) -> int:
    from api.crypto import create_key

    key_id = create_key(args.keyring)
    print(f"created keyring {args.keyring} with active key {key_id} (file mode 0600; keep it out of git)")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from api.crypto import list_keys

    for info in list_keys(args.keyring):
        print(f"{info.key_id}  created {info.created_at.isoformat()}  {'active' if info.active else 'retired-pending'}")
    return 0


RETIRE_GRACE_S = 3.0
"""How long a retired key's last users get: a running service re-reads the keyring file on its next
use of it, and an upload that took the old key just before finishes within this."""


def _wait_for_old_keys_last_users() -> None:
    time.sleep(RETIRE_GRACE_S)


def _keys_rotate(args: argparse.Namespace) -> int:
    """New active key; with a store named, re-wrap its data keys (images are not re-encrypted).

    Safe while the service runs (it follows the keyring file): with --retire-old the old keys
    leave the file only after every data key is re-wrapped; then, after a grace period, data
    keys that a service wrapped with an old key in the meantime are re-wrapped too, with the
    old keys this process still holds. Nothing is left wrapped by a destroyed key.
    """
    location = _store_location(args)
    if location is None:
        from api.crypto import rotate_key

        print(f"new active key {rotate_key(args.keyring)}")
        print("no store named: existing images keep their old wrapping until `keys rotate` runs with --sqlite/--cassandra")
        return 0
    with _rotated_store(args.keyring, location, retire_old=args.retire_old,
                        allow_unrecoverable=args.allow_unrecoverable):
        pass
    return 0


@contextmanager
def _rotated_store(keyring_path: Path, location, *, retire_old: bool, allow_unrecoverable: bool = False):
    """Rotates to a new key-encryption key, re-wraps the store's data keys, retires the old keys when
    asked, and yields the store (still open, holding the keyring as it was in memory)."""
    from api.crypto import list_keys, load_keyring, retire_key, rotate_key
    from api.store.factory import open_store

    from common.errors import ConfigError

    old_ids = [info.key_id for info in list_keys(keyring_path)]
    with open_store(location, load_keyring(keyring_path), create_schema=False).images as check:
        unknown, total = check.count_unwrappable()
    if unknown and unknown == total and not allow_unrecoverable:
        # Every image is wrapped by keys this file lacks: most likely not the service's keyring.
        # Rotating it would re-wrap nothing and destroy nothing, yet look like a purge.
        raise ConfigError(f"{unknown} image(s) of the {location.describe()} are wrapped by keys that {keyring_path} "
                          f"does not hold: is it the service's keyring? Nothing was changed. If those keys were "
                          f"retired on purpose (their images shredded), pass --allow-unrecoverable")
    if unknown:
        print(f"{unknown} image(s) are wrapped by keys no longer in the keyring (retired: unrecoverable); left as they are")
    new_id = rotate_key(keyring_path)
    print(f"new active key {new_id}")
    store = open_store(location, load_keyring(keyring_path), create_schema=False).images  # new key and old ones
    with store:
        print(f"re-wrapped {store.rewrap_keys()} data key(s) of the {location.describe()} with {new_id}")
        if retire_old:
            for key_id in old_ids:
                retire_key(keyring_path, key_id)
            _wait_for_old_keys_last_users()
            late = store.rewrap_keys()
            print(f"retired {len(old_ids)} old key(s)" + (f"; re-wrapped {late} data key(s) written with an old key "
                                                          "meanwhile" if late else ""))
        yield store


def _keys_retire(args: argparse.Namespace) -> int:
    from api.crypto import retire_key

    retire_key(args.keyring, args.key_id)
    print(f"retired {args.key_id}: data keys still wrapped by it are now unrecoverable")
    return 0


def _store_location(args: argparse.Namespace):
    """The store named by --sqlite or --cassandra (with --keyspace), or None."""
    from api.store.factory import StoreLocation
    from common.errors import ConfigError

    if args.sqlite is not None:
        return StoreLocation("sqlite", sqlite_path=args.sqlite)
    if args.cassandra is not None:
        from api.store.cassandra import CassandraSettings

        host, _, port = args.cassandra.partition(":")
        if not port.isdigit() and port:
            raise ConfigError(f"--cassandra {args.cassandra!r}: the port must be a number, as in 127.0.0.1:9042")
        return StoreLocation("cassandra", cassandra=CassandraSettings(contact_points=(host,), port=int(port or 9042),
                                                                       keyspace=args.keyspace))
    return None


PURGED_TABLES = ("images", "image_chunks", "predictions")


def _store_purge(args: argparse.Namespace) -> int:
    """Makes every deletion so far final, on disk, in every copy the backend keeps.

    A deleted image's wrapped data key may live on where a DELETE cannot reach: in Cassandra's
    SSTables until compaction, its commit log, hints, snapshots, backups, other replicas; in
    a copy of the SQLite file. The purge destroys what every such copy needs: the key-encryption
    key that wrapped it (rotate, re-wrap the live images, retire every old key; the keyring file's
    old contents are overwritten). Then the backend drops the deleted rows themselves: SQLite
    checkpoints its write-ahead log; on Cassandra each --nodetool flushes and garbage-collects
    the store's tables on its node.
    """
    from common.errors import ConfigError

    location = _store_location(args)
    if location.backend == "sqlite" and args.nodetool:
        raise ConfigError("--nodetool applies to a Cassandra store (--cassandra); the SQLite store needs none")
    with _rotated_store(args.keyring, location, retire_old=True, allow_unrecoverable=args.allow_unrecoverable) as store:
        if location.backend == "sqlite":
            store.make_deletions_final()
            print("checkpointed the write-ahead log: deleted rows are zeroed in the database file")
    if location.backend == "cassandra":
        if not args.nodetool:
            print("deleted rows stay in SSTables until compaction (wrapped by destroyed keys: unreadable); pass "
                  "--nodetool once per node to flush and garbage-collect them now")
        for command in args.nodetool:
            _nodetool(shlex.split(command), "flush", location.cassandra.keyspace, *PURGED_TABLES)
            _nodetool(shlex.split(command), "garbagecollect", "--granularity", "CELL", location.cassandra.keyspace,
                      *PURGED_TABLES)
            print(f"flushed and garbage-collected {', '.join(PURGED_TABLES)} via `{command}`")
    return 0


def _nodetool(command: list[str], *arguments: str) -> None:
    from common.errors import MammoflError

    try:
        result = subprocess.run([*command, *arguments], capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise MammoflError(f"nodetool command {shlex.join(command)} could not run: {error}") from None
    if result.returncode != 0:
        raise MammoflError(f"`{shlex.join([*command, *arguments])}` failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()[-800:]}")


def _add_store_target(parser: argparse.ArgumentParser, *, required: bool) -> None:
    target = parser.add_mutually_exclusive_group(required=required)
    target.add_argument("--sqlite", type=Path, help="embedded store database")
    target.add_argument("--cassandra", metavar="HOST[:PORT]", help="Cassandra contact point of the store")
    parser.add_argument("--keyspace", default="mammofl", help="Cassandra keyspace (default mammofl)")
    parser.add_argument("--allow-unrecoverable", action="store_true",
                        help="go on although no image's key is in the keyring (they were all shredded on purpose)")


def _add_keys_commands(commands) -> None:
    keys = commands.add_parser("keys", help="key-encryption keys of the image store: create, rotate, list, retire")
    key_commands = keys.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND", required=True)

    def add(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = key_commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--keyring", type=Path, default=DEFAULT_KEYRING,
                         help=f"keyring file (default {DEFAULT_KEYRING}; never commit it)")
        sub.set_defaults(handler=handler)
        return sub

    add("create", _keys_create, "create a new keyring file with one active key-encryption key")
    add("list", _keys_list, "list the keyring's key ids (never their material)")
    rotate = add("rotate", _keys_rotate, "add a new active key and re-wrap the store's data keys with it")
    _add_store_target(rotate, required=False)
    rotate.add_argument("--retire-old", action="store_true", help="destroy the old keys after re-wrapping")
    retire = add("retire", _keys_retire, "destroy a non-active key (crypto-shreds what it still wraps)")
    retire.add_argument("key_id")

    store = commands.add_parser("store", help="the REST service's image store: make deletions final")
    store_commands = store.add_subparsers(dest="store_command", metavar="STORE_COMMAND", required=True)
    purge_help = ("make every deletion so far final on disk: new key-encryption key, live images re-wrapped, old "
                  "keys destroyed (deleted images' keys become unrecoverable in every copy), deleted rows purged")
    purge = store_commands.add_parser("purge", help=purge_help, description=purge_help)
    _add_store_target(purge, required=True)
    purge.add_argument("--keyring", type=Path, default=DEFAULT_KEYRING, help=f"keyring file (default {DEFAULT_KEYRING})")
    purge.add_argument("--nodetool", action="append", default=[], metavar="COMMAND",
                       help="Cassandra: a nodetool command line for one node (e.g. 'nodetool -h 10.0.0.5'); "
                            "repeat per node; the store's tables are flushed and garbage-collected there")
    purge.set_defaults(handler=_store_purge)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mammofl",
        description="Federated, differentially private mammography classification across hospital sites.",
    )
    parser.add_argument("--version", action="version", version=f"mammofl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = commands.add_parser("data", help="data sets: synthesise mammograms")
    data_commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    synth = data_commands.add_parser(
        "synth",
        help="write a synthetic multi-site mammography set (DICOM + CBIS-DDSM CSVs)",
        description="Write synthetic mammograms as DICOM files with realistic (fake) identifying "
        "metadata, one CBIS-DDSM-layout tree per site, deterministic under --seed.",
    )
    synth.add_argument("--out", type=Path, required=True, help="output folder (created)")
    synth.add_argument("--sites", type=int, default=3, help="number of hospital sites (default 3)")
    synth.add_argument("--per-site", type=int, default=100, help="images per site (default 100)")
    synth.add_argument("--size", type=int, default=256, help="image rows in pixels; columns = 0.8 x rows (default 256)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--test-fraction", type=float, default=0.2, help="share of patients held out for test (default 0.2)")
    synth.add_argument("--burned-in-text", type=float, default=0.3,
                       help="probability that an image carries burned-in text, 0 to disable (default 0.3)")
    synth.add_argument("--lesion-contrast", type=float, default=1.0,
                       help="scale of every lesion's contrast, 0.25-4; 1 is the calibrated default (difficulty knob)")
    synth.set_defaults(handler=_synth)

    config = commands.add_parser("config", help="configuration files: validate")
    config_commands = config.add_subparsers(dest="config_command", metavar="CONFIG_COMMAND", required=True)
    check = config_commands.add_parser("check", help="validate config files; print the resolved config with --show")
    check.add_argument("configs", nargs="+", type=Path, metavar="CONFIG")
    check.add_argument("--show", action="store_true", help="print the resolved configuration with every default")
    check.set_defaults(handler=_config_check)

    pretrain = commands.add_parser(
        "pretrain",
        help="self-supervised autoencoder pretraining of the configured encoder (for scattering: its feature statistics)",
        description="Pretrain the configured encoder as a convolutional autoencoder on the "
        "unlabeled pool (the training split of the configured data, labels ignored).",
    )
    pretrain.add_argument("config", type=Path, metavar="CONFIG")
    pretrain.add_argument("--out", type=Path, default=None,
                          help="encoder weights file (default: the config's model.pretrained)")
    pretrain.set_defaults(handler=_pretrain)

    train = commands.add_parser(
        "train",
        help="centralised baseline: train, validate and test on the pooled data",
        description="Train the configured model on all sites' data pooled; writes runs/<run_id>/.",
    )
    train.add_argument("config", type=Path, metavar="CONFIG")
    train.add_argument("--runs-dir", type=Path, default=None, help="override tracking.runs_dir")
    train.set_defaults(handler=_train)

    simulate = commands.add_parser(
        "simulate",
        help="federated training: every site as a virtual Flower SuperNode in this machine",
        description="Run the config's sites in Flower's simulation engine (DP-SGD per site when "
        "privacy.enabled); writes runs/<run_id>/ with metrics, checkpoints and the privacy report.",
    )
    simulate.add_argument("config", type=Path, nargs="?", metavar="CONFIG")
    simulate.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run")
    simulate.set_defaults(handler=_simulate)

    experiments = commands.add_parser(
        "experiments",
        help="run several configs (files or folders) and print a comparison table",
        description="Validate every config, run each (centralised or federated, per its 'training' "
        "key), then print and write a comparison of their test metrics and privacy cost.",
    )
    experiments.add_argument("configs", nargs="+", type=Path, metavar="CONFIG_OR_DIR")
    experiments.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where the comparison is written")
    experiments.set_defaults(handler=_experiments)

    compress = commands.add_parser(
        "compress",
        help="quantise and prune a run's best model; measure accuracy, size and latency; export serving artefacts",
        description="Build the compression variants of RUN_DIR/model/best.pt (fp16/bf16, ONNX int8 dynamic "
        "and static with server-held calibration images, pruning), measure them on the run's test split "
        "and write RUN_DIR/compression/ and RUN_DIR/serving/<variant>/.",
    )
    compress.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    compress.add_argument("--variants", nargs="+", help="variants to build (fp32 is always the baseline)")
    compress.add_argument("--sparsity", type=float, help="unstructured sparsity, 0-1 exclusive")
    compress.add_argument("--channel-sparsity", type=float, help="structured channel sparsity, 0-1 exclusive")
    compress.add_argument("--finetune-epochs", type=int, help="repair fine-tune epochs on calibration images")
    compress.add_argument("--calibration-folder", type=Path, help="server-held calibration images (never site data)")
    compress.add_argument("--threads", type=int, help="CPU threads for latency measurement")
    compress.set_defaults(handler=_compress)

    report = commands.add_parser("privacy-report", help="rebuild a run's privacy report from its ledger")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    report.set_defaults(handler=_privacy_report)

    _add_privacy_commands(commands)
    _add_anonymize_command(commands)
    _add_keys_commands(commands)
    from mammofl import cli_federation, cli_serve

    cli_serve.add_commands(commands)
    cli_federation.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from common.errors import MammoflError

    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except MammoflError as exc:
        print(f"mammofl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mammofl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

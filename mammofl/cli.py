"""The ``mammofl`` command line: one entry point, one subcommand per job.

Heavy imports (torch, pydicom...) happen inside the command that needs them, so that
``mammofl --help`` answers at once. Every error mammofl raises on purpose is printed as
one clear message with exit status 2; nothing is printed that came from a patient record.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
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
    from simulations.pretrain import pretrain_from_config

    config = load_config(args.config)
    result = pretrain_from_config(config, out_path=args.out)
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
    synth.set_defaults(handler=_synth)

    config = commands.add_parser("config", help="configuration files: validate")
    config_commands = config.add_subparsers(dest="config_command", metavar="CONFIG_COMMAND", required=True)
    check = config_commands.add_parser("check", help="validate config files; print the resolved config with --show")
    check.add_argument("configs", nargs="+", type=Path, metavar="CONFIG")
    check.add_argument("--show", action="store_true", help="print the resolved configuration with every default")
    check.set_defaults(handler=_config_check)

    pretrain = commands.add_parser(
        "pretrain",
        help="self-supervised autoencoder pretraining of the configured encoder",
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

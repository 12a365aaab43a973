"""The model card that travels with every served model: ``serving/<variant>/model_card.json`` and ``.md``.

What a data protection officer signs off, in one place: who trained the model on how many
images, under which privacy unit and (epsilon, delta) per site (and client-level epsilon),
what an empirical audit measured (when one was run and for which config), what the model
is worth on held-out data (with 95% bootstrap intervals), what the compression variant
changed against fp32, where the starting weights came from, and which data and code made
it. ``privacy_checks`` says whether the model may be served: `mammofl serve` refuses a
variant without a card, or one whose checks failed, unless told otherwise.

Failed checks: a DP run's site exceeded its budget, a DP run has no ledger, an audit's lower
bound exceeds the accounted epsilon. Warnings (served, and shown): no DP, no audit, an audit
of a different config, a model that predicts one class.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.config import ExperimentConfig, load_config, training_digest
from common.errors import ModelError
from common.metrics import unusable_because
from common.runs import json_safe
from mammofl import __version__

CARD_JSON, CARD_MD = "model_card.json", "model_card.md"
CARD_VERSION = 1
AUDIT_FILE = "audit.json"
REPOSITORY = Path(__file__).resolve().parent.parent


def code_version() -> dict[str, Any]:
    """The package version and, from a git checkout, its commit and whether it had local changes."""
    version: dict[str, Any] = {"mammofl": __version__, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(["git", "-C", str(REPOSITORY), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(REPOSITORY), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
        version |= {"git_commit": commit, "git_dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        pass  # an installed package without its repository: the version alone
    return version


def data_version(config: ExperimentConfig) -> dict[str, Any]:
    """What the aggregator knows of the data: its source and a digest of the files it can list."""
    from common.data.pipeline import load_records

    data = config.data
    records = load_records(data)
    digest = hashlib.sha256()
    for record in sorted(records, key=lambda r: str(r.image_path)):
        path = Path(record.image_path)
        size = path.stat().st_size if path.exists() else -1
        digest.update(f"{path.relative_to(data.root) if path.is_relative_to(data.root) else path.name}:{size}:"
                      f"{record.label}:{record.split}\n".encode())
    return {"source": data.source, "root": str(data.root), "images": len(records),
            "test_images": sum(record.split == "test" for record in records), "files_sha256": digest.hexdigest(),
            "synthetic": data.synthetic.model_dump() if data.source == "synthetic" else None}


def _privacy_section(run_dir: Path, config: ExperimentConfig) -> tuple[dict[str, Any], list[str]]:
    from server.privacy_ledger import PrivacyLedger, build_report

    ledger = PrivacyLedger(run_dir / "privacy")
    failures: list[str] = []
    section: dict[str, Any] = {"enabled": config.privacy.enabled, "unit": config.privacy.unit,
                               "accountant": config.privacy.accountant if config.privacy.enabled else None,
                               "sites": [], "client_level": None, "all_within_budget": None}
    if not ledger.path.exists():
        if config.privacy.enabled:
            failures.append("the run was configured with DP but has no privacy ledger: its epsilon is unknown")
        return section, failures
    report = build_report(ledger)
    section["sites"] = [{key: site[key] for key in ("site", "images", "epsilon", "delta", "budget_epsilon",
                                                   "within_budget", "unit", "rounds_trained")}
                        for site in report["sites"]]
    section["client_level"] = report["client_level"]
    section["all_within_budget"] = report["all_within_budget"]
    section["pretrained"] = report["pretrained"]
    if config.privacy.enabled and not report["all_within_budget"]:
        over = [site["site"] for site in report["sites"] if not site["within_budget"]]
        failures.append(f"site(s) {', '.join(over)} exceeded their privacy budget")
    return section, failures


def _audit_section(audit_dir: Path | None, config: ExperimentConfig) -> tuple[dict[str, Any] | None, list[str], list[str]]:
    if audit_dir is None or not (audit_dir / AUDIT_FILE).is_file():
        return None, [], ["no empirical privacy audit was run for this model (mammofl privacy audit)"]
    audit = json.loads((audit_dir / AUDIT_FILE).read_text())
    same = audit.get("config_digest") == training_digest(config)
    section = {"directory": Path(audit_dir).name, "epsilon_lower_bound": audit["epsilon_lower_bound"],
               "epsilon": audit["epsilon"], "passed": audit["passed"], "canaries": audit["canaries"],
               "unit": audit["unit"], "membership_inference": audit["membership_inference"],
               "same_config": same,
               "attackers": {name: attacker["epsilon_lower_bound"] for name, attacker in audit["attackers"].items()}}
    failures, warnings = [], []
    if audit["passed"] is False:
        failures.append(f"the privacy audit's lower bound {audit['epsilon_lower_bound']:.3f} exceeds the accounted "
                        f"epsilon {audit['epsilon']}: the DP guarantee does not hold as claimed")
    if audit["passed"] is None and audit.get("privacy_enabled"):
        warnings.append("the privacy audit was inconclusive (its canary site trained no private round)")
    if not same:
        warnings.append("the audit ran a config that differs from this model's training config "
                        "(its training digest does not match)")
    return section, failures, warnings


def build_card(run_dir: Path, variant: str, *, audit_dir: Path | None = None,
               intervals: dict[str, tuple[float, float]] | None = None) -> dict[str, Any]:
    """The card of `variant` of the run in `run_dir` (its serving folder must exist)."""
    from common.models.classifier import load_checkpoint
    from server.compression.report import read_report
    from server.compression.serving import read_metadata

    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.json")
    variant_dir = run_dir / "serving" / variant
    metadata = read_metadata(variant_dir)
    _, extra = load_checkpoint(run_dir / metadata.source_run.checkpoint)
    checkpoint_metrics = extra.get("metrics", {})
    test = {key.removeprefix("test_"): value for key, value in checkpoint_metrics.items() if key.startswith("test_")}
    privacy, failures = _privacy_section(run_dir, config)
    audit, audit_failures, warnings = _audit_section(audit_dir, config)
    failures += audit_failures
    if not config.privacy.enabled:
        warnings.insert(0, "trained without DP-SGD: no sample-level privacy guarantee")
    report = read_report(run_dir)
    compression = None
    if report is not None:
        result = next((r for r in report.variants if r.variant == variant), None)
        if result is not None:
            compression = {"description": result.description, "metrics": result.metrics, "change_vs_fp32": result.change,
                           "agreement_with_fp32": result.agreement_with_fp32, "size_ratio": result.size_ratio,
                           "speedup": result.speedup, "file_bytes": result.file_bytes}
    variant_metrics = dict(metadata.metrics)
    failure = unusable_because(variant_metrics) or unusable_because(test)
    if failure:
        warnings.append(f"the model {failure}")
    return json_safe({
        "format_version": CARD_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"variant": variant, "backend": metadata.backend, "precision": metadata.precision,
                  "pruning": metadata.pruning, "sha256": metadata.sha256, "class_names": list(metadata.class_names),
                  "input_size": metadata.preprocessing.image_size, "encoder": config.encoder},
        "training": {"run_id": run_dir.name, "config_name": config.name, "training_digest": training_digest(config),
                     "training": config.training, "strategy": config.federation.strategy,
                     "rounds": config.federation.rounds, "local_epochs": config.federation.local_epochs,
                     "checkpoint": metadata.source_run.checkpoint, "checkpoint_round": extra.get("round"),
                     "sites": [{"site": site["site"], "images": site["images"]} for site in privacy["sites"]]},
        "privacy": privacy,
        "audit": audit,
        "utility": {"test_images": report.test_images if report is not None else None,
                    "metrics": variant_metrics, "intervals_95": intervals,
                    "checkpoint_test_metrics": test, "unusable_because": failure},
        "compression": compression,
        "pretraining": privacy.get("pretrained"),
        "data": data_version(config),
        "code": code_version(),
        "privacy_checks": {"passed": not failures, "failures": failures, "warnings": warnings},
    })


def summary(card: dict[str, Any]) -> dict[str, Any]:
    """What ``GET /v1/models`` shows of a card."""
    sites = card["privacy"]["sites"]
    epsilons = [site["epsilon"] for site in sites if site.get("epsilon") is not None]
    audit = card.get("audit") or {}
    return {"run_id": card["training"]["run_id"], "privacy_enabled": card["privacy"]["enabled"],
            "privacy_unit": card["privacy"]["unit"], "max_site_epsilon": max(epsilons) if epsilons else None,
            "delta": next((site["delta"] for site in sites if site.get("delta") is not None), None),
            "audit_epsilon_lower_bound": audit.get("epsilon_lower_bound"),
            "membership_inference_auc": (audit.get("membership_inference") or {}).get("auc"),
            "privacy_checks_passed": card["privacy_checks"]["passed"],
            "warnings": card["privacy_checks"]["warnings"]}


def write_card(variant_dir: Path, card: dict[str, Any]) -> Path:
    variant_dir = Path(variant_dir)
    (variant_dir / CARD_JSON).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    (variant_dir / CARD_MD).write_text(card_markdown(card))
    return variant_dir / CARD_JSON


def read_card(variant_dir: Path) -> dict[str, Any]:
    path = Path(variant_dir) / CARD_JSON
    if not path.is_file():
        raise ModelError(f"{variant_dir}: no {CARD_JSON}; write one with `mammofl model-card RUN_DIR`")
    try:
        card = json.loads(path.read_text())
        if card.get("format_version") != CARD_VERSION or "privacy_checks" not in card:
            raise ValueError(f"format_version {card.get('format_version')!r} (valid: {CARD_VERSION})")
        bool(card["privacy_checks"]["passed"])
    except (ValueError, KeyError, TypeError) as error:
        raise ModelError(f"{path}: not a valid model card ({error})") from None
    return card


def write_model_cards(run_dir: Path, *, audit_dir: Path | None = None,
                      intervals: dict[str, dict[str, tuple[float, float]]] | None = None) -> list[Path]:
    """A card for every variant under ``run_dir/serving``. Intervals not given are kept from the
    existing card; the audit defaults to ``run_dir/privacy/audit`` when it exists."""
    run_dir = Path(run_dir)
    if audit_dir is None and (run_dir / "privacy" / "audit" / AUDIT_FILE).is_file():
        audit_dir = run_dir / "privacy" / "audit"
    if audit_dir is not None and not (Path(audit_dir) / AUDIT_FILE).is_file():
        raise ModelError(f"--audit {audit_dir}: no {AUDIT_FILE} there (write one with `mammofl privacy audit`)")
    written = []
    for variant_dir in sorted(path.parent for path in (run_dir / "serving").glob("*/metadata.json")):
        kept = None
        if intervals is None and (variant_dir / CARD_JSON).is_file():
            kept = json.loads((variant_dir / CARD_JSON).read_text()).get("utility", {}).get("intervals_95")
        chosen = (intervals or {}).get(variant_dir.name, kept)
        written.append(write_card(variant_dir, build_card(run_dir, variant_dir.name, audit_dir=audit_dir,
                                                          intervals=chosen)))
    if not written:
        raise ModelError(f"{run_dir}: no serving variants (run `mammofl compress {run_dir}` first)")
    return written


def card_markdown(card: dict[str, Any]) -> str:
    model, training, privacy, utility = card["model"], card["training"], card["privacy"], card["utility"]
    checks = card["privacy_checks"]
    lines = [f"# Model card: {model['variant']} of run {training['run_id']}", "",
             ("**Privacy checks passed.**" if checks["passed"] else
              "**PRIVACY CHECKS FAILED: not to be served.** " + " ".join(checks["failures"])), ""]
    lines += [f"- Warning: {warning}" for warning in checks["warnings"]]
    lines += ["", "## Training", "",
              f"{training['training']} training, {training['strategy']}, {training['rounds']} rounds of "
              f"{training['local_epochs']} local epochs; served checkpoint {training['checkpoint']} "
              f"(round {training['checkpoint_round']}); training digest `{training['training_digest'][:12]}`.", "",
              "| site | training images (as reported) | epsilon | delta | budget | within |", "|---|---|---|---|---|---|"]
    for site in privacy["sites"]:
        lines.append(f"| {site['site']} | {_n(site['images'])} | {_n(site['epsilon'])} | {_n(site['delta'])} "
                     f"| {_n(site['budget_epsilon'])} | {'yes' if site['within_budget'] else '**NO**'} |")
    unit = "one patient with all of their images" if privacy["unit"] == "patient" else "one image"
    lines += ["", "## Privacy", "",
              (f"DP-SGD at every site, unit of privacy: {unit} ({privacy['accountant']} accountant)."
               if privacy["enabled"] else "**No DP**: trained without DP-SGD.")]
    if privacy["client_level"]:
        level = privacy["client_level"]
        lines.append(f"Client-level DP ({level['mode']}): epsilon {_n(level['epsilon'])}, delta {_n(level['delta'])}.")
    audit = card["audit"]
    if audit:
        mia = audit["membership_inference"]
        lines += ["", f"Empirical audit ({audit['canaries']} canaries, unit {audit['unit']}"
                  f"{'' if audit['same_config'] else ', OF A DIFFERENT CONFIG'}): epsilon lower bound "
                  f"{_n(audit['epsilon_lower_bound'])} against accounted {_n(audit['epsilon'])}; membership "
                  f"inference AUC {_n(mia['auc'])}, TPR {_n(mia['tpr_at_1pct_fpr'])} at 1% FPR."]
    else:
        lines += ["", "No empirical audit was run."]
    lines += ["", "## Utility (held-out test split)", ""]
    intervals = utility["intervals_95"] or {}
    for name in ("accuracy", "balanced_accuracy", "macro_auc", "presence_auc", "predicted_classes"):
        if name in utility["metrics"]:
            interval = intervals.get(name)
            lines.append(f"- {name}: {_n(utility['metrics'][name])}"
                         + (f" (95% bootstrap interval {_n(interval[0])}-{_n(interval[1])})" if interval else ""))
    if utility["unusable_because"]:
        lines.append(f"- **FAILED: the model {utility['unusable_because']}.**")
    if card["compression"]:
        compression = card["compression"]
        lines += ["", "## Compression", "", f"{compression['description']}: agreement with fp32 "
                  f"{_n(compression['agreement_with_fp32'])}, size ratio {_n(compression['size_ratio'])}x, "
                  f"speed-up {_n(compression['speedup'])}x; change against fp32: "
                  + ", ".join(f"{key} {_n(value)}" for key, value in compression["change_vs_fp32"].items()
                              if key in ("accuracy", "macro_auc", "balanced_accuracy"))]
    pretraining = card["pretraining"]
    lines += ["", "## Provenance", "",
              f"- Starting weights: {pretraining['source'] + ' (' + pretraining['sha256'][:12] + ')' if pretraining else 'random initialisation'}",
              f"- Data: {card['data']['source']} at {card['data']['root']}, {card['data']['images']} images, "
              f"files sha256 {card['data']['files_sha256'][:12]}",
              f"- Code: mammofl {card['code']['mammofl']}, commit {card['code']['git_commit'] or 'unknown'}"
              + (" (with local changes)" if card["code"]["git_dirty"] else ""), ""]
    return "\n".join(lines)


def _n(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

"""The privacy ledger of a run and the report a privacy officer signs off.

``runs/<id>/privacy/ledger.jsonl`` holds one line per site per round, as the site reported
it: status (trained / refused / failed), steps, sample rate, noise multiplier, clipping
norm, cumulative epsilon at delta, the site's budget and the accountant. The report
(``report.json``, ``report.md``, ``epsilon.png``) is derived from the ledger alone, so
``mammofl privacy-report RUN_DIR`` can always rebuild it. Beside the ledger: ``client_level.jsonl``
(a row per round in which the aggregator noised the mean under client-level DP) and
``pretrained.json`` (the provenance of the weights the run started from).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clients.privacy import epsilon_of
from common.errors import MammoflError
from common.metrics import unusable_because
from common.runs import RunDirectory, append_json_line, json_safe, read_json_lines

if TYPE_CHECKING:
    from common.models.transfer import Provenance

PATIENT_IMAGES = 4  # a screening exam: CC and MLO of both breasts

# Everything a site sends the aggregator, and what covers it.
RELEASES = {
    "model update": "DP-SGD (per-image clipping, Gaussian noise, Poisson sampling), accounted in epsilon below",
    "number of training images": "not protected (the aggregate's weight); the sample rate and steps reveal it too, "
                                 "also under SecAgg+",
    "privacy row": "accounting metadata fixed by the image count and the config: status, steps, sample rate, noise "
                   "multiplier, clipping norm, epsilon, delta, budget, whose bound applied, a refusal's reason",
    "validation metrics": "not protected by DP: loss and metrics on the site's held-out patients, never its training "
                          "images (federation.fraction_evaluate 0 keeps them home)",
}
NOT_RELEASED = "the training loss and any other noise-free statistic of the training images"
RANDOMNESS = (
    "Noise and Poisson sampling are drawn at the site from generators seeded with 64 bits of fresh "
    "operating-system entropy every round, never from the config seed and never stored: the aggregator "
    "cannot predict, repeat or cancel them. Residual risks: torch's generators are not cryptographic "
    "(Mersenne Twister on the CPU, Philox on CUDA; Opacus' secure_mode needs torchcsprng, which no longer "
    "builds with current torch), and floating-point Gaussian samplers leak through their least significant "
    "bits (Mironov 2012), which the released values, averaged and rounded, make hard but not impossible to "
    "exploit."
)


class LedgerError(MammoflError):
    """A run directory has no privacy ledger, or an unreadable one."""


@dataclass(frozen=True)
class PrivacyLedger:
    directory: Path

    @property
    def path(self) -> Path:
        return self.directory / "ledger.jsonl"

    def append(self, row: dict[str, Any]) -> None:
        append_json_line(self.path, row)

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            raise LedgerError(f"{self.path}: no privacy ledger (was the run made with privacy.enabled?)")
        try:
            return read_json_lines(self.path)
        except json.JSONDecodeError as exc:
            raise LedgerError(f"{self.path}: line {exc.lineno} is not valid JSON") from None

    def last_round(self) -> int:
        return max((row["round"] for row in self.rows()), default=0) if self.path.exists() else 0

    @property
    def client_level_path(self) -> Path:
        return self.directory / "client_level.jsonl"

    def append_client_level(self, row: dict[str, Any]) -> None:
        append_json_line(self.client_level_path, row)

    def client_level_rows(self) -> list[dict[str, Any]]:
        return read_json_lines(self.client_level_path)

    def record_pretrained(self, provenance: Provenance) -> None:
        """The provenance (`common.models.transfer.Provenance`) of the weights the run started from."""
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "pretrained.json").write_text(json.dumps(provenance.as_dict(), indent=2) + "\n")

    def pretrained(self) -> dict[str, Any] | None:
        path = self.directory / "pretrained.json"
        return json.loads(path.read_text()) if path.exists() else None


def client_level_summary(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Client-level (epsilon, delta) of the noised rounds, by RDP with no amplification by sampling.

    The aggregator chooses which sites a round samples, so no subsampling is claimed (sample
    rate 1): each noised round is a Gaussian mechanism of multiplier z on a mean whose
    sensitivity to one site is C / m, the noise sigma = z C / m. The guarantee is about whole
    sites and holds against whoever sees the global model, not against the aggregator, who
    adds the noise itself.
    """
    if not rows:
        return None
    noise, delta = rows[-1]["noise_multiplier"], rows[-1]["delta"]
    history = [(row["noise_multiplier"], 1.0, 1) for row in rows]
    return {
        "mode": rows[-1]["mode"], "rounds": [row["round"] for row in rows], "noise_multiplier": noise,
        "clipping_norm": rows[-1]["clipping_norm"], "delta": delta,
        "epsilon": epsilon_of(history, accountant="rdp", delta=delta) if noise > 0 else math.inf,
        "sampled": [row["sampled"] for row in rows], "aggregated": [row["aggregated"] for row in rows],
    }


def group_privacy(epsilon: float, delta: float, group_size: int) -> tuple[float, float]:
    """(epsilon, delta) for a group of `group_size` records: (k eps, k e^((k-1) eps) delta)."""
    k = group_size
    return k * epsilon, k * math.exp((k - 1) * epsilon) * delta


def site_summaries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per site: the final epsilon, its budget and how each round went."""
    by_site: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_site.setdefault(row["site"], []).append(row)
    summaries = []
    for site, site_rows in sorted(by_site.items()):
        trained = [row for row in site_rows if row["status"] == "trained"]
        private = [row for row in trained if "epsilon" in row]
        last = private[-1] if private else None
        # A site that trained without DP-SGD (client-level DP alone) has no sample-level bound.
        epsilon = last["epsilon"] if last else (math.inf if trained else 0.0)
        delta = last["delta"] if last else None
        budget = next((row.get("budget_epsilon") for row in reversed(site_rows) if row.get("budget_epsilon")), None)
        bound = next((row.get("budget_bound") for row in reversed(site_rows) if row.get("budget_bound")), None)
        unit = last.get("unit", "image") if last else None
        # Patient-level DP protects whole patients already; group privacy bounds them at image level.
        patient = group_privacy(epsilon, delta, PATIENT_IMAGES) if last and unit == "image" else None
        summaries.append({
            "site": site,
            "unit": unit,
            "epsilon": epsilon,
            "delta": delta,
            "budget_epsilon": budget,
            "budget_bound": bound,
            "within_budget": budget is None or epsilon <= budget,
            "accountant": last["accountant"] if last else None,
            "noise_multiplier": last["noise_multiplier"] if last else None,
            "sample_rate": last["sample_rate"] if last else None,
            "max_grad_norm": last["max_grad_norm"] if last else None,
            "steps": sum(row.get("steps", 0) for row in trained),
            "images": next((row["images"] for row in reversed(trained) if "images" in row), None),
            "rounds_trained": [row["round"] for row in trained],
            "rounds_refused": [row["round"] for row in site_rows if row["status"] == "refused"],
            "rounds_failed": [row["round"] for row in site_rows if row["status"] == "failed"],
            "patient_epsilon": patient[0] if patient else None,
            "patient_delta": patient[1] if patient else None,
        })
    return summaries


PATIENT_GUARANTEE = (
    "Each site trains with patient-level DP-SGD (privacy.unit 'patient'): Opacus Poisson-samples "
    "patients, the sum of one patient's per-image gradients is clipped to the clipping norm, Gaussian "
    "noise is added, and the accountant counts patients (sample rate = patients per batch over the "
    "site's patients). Every step the site ever took on its data is accounted, in this run and, where its "
    "privacy state outlives a run, earlier ones. For site s with final (epsilon_s, delta): everything site "
    "s released -- all of its model updates -- is (epsilon_s, delta)-differentially private with respect "
    "to adding or removing any one patient of site s with all of their images. It does not depend on "
    "the aggregator being honest: the site clips, samples and adds its noise from its own secret randomness "
    "before anything leaves it. Not covered: the number of training images a site reports, and the "
    "federated-evaluation metrics computed on a site's held-out validation patients (set "
    "federation.fraction_evaluate to 0 where those must not leave the site)."
)

GUARANTEE = (
    "Each site trains with DP-SGD (Opacus: per-image gradient clipping to the clipping norm, "
    "Gaussian noise, Poisson sampling) and accounts every step it ever took on its data: in this "
    "run and, where its privacy state outlives a run (a deployed site's state folder), in earlier "
    "runs too; the steps and rounds below are this run's. For site s with final (epsilon_s, "
    "delta): everything site s released -- all of its model updates -- is (epsilon_s, "
    "delta)-differentially private with respect to adding or "
    "removing any one training image of site s. This is sample-level DP at the site; it does not "
    "depend on the aggregator being honest: the site clips, samples and adds its noise from its own "
    "secret randomness before anything leaves it, and sends nothing else computed from its training "
    "images but their number. One patient usually contributes several images "
    f"(a screening exam has {PATIENT_IMAGES}); by group privacy a patient with k images is protected at "
    "(k epsilon, k e^((k-1) epsilon) delta), shown below for k = "
    f"{PATIENT_IMAGES}. Not covered: the number of training images a site reports, and the "
    "federated-evaluation metrics computed on a site's held-out validation patients (set "
    "federation.fraction_evaluate to 0 where those must not leave the site)."
)


def build_report(ledger: PrivacyLedger) -> dict[str, Any]:
    rows = ledger.rows()
    sites = site_summaries(rows)
    per_patient = any(site["unit"] == "patient" for site in sites)
    return {
        "guarantee": PATIENT_GUARANTEE if per_patient else GUARANTEE,
        "unit": ("one patient with all of their images (add/remove adjacency) per site" if per_patient
                 else "one training image (add/remove adjacency) per site"),
        "privacy_unit": "patient" if per_patient else "image",
        "releases": RELEASES,
        "not_released": NOT_RELEASED,
        "randomness": RANDOMNESS,
        "pretrained": ledger.pretrained(),
        "sites": sites,
        "all_within_budget": all(site["within_budget"] for site in sites),
        "client_level": client_level_summary(ledger.client_level_rows()),
        "model": model_summary(ledger),
        "rounds": max((row["round"] for row in rows), default=0),
    }


def model_summary(ledger: PrivacyLedger) -> dict[str, Any] | None:
    """What the privacy bought: the last round's test metrics (the run's metrics.jsonl) and a plain verdict."""
    rounds = [row for row in RunDirectory(ledger.directory.parent).read_metrics() if "round" in row]
    if not rounds:
        return None
    last = rounds[-1]
    test = {key.removeprefix("test_"): value for key, value in last.items() if key.startswith("test_")}
    return {"round": last["round"], "test": test, "unusable_because": unusable_because(last, prefix="test_")}


def write_report(ledger: PrivacyLedger) -> dict[str, Any]:
    """Write report.json, report.md and epsilon.png next to the ledger; returns the report."""
    report = build_report(ledger)
    (ledger.directory / "report.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
    (ledger.directory / "report.md").write_text(_markdown(report))
    _plot(ledger.rows(), report, ledger.directory / "epsilon.png")
    return report


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Privacy report",
        "",
        "## Guarantee",
        "",
        report["guarantee"],
        "",
        f"Unit of privacy: {report['unit']}.",
        "",
        "## Per site",
        "",
        "| site | epsilon | delta | budget | bound by | within | accountant | noise | sample rate | clip | steps | "
        f"rounds trained | refused | failed | patient ({PATIENT_IMAGES} images) epsilon, delta |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for site in report["sites"]:
        patient = _patient_cell(site)
        lines.append(
            f"| {site['site']} | {site['epsilon']:.4f} | {_number(site['delta'])} | {_number(site['budget_epsilon'])} "
            f"| {site['budget_bound'] or '-'} | {'yes' if site['within_budget'] else '**NO**'} | {site['accountant'] or '-'} "
            f"| {_number(site['noise_multiplier'])} | {_number(site['sample_rate'])} | {_number(site['max_grad_norm'])} "
            f"| {site['steps']} | {_rounds(site['rounds_trained'])} | {_rounds(site['rounds_refused'])} "
            f"| {_rounds(site['rounds_failed'])} | {patient} |"
        )
    verdict = "every site stayed within its budget" if report["all_within_budget"] else "A SITE EXCEEDED ITS BUDGET"
    if any(math.isinf(site["epsilon"]) for site in report["sites"]):
        verdict += "; sites with epsilon inf trained without DP-SGD: no sample-level guarantee"
    lines += ["", f"Over {report['rounds']} round(s): {verdict}.", "", "![epsilon per round](epsilon.png)", ""]
    lines += ["## What each site releases", "", "| release | covered by |", "|---|---|"]
    lines += [f"| {release} | {cover} |" for release, cover in report["releases"].items()]
    lines += ["", f"Not released: {report['not_released']}.", "", "## Randomness", "", report["randomness"], ""]
    lines += _client_level_lines(report["client_level"]) + _pretrained_lines(report["pretrained"])
    lines += _model_lines(report["model"])
    return "\n".join(lines)


def _model_lines(model: dict[str, Any] | None) -> list[str]:
    if model is None:
        return []
    test = model["test"]
    lines = ["## What the model is worth", "",
             f"After round {model['round']}: test macro AUC {_number(test.get('macro_auc'))}, balanced accuracy "
             f"{_number(test.get('balanced_accuracy'))}, presence AUC {_number(test.get('presence_auc'))} "
             "(chance: 0.5, 0.333, 0.5).", ""]
    if model["unusable_because"]:
        lines += [f"**FAILED: the model {model['unusable_because']}.** Its privacy cost bought nothing usable.", ""]
    return lines


def _client_level_lines(summary: dict[str, Any] | None) -> list[str]:
    if summary is None:
        return []
    return [
        "## Client-level DP (whole sites)", "",
        f"Mode {summary['mode']}, noise multiplier {summary['noise_multiplier']:g}, clipping norm "
        f"{summary['clipping_norm']:g}, {len(summary['rounds'])} noised round(s): every site's participation "
        f"is ({summary['epsilon']:.4f}, {summary['delta']:g})-DP (RDP, no amplification by sampling claimed: "
        "the aggregator picks the sites). Each round's mean is over every sampled site (a refused or failed "
        "site counts as a zero update). The aggregator adds this noise, so it protects sites against "
        "whoever sees the global model, not against the aggregator.", "",
    ]


def _pretrained_lines(pretrained: dict[str, Any] | None) -> list[str]:
    if pretrained is None:
        return ["## Starting weights", "", "None: the model started from a random initialisation.", ""]
    return ["## Starting weights", "",
            f"`{pretrained['path']}` (sha256 {pretrained['sha256']}): learned from {pretrained['source']}"
            + (f" ({pretrained['detail']})" if pretrained["detail"] else "") + ".", ""]


def _patient_cell(site: dict[str, Any]) -> str:
    if site.get("unit") == "patient":
        return "the epsilon itself (patient-level DP)"
    if site["patient_epsilon"] is None:
        return "-"
    if site["patient_delta"] >= 1:
        return f"vacuous (delta {site['patient_delta']:.1e} >= 1: needs a smaller epsilon)"
    return f"{site['patient_epsilon']:.3f}, {site['patient_delta']:.2e}"


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


def _rounds(rounds: list[int]) -> str:
    return ", ".join(map(str, rounds)) or "-"


def _plot(rows: list[dict[str, Any]], report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for index, site in enumerate(report["sites"]):
        trained = [row for row in rows if row["site"] == site["site"] and row["status"] == "trained" and "epsilon" in row]
        color = f"C{index}"
        axes.plot([row["round"] for row in trained], [row["epsilon"] for row in trained], "o-",
                  color=color, label=site["site"])
        if site["budget_epsilon"]:
            axes.axhline(site["budget_epsilon"], color=color, linestyle="--", linewidth=1)
    axes.set_xlabel("round")
    axes.set_ylabel("cumulative epsilon (dashed: budget)")
    axes.set_title("Sample-level epsilon per site")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

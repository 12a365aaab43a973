"""``mammofl privacy audit CONFIG --out DIR``: measure the privacy of the configured federation.

The accountant proves an upper bound on epsilon; this audit measures a lower one, by attack,
so that a bug in the DP machinery (noise that is not there, a release outside the
accountant, clipping that does not clip) shows up as a lower bound above the claimed
epsilon. One-run auditing (Steinke, Nasr & Jagielski 2023, `common.privacy_audit`):

1. **Canaries.** m synthetic mammograms made to be memorised: each carries a rare pattern
   (an amplitude-modulated grating in the breast, its orientations and scales its own) and a
   wrong label. With ``privacy.unit`` "patient" a canary is a patient with several such images
   sharing its label. Each canary is included at one site (the canary site) with probability
   1/2, from fresh operating-system entropy unless an inclusion seed is given.
2. **The configured run, once**: same model, recipe, rounds and sites; the canary site also
   trains on its included canaries (``DIR/run/``). Its privacy ledger accounts them like any
   other training image.
3. **Two attackers score every canary.** The *model user* sees the released model only: the
   canary's loss under its (wrong) label, low when memorised. The *aggregator* sees every
   update the canary site sent (with SecAgg+ only each round's aggregate, which is all it
   then sees): per round, the canary gradients at that round's global model (clipped as the
   site clips) are regressed jointly onto the update; a canary's coefficient, standardised
   and summed over rounds, is its score.
4. **Bounds.** Each attacker's guesses give an epsilon lower bound at 95% confidence; the
   audit's ``epsilon_lower_bound`` is the larger. For a DP run it must not exceed the run's
   accounted epsilon (``passed``); without DP there is no claim to check and the bound
   measures the leak.

A loss-threshold membership-inference attack on ordinary images (training against
held-out test images) gives AUC and TPR at 1% FPR for the released model.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from PIL import Image
from torch import nn
from torch.nn import functional as F

from common.config import ExperimentConfig, training_digest
from common.data.dataset import MammogramDataset
from common.data.features import evaluation_input
from common.data.partition import split_train_val
from common.data.pipeline import load_records, site_partitions
from common.data.records import CLASS_NAMES, ImageRecord
from common.data.synthetic import synthesize_image
from common.errors import ConfigError
from common.models.classifier import build_classifier, load_checkpoint
from common.models.configured import freeze_schedule_from_config
from common.privacy_audit import AuditBound, MembershipInference, audit_bound, membership_inference
from common.runs import json_safe

AUDIT_VERSION = 1
CANARY_SEED = 0xCA9A
CANARY_SIZE = 256  # pixels of the rendered canary mammogram (the pipeline resizes it like any image)
MIA_LIMIT = 1000  # members and non-members scored at most, each
CONFIDENCE = 0.95
# Under training the regression is solved with this ridge on normalised gradients.
_RIDGE = 1e-3


@dataclass(frozen=True)
class Canary:
    """One canary: a patient of `len(images)` images, all labelled `label` (not what they show)."""

    canary_id: str
    label: int
    images: tuple[Path, ...]
    included: bool

    def records(self, site_id: str) -> list[ImageRecord]:
        return [ImageRecord(image_path=path, label=self.label, split="train", patient_id=self.canary_id,
                            laterality="L", view=("CC", "MLO")[index % 2], site_id=site_id)
                for index, path in enumerate(self.images)]


def inclusion_bits(count: int, seed: int | None) -> list[bool]:
    """Each canary in with probability 1/2: fresh entropy, or a seed chosen before the run."""
    if seed is None:
        source = secrets.SystemRandom()
        return [source.random() < 0.5 for _ in range(count)]
    return [bool(bit) for bit in np.random.default_rng([seed, 0x1C]).integers(0, 2, count)]


def canary_pixels(index: int, image: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One canary image in [0, 1] and the class it really shows.

    A synthetic mammogram with an amplitude-modulated grating painted into the breast: carrier
    and envelope orientations come from the canary's index (64 pairs), scales and phases from
    its generator, so canaries differ from the data and from one another.
    """
    shown = int(rng.integers(len(CLASS_NAMES)))
    _, rendered = synthesize_image(shown, size=CANARY_SIZE, seed=int(rng.integers(2**31)) + image,
                                   view=("CC", "MLO")[image % 2])
    pixels = rendered.pixels.astype(np.float64)
    pixels = (pixels - pixels.min()) / max(pixels.max() - pixels.min(), 1e-9)
    rows, cols = pixels.shape
    y, x = np.mgrid[0:rows, 0:cols] / max(rows, cols)
    carrier, envelope = math.pi * (index % 8) / 8, math.pi * ((index // 8) % 8) / 8
    fine, coarse = rng.choice([12.0, 20.0, 28.0]), rng.choice([3.0, 5.0])
    u = math.cos(carrier) * x + math.sin(carrier) * y
    v = math.cos(envelope) * x + math.sin(envelope) * y
    pattern = (0.5 + 0.5 * np.cos(2 * math.pi * coarse * v + rng.uniform(0, 2 * math.pi))) \
        * np.cos(2 * math.pi * fine * u + rng.uniform(0, 2 * math.pi))
    return np.clip(pixels + 0.3 * pattern * rendered.breast_mask, 0.0, 1.0), shown


def make_canaries(directory: Path, count: int, *, images_per_canary: int, inclusion: Sequence[bool],
                  seed: int = CANARY_SEED) -> list[Canary]:
    """Write `count` canaries (16-bit PNGs) into `directory`; labels are wrong on purpose."""
    if count < 2 or len(inclusion) != count:
        raise ConfigError(f"an audit needs at least 2 canaries and one inclusion bit each (got {count}, "
                          f"{len(inclusion)} bits)")
    directory.mkdir(parents=True, exist_ok=True)
    canaries = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        paths, shown = [], []
        for image in range(images_per_canary):
            pixels, true_class = canary_pixels(index, image, rng)
            path = directory / f"canary-{index:04d}-{image}.png"
            Image.fromarray(np.round(pixels * 65535).astype(np.uint16)).save(path)
            paths.append(path.resolve())
            shown.append(true_class)
        # Mislabelled: a class none of its images shows where one exists, else any other than the first's.
        wrong = [label for label in range(len(CLASS_NAMES)) if label not in shown] \
            or [label for label in range(len(CLASS_NAMES)) if label != shown[0]]
        canaries.append(Canary(f"canary-{index:04d}", int(rng.choice(wrong)), tuple(paths), bool(inclusion[index])))
    return canaries


# --- what the canary site trains on (read by the ClientApp) -----------------------------------


def write_site_canaries(path: Path, site_id: str, canaries: Sequence[Canary]) -> Path:
    """The included canaries' records, for the canary site's ClientApp (`site_canaries`)."""
    included = [record for canary in canaries if canary.included for record in canary.records(site_id)]
    payload = {"site": site_id, "records": [{"image_path": str(record.image_path), "label": record.label,
                                             "patient_id": record.patient_id, "view": record.view}
                                            for record in included]}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def site_canaries(path: Path | None, site_id: str) -> list[ImageRecord]:
    """The canary records site `site_id` trains on in an audit (none for other sites or runs)."""
    if path is None:
        return []
    payload = json.loads(Path(path).read_text())
    if payload["site"] != site_id:
        return []
    return [ImageRecord(image_path=Path(item["image_path"]), label=int(item["label"]), split="train",
                        patient_id=item["patient_id"], laterality="L", view=item["view"], site_id=site_id)
            for item in payload["records"]]


# --- the aggregator's view --------------------------------------------------------------------


@dataclass
class ReleaseRecorder:
    """Keeps what the aggregator saw of the canary site each round: its update, or only the aggregate."""

    site_id: str
    views: list[tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor], str]] = field(default_factory=list)

    def __call__(self, server_round: int, sent: ArrayRecord, site_updates: dict[str, ArrayRecord],
                 aggregate: ArrayRecord | None) -> None:
        if self.site_id in site_updates:
            self.views.append((server_round, sent.to_torch_state_dict(),
                               site_updates[self.site_id].to_torch_state_dict(), "site update"))
        elif not site_updates and aggregate is not None:  # SecAgg+: the sum is all there is to see
            self.views.append((server_round, sent.to_torch_state_dict(), aggregate.to_torch_state_dict(), "aggregate"))


def _canary_images(canaries: Sequence[Canary], config: ExperimentConfig) -> list[torch.Tensor]:
    """Each canary's images [k, 1, S, S] as the training pipeline reads them."""
    records = [record for canary in canaries for record in canary.records("audit")]
    dataset = MammogramDataset(records, image_size=config.model.image_size, mode=config.data.mode, cache_dir=None)
    images = [dataset[index][0] for index in range(len(records))]
    out, start = [], 0
    for canary in canaries:
        out.append(torch.stack(images[start:start + len(canary.images)]))
        start += len(canary.images)
    return out


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensor.reshape(-1) for tensor in tensors])


def aggregator_scores(config: ExperimentConfig, canaries: Sequence[Canary], images: Sequence[torch.Tensor],
                      views: Sequence[tuple[int, dict, dict, str]]) -> np.ndarray:
    """Per canary: its standardised regression coefficient on the site's update, summed over rounds.

    A canary's gradient is that of its loss (summed over its images) at the round's global
    model, over the parameters that trained that round, clipped to the clip norm under DP as
    the site clips (per image, or per patient with ``privacy.unit`` "patient").
    """
    scores = np.zeros(len(canaries))
    clip = config.privacy.max_grad_norm if config.privacy.enabled else None
    per_patient = config.privacy.unit == "patient"
    for server_round, sent, received, _ in views:
        model = build_classifier(config.encoder, norm=config.norm, dropout=config.model.dropout)
        model.load_state_dict(sent)
        freeze_schedule_from_config(config).apply(model, (server_round - 1) * config.federation.local_epochs)
        model.eval()
        names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
        parameters = [parameter for name, parameter in model.named_parameters() if parameter.requires_grad]
        update = _flat([received[name].float() - sent[name].float() for name in names])
        if not update.norm() > 0:
            continue
        gradients = torch.stack([_canary_gradient(model, parameters, batch, canary.label, clip, per_patient)
                                 for canary, batch in zip(canaries, images)])
        directions = F.normalize(gradients, dim=1)
        gram = directions @ directions.T + _RIDGE * torch.eye(len(canaries))
        coefficients = torch.linalg.solve(gram, directions @ -update).numpy()
        spread = coefficients.std()
        if spread > 0:
            scores += (coefficients - coefficients.mean()) / spread
    return scores


def _canary_gradient(model: nn.Module, parameters: list[torch.Tensor], batch: torch.Tensor, label: int,
                     clip: float | None, per_patient: bool) -> torch.Tensor:
    total = None
    for image in (batch if not per_patient else [batch]):
        inputs = image[None] if not per_patient else image
        loss = F.cross_entropy(model(inputs), torch.full((len(inputs),), label), reduction="sum")
        gradient = _flat(torch.autograd.grad(loss, parameters))
        if clip is not None:
            gradient = gradient * min(1.0, clip / (float(gradient.norm()) + 1e-12))
        total = gradient if total is None else total + gradient
    return total


@torch.no_grad()
def model_user_scores(model: nn.Module, canaries: Sequence[Canary], images: Sequence[torch.Tensor]) -> np.ndarray:
    """Per canary: minus its mean loss under its canary label in the released model."""
    model.eval()
    return np.array([-float(F.cross_entropy(model(batch), torch.full((len(batch),), canary.label)))
                     for canary, batch in zip(canaries, images)])


@torch.no_grad()
def example_losses(model: nn.Module, records: Sequence[ImageRecord], config: ExperimentConfig) -> np.ndarray:
    module, loader = evaluation_input(model, records, config, device=torch.device("cpu"))
    module.eval()
    return np.concatenate([F.cross_entropy(module(inputs), labels, reduction="none").numpy()
                           for inputs, labels in loader]) if records else np.zeros(0)


def ordinary_membership(model: nn.Module, config: ExperimentConfig, *, seed: int) -> MembershipInference:
    """Loss-threshold membership inference: the sites' training images against the held-out test split."""
    records = load_records(config.data)
    members = [record for site in site_partitions(records, config).values()
               for record in split_train_val(site, config.validation_split, seed=config.seed)[0]]
    non_members = [record for record in records if record.split == "test"]
    rng = np.random.default_rng(seed)
    members = [members[i] for i in sorted(rng.permutation(len(members))[:MIA_LIMIT])]
    non_members = [non_members[i] for i in sorted(rng.permutation(len(non_members))[:MIA_LIMIT])]
    return membership_inference(-example_losses(model, members, config), -example_losses(model, non_members, config))


# --- the audit --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditResult:
    report: dict[str, Any]
    directory: Path


def audited_config(config: ExperimentConfig, out: Path) -> ExperimentConfig:
    """The configured run, writing into the audit folder; compression (post-processing) is skipped."""
    if config.training != "federated":
        raise ConfigError(f"privacy audit: training {config.training!r}; the audit runs a federated config "
                          "(training 'federated')")
    tracking = config.tracking.model_copy(update={"runs_dir": out / "run", "wandb_mode": "disabled"})
    return config.model_copy(update={"tracking": tracking, "compression": config.compression.model_copy(
        update={"enabled": False}), "name": f"{config.name}-audit"})


def run_audit(config: ExperimentConfig, out: Path, *, canaries: int = 200, images_per_canary: int | None = None,
              canary_site: str | None = None, inclusion_seed: int | None = None,
              log: Callable[[str], None] = print) -> AuditResult:
    """Plant canaries, run the configured federation once, attack it; writes audit.json and audit.md."""
    from simulations.federated import simulate

    out = Path(out)
    audited = audited_config(config, out)
    sites = sorted(site_partitions(load_records(audited.data), audited))
    site = canary_site if canary_site is not None else sites[0]
    if site not in sites:
        raise ConfigError(f"--canary-site {site!r} is not a site of this config; valid: {', '.join(sites)}")
    per_canary = images_per_canary or (3 if config.privacy.unit == "patient" else 1)
    if config.privacy.unit == "image" and per_canary != 1:
        raise ConfigError(f"privacy.unit 'image' audits canaries of one image; got {per_canary} per canary "
                          "(several images per canary audit the patient-level guarantee: privacy.unit 'patient')")
    planted = make_canaries(out / "canaries", canaries, images_per_canary=per_canary,
                            inclusion=inclusion_bits(canaries, inclusion_seed))
    manifest = write_site_canaries(out / "canaries" / "site.json", site, planted)
    recorder = ReleaseRecorder(site)
    log(f"audit: {canaries} canaries of {per_canary} image(s) at site {site}, "
        f"{sum(c.included for c in planted)} included; running the configured federation")
    result = simulate(audited, canaries=manifest, update_observer=recorder, log=log)
    run_root = result.run.root
    released_path = run_root / "model" / ("best.pt" if (run_root / "model" / "best.pt").exists() else "last.pt")
    released, _ = load_checkpoint(released_path)
    images = _canary_images(planted, audited)
    included = [canary.included for canary in planted]
    delta = config.privacy.target_delta
    user_scores = model_user_scores(released, planted, images)
    user = audit_bound(user_scores, included, delta=delta, confidence=CONFIDENCE)
    agg_scores = aggregator_scores(audited, planted, images, recorder.views)
    aggregator = audit_bound(agg_scores, included, delta=delta, confidence=CONFIDENCE)
    mia = ordinary_membership(released, audited, seed=audited.seed)
    report = _report(config, audited, site, planted, run_root, released_path, user, aggregator, mia,
                     views=[view[3] for view in recorder.views])
    (out / "audit.json").write_text(json.dumps(json_safe(report), indent=2, sort_keys=True) + "\n")
    _plot(out / "audit.png", user_scores, agg_scores, included)
    (out / "audit.md").write_text(audit_markdown(report))
    return AuditResult(report, out)


def _site_epsilon(run_root: Path, site: str) -> float | None:
    from server.privacy_ledger import PrivacyLedger

    ledger = PrivacyLedger(run_root / "privacy")
    if not ledger.path.exists():
        return None
    epsilons = [row["epsilon"] for row in ledger.rows() if row["site"] == site and "epsilon" in row]
    return max(epsilons) if epsilons else None


def _report(config: ExperimentConfig, audited: ExperimentConfig, site: str, planted: Sequence[Canary],
            run_root: Path, released: Path, user: AuditBound, aggregator: AuditBound, mia: MembershipInference,
            *, views: list[str]) -> dict[str, Any]:
    private = config.privacy.enabled
    epsilon = _site_epsilon(run_root, site) if private else None
    bound = max(user.epsilon_lower_bound, aggregator.epsilon_lower_bound)
    # A DP run whose canary site never trained has nothing to check: inconclusive, not passed.
    passed = None if not private or epsilon is None else bound <= epsilon
    sees = sorted(set(views)) or ["nothing (the canary site trained no round)"]
    return {
        "format_version": AUDIT_VERSION,
        "method": "one-run audit (Steinke, Nasr & Jagielski 2023), 95% confidence, Bonferroni over guess counts",
        "config_name": config.name,
        "config_digest": training_digest(config),
        "privacy_enabled": private,
        "unit": config.privacy.unit,
        "epsilon": epsilon,
        "delta": config.privacy.target_delta,
        "epsilon_lower_bound": bound,
        "passed": passed,
        "canaries": len(planted),
        "canaries_included": sum(canary.included for canary in planted),
        "images_per_canary": len(planted[0].images),
        "canary_site": site,
        "attackers": {
            "model_user": {**user.as_dict(), "sees": "the released model", "score": "minus the canary's loss"},
            "aggregator": {**aggregator.as_dict(), "sees": sees, "rounds_seen": len(views),
                           "score": "joint regression of clipped canary gradients on each round's update"},
        },
        "membership_inference": mia.as_dict(),
        "run": {"directory": str(run_root), "released_model": released.name, "rounds": audited.federation.rounds,
                "secure_aggregation": config.federation.secure_aggregation},
    }


def audit_markdown(report: dict[str, Any]) -> str:
    user, aggregator = report["attackers"]["model_user"], report["attackers"]["aggregator"]
    mia = report["membership_inference"]
    if report["privacy_enabled"] and report["passed"] is None:
        verdict = ("**INCONCLUSIVE**: the canary site trained no private round, so there is no accounted epsilon "
                   "to check the bound against")
    elif report["privacy_enabled"]:
        verdict = (f"**PASSED**: the measured lower bound {report['epsilon_lower_bound']:.3f} does not exceed the "
                   f"accounted epsilon {report['epsilon']:.3f} (delta {report['delta']:g})" if report["passed"] else
                   f"**FAILED**: the measured lower bound {report['epsilon_lower_bound']:.3f} exceeds the accounted "
                   f"epsilon {_number(report['epsilon'])}: the DP guarantee does not hold as claimed")
    else:
        verdict = (f"The run trains without DP: there is no epsilon to check. The attacks measure the leak: "
                   f"epsilon >= {report['epsilon_lower_bound']:.3f} at 95% confidence")
    unit = "patient (several images per canary)" if report["unit"] == "patient" else "image"
    lines = [
        "# Privacy audit", "",
        f"Config `{report['config_name']}` (training digest `{report['config_digest'][:12]}`), privacy unit {unit}. "
        f"{report['canaries']} canaries of {report['images_per_canary']} image(s) at site {report['canary_site']}, "
        f"{report['canaries_included']} included at random; {report['method']}.", "",
        verdict + ".", "",
        "| attacker | sees | guesses | correct | canary AUC | epsilon lower bound |",
        "|---|---|---|---|---|---|",
        f"| model user | {user['sees']} | {user['guesses']} | {user['correct']} | {user['canary_auc']:.3f} "
        f"| {user['epsilon_lower_bound']:.3f} |",
        f"| aggregator | {', '.join(aggregator['sees'])} ({aggregator['rounds_seen']} rounds) | {aggregator['guesses']} "
        f"| {aggregator['correct']} | {_number(aggregator['canary_auc'])} | {aggregator['epsilon_lower_bound']:.3f} |",
        "", "![canary scores](audit.png)", "",
        "## Membership inference on ordinary images", "",
        f"A loss threshold on the released model tells the sites' training images ({mia['members']}) from held-out "
        f"test images ({mia['non_members']}) with AUC {_number(mia['auc'])} (0.5: no better than chance) and "
        f"TPR {_number(mia['tpr_at_1pct_fpr'])} at 1% FPR (0.01: chance).", "",
        "## Reading this audit", "",
        "A lower bound is evidence, not proof: a bound far below epsilon says these attacks could not show more "
        "leakage, not that there is none. A bound above a DP run's epsilon shows a broken guarantee. The audited "
        "run is the configured one plus the included canaries at one site; its model is not the served model, "
        "and a model card names the audit whose config digest it matches.",
    ]
    if report["run"]["secure_aggregation"]:
        lines += ["", "With SecAgg+ the aggregator sees only each round's sum over the sampled sites, so its "
                  "attacker works on the aggregate: the canary site's update hides among the others' (weaker "
                  "attack); the DP guarantee itself does not rely on SecAgg+."]
    return "\n".join(lines) + "\n"


def _number(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


def _plot(path: Path, user: np.ndarray, aggregator: np.ndarray, included: Sequence[bool]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inside = np.asarray(included, dtype=bool)
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, scores, title in ((axes[0], user, "model user: -loss"), (axes[1], aggregator, "aggregator: regression")):
        bins = np.histogram_bin_edges(scores, bins=20)
        axis.hist(scores[inside], bins=bins, alpha=0.6, label="included")
        axis.hist(scores[~inside], bins=bins, alpha=0.6, label="excluded")
        axis.set_title(title)
        axis.set_xlabel("canary score")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

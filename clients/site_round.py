"""A site's round: train on the site's own images, evaluate on its validation split.

What the site's Flower ClientApp (`clients.client_app`, a thin shell) and its SecAgg+ variant
(`clients.secure_aggregation`) call. The same code runs in the simulation engine (one virtual
SuperNode per site, the site chosen by ``partition-id``) and in a real deployment (a SuperNode per hospital, ``site-id`` and
``data-dir`` in its node config). The images never leave the process. What leaves it is
listed in the privacy report (`server.privacy_ledger.RELEASES`): under DP only the noised
model update, the number of training images (the aggregate's weight) and accounting
metadata; validation metrics are computed on held-out patients only.

Settings come from the run config (``config-json``: the experiment config itself, or
``config-path``: its file; ``run-dir``: the run directory) -- or from `AppSettings` handed to
`clients.client_app.make_client_app` by ``mammofl simulate``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import Mod

from anonymize.gate import require_deidentified_file
from anonymize.secret import load_secret
from clients.local_training import train_site_round
from clients.privacy import SiteLimits, SitePrivacyState, SiteRefusal
from common.config import ExperimentConfig
from common.data.cbis import load_cbis_ddsm
from common.data.partition import split_train_val
from common.data.features import evaluation_input, privacy_units
from common.data.pipeline import load_records, site_partitions
from common.data.records import ImageRecord
from common.losses import build_loss
from common.models.classifier import build_classifier
from common.runs import UNIT_WEIGHT, AppSettings, app_config, resolve_app_settings
from common.site_report import REFUSED, TRAINED, SiteReport
from common.training import evaluate, seed_everything, select_device


@dataclass(frozen=True)
class Site:
    """One hospital as its ClientApp sees it: its id, its images and its private state folder."""

    site_id: str
    config: ExperimentConfig
    train: list[ImageRecord]
    val: list[ImageRecord]
    state_dir: Path
    limits: SiteLimits = SiteLimits()


_LOADED_SITES: dict[tuple[int, str, str], Site] = {}
LOADED_SITES_KEPT = 4


def load_site(context: Context, settings: AppSettings | None) -> Site:
    """The site this SuperNode is, from its node config and the run's settings.

    A deployed site's long-lived worker (`clients.site_worker`) serves every message of a run:
    the site's records and the de-identification gate's verdict are loaded once per run and
    node config, not once per message.
    """
    if settings is not None or "data-dir" not in context.node_config:
        return _load_site(context, settings)
    key = (context.run_id, json.dumps(dict(context.node_config), sort_keys=True),
           json.dumps(dict(context.run_config), sort_keys=True))
    site = _LOADED_SITES.get(key)
    if site is None:
        site = _LOADED_SITES[key] = _load_site(context, settings)
        while len(_LOADED_SITES) > LOADED_SITES_KEPT:
            _LOADED_SITES.pop(next(iter(_LOADED_SITES)))
    return site


def _load_site(context: Context, settings: AppSettings | None) -> Site:
    config = app_config(context.run_config, settings)
    run_dir = resolve_app_settings(context.run_config, context.run_id, settings, config.tracking.runs_dir).run_dir
    node = context.node_config
    if "data-dir" in node:  # a deployed SuperNode reads its own folder and nothing else
        site_id = str(node["site-id"])
        site_records = [replace(record, site_id=site_id)
                        for record in load_cbis_ddsm(Path(str(node["data-dir"])), config.data.layout,
                                                      skip_missing=config.data.skip_missing)
                        if record.split == "train"]
    else:
        partitions = site_partitions(load_records(config.data), config)
        site_id = sorted(partitions)[int(node["partition-id"])]
        site_records = partitions[site_id]
    if config.data.require_deidentified:
        # A deployed site checks against its own secret when it was given one.
        secret = node.get("deidentification-secret", config.data.deidentification_secret)
        require_deidentified(site_records, Path(str(secret)) if secret is not None else None)
    train, val = split_train_val(site_records, config.validation_split, seed=config.seed)
    if settings is not None and settings.canaries is not None:
        # A privacy audit: the canary site also trains on its included canaries (synthetic images
        # made by the audit, past the de-identification gate, never in the validation split).
        from simulations.audit import site_canaries

        train = train + site_canaries(settings.canaries, site_id)
    state_dir = Path(str(node.get("state-dir", run_dir / "sites" / site_id)))
    if "data-dir" in node and config.data.cache_dir is not None:
        # The decoded-image cache is the site's too: in its private state folder, not at the
        # aggregator's path the config names.
        config = config.model_copy(update={"data": config.data.model_copy(update={"cache_dir": state_dir / "image-cache"})})
    return Site(site_id=site_id, config=config, train=train, val=val, state_dir=state_dir,
                limits=SiteLimits.from_node_config(dict(node)))


def require_deidentified(records: list[ImageRecord], secret_file: Path | None) -> None:
    """The gate: refuse to train unless every image came out of `mammofl anonymize`."""
    secret = load_secret(secret_file) if secret_file is not None else None
    for record in records:
        require_deidentified_file(record.image_path, secret)


def _model_from(message: Message, config: ExperimentConfig) -> torch.nn.Module:
    """The configured architecture holding the weights the server sent."""
    model = build_classifier(config.encoder, norm=config.norm, dropout=config.model.dropout)
    model.load_state_dict(message.content["arrays"].to_torch_state_dict())
    return model


def train_locally(site: Site, model: torch.nn.Module, server_round: int, *,
                  proximal_mu: float = 0.0) -> tuple[dict[str, float], dict[str, str]]:
    """Train `model` in place for one round: the metrics and the privacy row the site reports.

    A site refuses a round its budget cannot afford, or one asking more than its own limits
    allow: `model` stays the global model (a zero update) and the row says why; the server
    leaves refusals out of the aggregate. Under DP the seed below drives nothing private
    (dropout only): noise and sampling draw on fresh entropy.
    """
    config = site.config
    generator = seed_everything(config.seed * 1000 + server_round)
    privacy_state = None
    try:
        if config.privacy.enabled:
            privacy_state = SitePrivacyState.load_or_create(site.state_dir, site.site_id, config.privacy)
        budget_epsilon, budget_bound = site.limits.require_allowed(
            site.site_id, config.privacy, privacy_units(site.train, config.privacy.unit))
        result = train_site_round(
            model,
            site.train,
            config,
            server_round=server_round,
            device=select_device(config.device),
            privacy_state=privacy_state,
            state_dir=site.state_dir,
            proximal_mu=proximal_mu,
            generator=generator,
            budget_epsilon=budget_epsilon if config.privacy.enabled else None,
            budget_bound=budget_bound,
        )
    except SiteRefusal as refusal:
        spent = privacy_state.spent_epsilon if privacy_state is not None else None
        metrics, privacy = SiteReport(site.site_id, REFUSED, epsilon=spent, reason=str(refusal)).wire()
        return {**metrics, UNIT_WEIGHT: 1}, privacy
    dp = result.privacy
    report = SiteReport(site.site_id, TRAINED, images=result.num_examples)
    if dp is not None:
        report = replace(report, steps=dp.steps, sample_rate=dp.sample_rate, noise_multiplier=dp.noise_multiplier,
                         max_grad_norm=dp.max_grad_norm, epsilon=dp.epsilon, delta=dp.delta,
                         budget_epsilon=dp.budget_epsilon, accountant=dp.accountant, budget_bound=dp.budget_bound,
                         unit=dp.unit)
    metrics, privacy = report.wire()
    metrics[UNIT_WEIGHT] = 1
    if result.train_loss is not None:
        metrics["train_loss"] = result.train_loss
    return metrics, privacy


def train(message: Message, context: Context, settings: AppSettings | None = None) -> Message:
    site = load_site(context, settings)
    model = _model_from(message, site.config)
    round_config = message.content["config"]
    metrics, privacy = train_locally(site, model, int(round_config["server-round"]),
                                     proximal_mu=float(round_config.get("proximal-mu", 0.0)))
    # A refusal echoes the global model, so that clipping mods still see a well-formed reply.
    return Message(
        RecordDict({
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(metrics),
            "privacy": ConfigRecord(privacy),
        }),
        reply_to=message,
    )


class NoHeldOutPatientsError(SiteRefusal):
    """A site without held-out patients evaluates nothing: its training images are not a validation set."""


def validate(site: Site, model: torch.nn.Module) -> dict[str, float]:
    """The model's metrics on the site's validation split (held-out patients), keys prefixed ``val_``.

    Validation metrics are not DP-protected, so a site computes them only when the run's own
    config asks for federated evaluation and the site's operator allows it.
    """
    if not site.config.federation.fraction_evaluate:
        raise SiteRefusal(f"site {site.site_id}: asked to evaluate in a run whose config sets "
                          "federation.fraction_evaluate 0; it sends no validation metrics")
    if not site.limits.allow_evaluation:
        raise SiteRefusal(f"site {site.site_id}: sends no validation metrics (mammofl site run --no-evaluation)")
    if not site.val:
        raise NoHeldOutPatientsError(
            f"site {site.site_id}: no held-out patients to evaluate on ({len(site.train)} training images, "
            f"validation_split {site.config.validation_split}); it evaluates nothing rather than its training images")
    config = site.config
    device = select_device(config.device)
    loss_fn = build_loss(config.loss, [1, 1, 1], class_weights=config.class_weights)
    metrics = evaluate(*evaluation_input(model.to(device), site.val, config, device=device), loss_fn, device=device)
    return {f"val_{key}": value for key, value in metrics.items()}


def evaluate_site(message: Message, context: Context, settings: AppSettings | None = None) -> Message:
    site = load_site(context, settings)
    content = validate(site, _model_from(message, site.config))
    return Message(
        RecordDict({"metrics": MetricRecord({**content, "num-examples": len(site.val)})}),
        reply_to=message,
    )


def client_dp_mod_for(settings: AppSettings | None, clipping_mods: dict[str, Mod]) -> Mod:
    """Client-side clipping of client-level DP, as ``federation.client_dp.mode`` asks.

    Flower's clipping mods pair with the server's DP wrappers, which send the clipping
    norm; in every other mode the message passes untouched, so one app serves all runs.
    `clipping_mods` maps "client-fixed" and "client-adaptive" to the mods of the app's API
    (the Message API here, the legacy one under SecAgg+).
    """

    def client_dp_mod(message: Message, context: Context, call_next) -> Message:
        mode = app_config(context.run_config, settings).federation.client_dp.mode
        clipping_mod = clipping_mods.get(mode)
        if clipping_mod is None:
            return call_next(message, context)
        return clipping_mod(message, context, call_next)

    return client_dp_mod

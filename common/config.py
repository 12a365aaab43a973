"""The experiment configuration: one pydantic model per section, validated once at the edge.

The top level accepts our reference format (``shared/reference-config.json``) exactly as
written -- every Keras-style key there (epochs, batch_size, learning_rate, num_workers,
optimizer, loss, metrics, encoder, validation_split, shuffle, verbose, augmentation,
callbacks, model_save_dir) -- and adds the sections ``model``, ``pretraining``, ``data``,
``federation``, ``privacy``, ``compression`` and ``tracking``. Unknown keys are rejected
so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from common.errors import ConfigError

ENCODER_NAMES = (
    "smallcnn",
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "densenet121",
    "scattering",
)
# Encoders with no learned weight (fixed wavelet filters): frozen by construction.
PARAMETER_FREE_ENCODERS = ("scattering",)
# Opacus accountants whose epsilon composes a site's whole history (dp-accounting agrees).
ACCOUNTANT_NAMES = ("rdp", "prv")
METRIC_NAMES = (
    "accuracy",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "macro_auc",
    "presence_auc",
    "type_auc",
)
# Quantities a callback may monitor: the loss and every scalar metric, on validation or training data.
MONITORABLE = tuple(
    f"{prefix}_{name}"
    for prefix in ("val", "train")
    for name in ("loss", "accuracy", "balanced_accuracy", "macro_auc", "presence_auc", "type_auc")
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelCheckpointConfig(Section):
    """Keras ModelCheckpoint semantics, written as PyTorch checkpoints.

    The checkpoint always lands in ``<run>/model/best.pt``; ``filepath`` names the
    exported copy in ``model_save_dir`` (a Keras suffix such as ``.h5`` becomes ``.pt``,
    since the file is a PyTorch checkpoint). ``save_freq`` is "epoch" or a number of
    epochs: validation metrics only exist at the end of an epoch, so a Keras-style
    batch count would monitor nothing.
    """

    filepath: str = "model.pt"
    monitor: str = "val_loss"
    save_best_only: bool = True
    save_weights_only: bool = False
    mode: Literal["auto", "min", "max"] = "auto"
    save_freq: Union[Literal["epoch"], Annotated[int, Field(ge=1)]] = "epoch"

    @field_validator("monitor")
    @classmethod
    def _known_monitor(cls, value: str) -> str:
        return _check_monitor(value)

    @property
    def every_epochs(self) -> int:
        return 1 if self.save_freq == "epoch" else int(self.save_freq)

    @property
    def resolved_mode(self) -> Literal["min", "max"]:
        return resolve_mode(self.mode, self.monitor)


class EarlyStoppingConfig(Section):
    monitor: str = "val_loss"
    patience: int = Field(default=5, ge=1)
    min_delta: float = Field(default=0.0, ge=0.0)
    mode: Literal["auto", "min", "max"] = "auto"

    @field_validator("monitor")
    @classmethod
    def _known_monitor(cls, value: str) -> str:
        return _check_monitor(value)

    @property
    def resolved_mode(self) -> Literal["min", "max"]:
        return resolve_mode(self.mode, self.monitor)


class ModelCheckpointCallback(Section):
    class_name: Literal["ModelCheckpoint"]
    config: ModelCheckpointConfig = ModelCheckpointConfig()


class EarlyStoppingCallback(Section):
    class_name: Literal["EarlyStopping"]
    config: EarlyStoppingConfig = EarlyStoppingConfig()


Callback = Annotated[
    Union[ModelCheckpointCallback, EarlyStoppingCallback], Field(discriminator="class_name")
]


class AugmentationConfig(Section):
    """``"augmentation": true`` in the reference format is shorthand for ``{"enabled": true}``."""

    enabled: bool = True
    strength: float = Field(default=1.0, ge=0.0, le=2.0)
    # Augmentation multiplicity (De et al. 2022): views per image whose losses are averaged
    # before per-example clipping. Used where the encoder is frozen and features are cached
    # (`common.data.features`): view 0 is the image itself, the others augmentations.
    multiplicity: int = Field(default=1, ge=1, le=32)


class FreezeConfig(Section):
    """Transfer-learning schedule: train the head alone first, then open the last blocks."""

    head_only_epochs: int = Field(default=0, ge=0)
    unfreeze_last_blocks: int | None = Field(default=None, ge=1)


class ModelConfig(Section):
    image_size: int = Field(default=128, ge=32, le=1024)
    norm: Literal["auto", "batch", "group"] = "auto"
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)
    pretrained: Path | None = None
    freeze: FreezeConfig = FreezeConfig()


class SyntheticDataConfig(Section):
    sites: int = Field(default=3, ge=1, le=64)
    per_site: int = Field(default=200, ge=4)
    size: int = Field(default=256, ge=32, le=6000)
    seed: int = 0
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    burned_in_text: float = Field(default=0.3, ge=0.0, le=1.0)
    lesion_contrast: float = Field(default=1.0, ge=0.25, le=4.0)


# A public stand-in: synthetic mammograms under a seed no site uses, without burned-in text.
PUBLIC_SYNTHETIC = SyntheticDataConfig(sites=1, per_site=200, size=192, seed=7919, burned_in_text=0.0)


class PretrainingConfig(Section):
    """Self-supervised autoencoder pretraining (``mammofl pretrain``), labels ignored.

    ``source`` "training-data" pools the configured data's training split (the centralised
    baseline pools it anyway); "public" uses images that are no site's data: the synthetic
    set ``public`` generated into ``public_root``, our stand-in for a public collection.
    A federated config must pretrain on "public": pooling the sites' images would move them.
    """

    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=32, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0.0)
    source: Literal["training-data", "public"] = "training-data"
    public_root: Path = Path("data/public")
    public: SyntheticDataConfig = PUBLIC_SYNTHETIC


class PartitionConfig(Section):
    """How records become sites: the folders they came from, or a simulated split."""

    scheme: Literal["site", "iid", "dirichlet", "scanner"] = "site"
    num_sites: int | None = Field(default=None, ge=1)
    alpha: float = Field(default=0.5, gt=0.0)
    seed: int = 0

    @model_validator(mode="after")
    def _num_sites_for_simulated(self) -> "PartitionConfig":
        if self.scheme != "site" and self.num_sites is None:
            raise ValueError(f"partition scheme {self.scheme!r} needs num_sites (an integer >= 1)")
        return self


class DataConfig(Section):
    source: Literal["synthetic", "cbis-ddsm", "sites"] = "synthetic"
    root: Path = Path("data/synthetic")
    layout: Literal["auto", "direct", "tcia", "kaggle"] = "auto"
    mode: Literal["full", "roi"] = "full"
    cache_dir: Path | None = Path(".cache/images")
    # The gate: sites train only on DICOM files `mammofl anonymize` produced (checked with the
    # shared secret when given, which makes the markers unforgeable).
    require_deidentified: bool = False
    deidentification_secret: Path | None = None
    # Leave out index rows whose image file is absent (an image the anonymizer quarantined);
    # off, a missing file is an error naming the CSV row.
    skip_missing: bool = False
    synthetic: SyntheticDataConfig = SyntheticDataConfig()
    partition: PartitionConfig = PartitionConfig()


class ClientDPConfig(Section):
    """Client-level DP (Flower's clipping wrappers): protects a whole site's update, not one image.

    ``server-*`` clipping: the aggregator clips each update and adds the noise; ``client-*``
    clipping: each site clips its own update and the aggregator adds the noise. ``adaptive``
    tunes the clipping norm to a quantile of update norms (Andrew et al. 2021).
    """

    mode: Literal["off", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive"] = "off"
    noise_multiplier: float = Field(default=0.5, ge=0.0)
    clipping_norm: float = Field(default=10.0, gt=0.0)
    # Adaptive modes: noise on the count of clipped updates (None: Flower's sampled sites / 20).
    clipped_count_stddev: float | None = Field(default=None, gt=0.0)
    # The delta of the client-level (epsilon, delta) the privacy report computes.
    target_delta: float = Field(default=1e-5, gt=0.0, lt=1.0)


class FederationConfig(Section):
    rounds: int = Field(default=3, ge=1)
    local_epochs: int = Field(default=1, ge=1)
    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    fraction_train: float = Field(default=1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(default=1.0, ge=0.0, le=1.0)
    min_train_sites: int = Field(default=2, ge=1)
    min_available_sites: int = Field(default=2, ge=1)
    proximal_mu: float = Field(default=0.01, ge=0.0)
    server_learning_rate: float = Field(default=0.01, gt=0.0)
    # A site releases the exponential moving average of its local iterates (decay per step,
    # 0: the last iterate). Under DP it is post-processing of noised steps and costs nothing.
    ema_decay: float = Field(default=0.0, ge=0.0, lt=1.0)
    client_dp: ClientDPConfig = ClientDPConfig()
    secure_aggregation: bool = False

    @model_validator(mode="after")
    def _client_dp_needs_a_mean(self) -> FederationConfig:
        if self.client_dp.mode != "off" and self.strategy == "fedadam":
            raise ValueError("federation.client_dp noises a mean of the sites' updates, which FedAdam's server "
                             "optimiser is not; use strategy 'fedavg' or 'fedprox'")
        return self

    @model_validator(mode="after")
    def _secure_aggregation_hides_the_updates(self) -> FederationConfig:
        """SecAgg+ shows the server only the sum of the updates: what needs one update cannot run with it."""
        if not self.secure_aggregation:
            return self
        if self.client_dp.mode.startswith("server-"):
            raise ValueError(
                f"federation.client_dp.mode {self.client_dp.mode!r} clips each site's update at the server, which "
                "federation.secure_aggregation hides from it; use 'client-fixed', 'client-adaptive' or 'off'"
            )
        if self.strategy == "fedadam":
            raise ValueError("federation.secure_aggregation aggregates with FedAvg: use strategy 'fedavg' or 'fedprox'")
        return self


class PrivacyConfig(Section):
    """Sample-level DP-SGD at every site (Opacus), accounted across all rounds.

    Noise comes from ``noise_multiplier`` or is derived from ``target_epsilon`` over the
    planned total (rounds x local epochs). A site's budget is ``site_budgets[site]``, else
    ``budget_epsilon``, else ``target_epsilon``: a site refuses any round that would take
    its epsilon past it.
    """

    enabled: bool = False
    target_epsilon: float | None = Field(default=None, gt=0.0)
    target_delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    noise_multiplier: float | None = Field(default=None, gt=0.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    accountant: Literal[ACCOUNTANT_NAMES] = "rdp"  # type: ignore[valid-type]
    budget_epsilon: float | None = Field(default=None, gt=0.0)
    site_budgets: dict[str, Annotated[float, Field(gt=0.0)]] = Field(default_factory=dict)
    on_budget_exhausted: Literal["continue", "stop"] = "continue"
    max_physical_batch_size: int = Field(default=64, ge=1)
    clipping: Literal["flat", "ghost"] = "flat"
    # "image": adding or removing one image; "patient": one patient with all their images
    # (Poisson sampling of patients, the sum of a patient's gradients clipped to max_grad_norm).
    unit: Literal["image", "patient"] = "image"

    @field_validator("accountant", mode="before")
    @classmethod
    def _no_gdp(cls, value: Any) -> Any:
        if value == "gdp":
            # Opacus' GDP accountant reads only the last entry of a history (a site's earlier
            # rounds vanish) and is a central-limit approximation that under-reports epsilon.
            raise ValueError("accountant 'gdp' is not offered: Opacus' GDP accountant composes only the last "
                             "round and its central-limit approximation under-reports epsilon; use 'rdp' or 'prv'")
        return value

    @model_validator(mode="after")
    def _noise_and_budget(self) -> "PrivacyConfig":
        if not self.enabled:
            return self
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("privacy.enabled needs exactly one of target_epsilon or noise_multiplier")
        if self.target_epsilon is None and self.budget_epsilon is None and not self.site_budgets:
            raise ValueError("privacy with an explicit noise_multiplier needs a budget: set budget_epsilon or site_budgets")
        return self

    def budget_for(self, site_id: str) -> float:
        """The epsilon a site may spend over the whole run."""
        budget = self.site_budgets.get(site_id, self.budget_epsilon or self.target_epsilon)
        if budget is None:
            raise ConfigError(f"privacy: no budget for site {site_id!r}; set budget_epsilon or site_budgets")
        return budget


# Every variant compress_run can build; `server.compression.variants.RECIPES` says how.
VARIANT_NAMES: tuple[str, ...] = (
    "fp32",
    "fp16",
    "bf16",
    "onnx_fp32",
    "int8_dynamic",
    "int8_static",
    "int8_qat",
    "pruned_unstructured",
    "pruned_structured",
    "pruned_structured_onnx",
    "pruned_structured_int8",
)
BASELINE_VARIANT = "fp32"
DEFAULT_VARIANTS: tuple[str, ...] = tuple(name for name in VARIANT_NAMES if name != "int8_qat")


class CalibrationConfig(Section):
    """Server-held images for int8 calibration and the short fine-tunes: never site data.

    "synthetic" renders `images` mammograms with our generator under `seed`, which must
    differ from the seed of the sites' synthetic data; "folder" reads a public CBIS-DDSM
    tree at `folder` (it must lie outside the run's ``data.root``).
    """

    source: Literal["synthetic", "folder"] = "synthetic"
    folder: Path | None = None
    images: int = Field(default=64, ge=4, le=4096)
    seed: int = Field(default=104729, ge=0)

    @model_validator(mode="after")
    def _folder_matches_source(self) -> "CalibrationConfig":
        if self.source == "folder" and self.folder is None:
            raise ValueError("calibration source 'folder' needs calibration.folder (a CBIS-DDSM tree of public images)")
        if self.source == "synthetic" and self.folder is not None:
            raise ValueError("calibration.folder is only read with source 'folder'; remove it or set source to 'folder'")
        return self


class CompressionConfig(Section):
    """What the aggregator's compression step (`server.compression.compress_run`) builds and measures.

    `sparsity` is the share of convolution and linear weights that global unstructured
    pruning zeroes; `channel_sparsity` the share of channels structured pruning removes
    from every prunable layer. `finetune_epochs` of distillation from the fp32 model on the
    calibration images repair both pruned models and drive quantisation-aware fine-tuning
    (0 skips the repair; int8_qat needs at least one). Latency is timed over
    `latency_runs` single-image calls, throughput over `throughput_runs` batches of
    `throughput_batch`, every backend limited to `threads` CPU threads.
    """

    enabled: bool = False
    variants: tuple[Literal[VARIANT_NAMES], ...] = DEFAULT_VARIANTS  # type: ignore[valid-type]
    sparsity: float = Field(default=0.5, gt=0.0, lt=1.0)
    channel_sparsity: float = Field(default=0.5, gt=0.0, lt=1.0)
    finetune_epochs: int = Field(default=3, ge=0, le=100)
    finetune_learning_rate: float = Field(default=1e-4, gt=0.0, le=1.0)
    calibration: CalibrationConfig = CalibrationConfig()
    latency_runs: int = Field(default=50, ge=3)
    throughput_batch: int = Field(default=16, ge=1)
    throughput_runs: int = Field(default=10, ge=1)
    threads: int = Field(default=1, ge=1, le=256)

    @field_validator("variants")
    @classmethod
    def _baseline_once_each(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if BASELINE_VARIANT not in value:
            raise ValueError(f"variants must include {BASELINE_VARIANT!r}, the baseline every change is measured against")
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"each variant at most once; repeated: {', '.join(repeated)}")
        return value

    @model_validator(mode="after")
    def _qat_needs_epochs(self) -> "CompressionConfig":
        if "int8_qat" in self.variants and self.finetune_epochs == 0:
            raise ValueError("variant 'int8_qat' needs finetune_epochs >= 1 (quantisation-aware fine-tuning)")
        return self


class TrackingConfig(Section):
    """Where runs go and how they are tracked; W&B stays offline unless told otherwise."""

    runs_dir: Path = Path("runs")
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "mammofl"


class ExperimentConfig(Section):
    name: str = Field(default="experiment", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = "auto"
    training: Literal["centralised", "federated"] = "centralised"
    # --- the reference format, key for key ---
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=32, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    num_workers: int = Field(default=4, ge=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    loss: Literal["cross_entropy", "weighted_cross_entropy", "focal"] = "cross_entropy"
    # Public per-class loss weights (normal, benign, malignant) for weighted_cross_entropy and
    # focal; without them weighted_cross_entropy weighs by the training labels' frequencies.
    class_weights: tuple[Annotated[float, Field(ge=0.0)], ...] | None = None
    metrics: tuple[Literal[METRIC_NAMES], ...] = ("accuracy",)  # type: ignore[valid-type]
    encoder: Literal[ENCODER_NAMES] = "smallcnn"  # type: ignore[valid-type]
    validation_split: float = Field(default=0.2, ge=0.0, lt=1.0)
    shuffle: bool = True
    verbose: Literal[0, 1, 2] = 1
    augmentation: AugmentationConfig = AugmentationConfig()
    callbacks: tuple[Callback, ...] = ()
    model_save_dir: str = "export_model"
    # --- our sections ---
    model: ModelConfig = ModelConfig()
    pretraining: PretrainingConfig = PretrainingConfig()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    compression: CompressionConfig = CompressionConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("augmentation", mode="before")
    @classmethod
    def _augmentation_shorthand(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    @field_validator("callbacks")
    @classmethod
    def _one_of_each_callback(cls, value: tuple) -> tuple:
        names = [callback.class_name for callback in value]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"at most one callback of each class; repeated: {', '.join(duplicated)}")
        return value

    @field_validator("class_weights")
    @classmethod
    def _one_weight_per_class(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and (len(value) != 3 or not any(value)):
            raise ValueError("class_weights needs 3 non-negative weights (normal, benign, malignant), not all 0")
        return value

    @model_validator(mode="after")
    def _private_training_releases_only_what_is_accounted(self) -> "ExperimentConfig":
        """Under DP-SGD nothing a site computes from its data may leave it outside the accountant."""
        if not self.privacy.enabled:
            return self
        if self.loss == "weighted_cross_entropy" and self.class_weights is None:
            raise ValueError(
                "loss 'weighted_cross_entropy' with privacy.enabled needs public class_weights (3 numbers): "
                "weights taken from a site's own label counts are an unaccounted release of its data")
        local_epochs = self.federation.rounds * self.federation.local_epochs
        if self.norm == "batch" and self.model.freeze.head_only_epochs < local_epochs:
            raise ValueError(
                "model.norm 'batch' with privacy.enabled: BatchNorm mixes the examples of a batch and its "
                "running statistics leave the site unaccounted; use norm 'group' (or 'auto'), or freeze the "
                f"encoder for the whole run (model.freeze.head_only_epochs >= {local_epochs}, "
                "rounds x local_epochs), which holds its BatchNorm layers fixed")
        monitors = [self.checkpoint.monitor] + ([self.early_stopping.monitor] if self.early_stopping else [])
        if self.training == "federated" and any(monitor.startswith("train_") for monitor in monitors):
            raise ValueError(
                f"callbacks monitor {', '.join(m for m in monitors if m.startswith('train_'))}: a private site does "
                "not release its training metrics; monitor a val_ metric (held-out patients) instead")
        return self

    @model_validator(mode="after")
    def _patient_unit_clips_whole_patients(self) -> "ExperimentConfig":
        """Patient-level DP clips the sum of a patient's gradients: on cached features, so the
        encoder must stay frozen for the whole run (`common.data.features.patient_training_data`)."""
        if not (self.privacy.enabled and self.privacy.unit == "patient"):
            return self
        epochs, counted = ((self.federation.rounds * self.federation.local_epochs, "rounds x local_epochs")
                           if self.training == "federated" else (self.epochs, "epochs"))
        if self.encoder not in PARAMETER_FREE_ENCODERS and self.model.freeze.head_only_epochs < epochs:
            raise ValueError(
                f"privacy.unit 'patient' with encoder {self.encoder!r} trained: patient-level clipping runs on "
                f"cached features of a frozen encoder; use encoder 'scattering' or set "
                f"model.freeze.head_only_epochs >= {epochs} ({counted}), or use privacy.unit 'image'")
        return self

    @model_validator(mode="after")
    def _augmentation_reaches_the_training(self) -> "ExperimentConfig":
        """A frozen encoder's features are cached (`common.data.features`): augmentation then acts
        only through ``augmentation.multiplicity`` views, never silently not at all."""
        augmentation = self.augmentation
        augmenting = augmentation.enabled and augmentation.strength > 0
        epochs, counted = ((self.federation.rounds * self.federation.local_epochs, "rounds x local_epochs")
                           if self.training == "federated" else (self.epochs, "epochs"))
        frozen = self.encoder in PARAMETER_FREE_ENCODERS or self.model.freeze.head_only_epochs >= epochs
        if augmentation.multiplicity > 1 and not augmenting:
            raise ValueError(
                f"augmentation.multiplicity {augmentation.multiplicity} with augmentation off: every view "
                "would be the same image; enable augmentation (strength > 0) or set multiplicity to 1")
        if augmentation.multiplicity > 1 and not frozen:
            raise ValueError(
                f"augmentation.multiplicity {augmentation.multiplicity} needs the encoder frozen for the "
                f"whole run (features are cached): set model.freeze.head_only_epochs >= {epochs} "
                f"({counted}), use encoder 'scattering', or set multiplicity to 1")
        if augmenting and augmentation.multiplicity == 1 and frozen:
            raise ValueError(
                "augmentation is enabled but the encoder is frozen for the whole run, so training uses cached "
                "features of the images themselves and no augmentation would ever be applied; set "
                "augmentation.multiplicity > 1 (augmented views per image) or disable augmentation")
        return self

    @model_validator(mode="after")
    def _federated_evaluation_needs_held_out_patients(self) -> "ExperimentConfig":
        if self.training == "federated" and self.federation.fraction_evaluate > 0 and self.validation_split == 0:
            raise ValueError(
                "federation.fraction_evaluate > 0 with validation_split 0: the sites would evaluate on their "
                "training images; set validation_split > 0 (held-out patients) or fraction_evaluate to 0")
        return self

    @property
    def checkpoint(self) -> ModelCheckpointConfig:
        """The ModelCheckpoint callback's config, or its defaults when none is configured."""
        for callback in self.callbacks:
            if isinstance(callback, ModelCheckpointCallback):
                return callback.config
        return ModelCheckpointConfig()

    @property
    def early_stopping(self) -> EarlyStoppingConfig | None:
        for callback in self.callbacks:
            if isinstance(callback, EarlyStoppingCallback):
                return callback.config
        return None

    @property
    def norm(self) -> Literal["batch", "group"]:
        """BatchNorm mixes samples in a batch, which DP-SGD forbids: "auto" picks GroupNorm then."""
        if self.model.norm != "auto":
            return self.model.norm
        return "group" if self.privacy.enabled else "batch"


def resolve_mode(mode: str, monitor: str) -> Literal["min", "max"]:
    if mode != "auto":
        return mode  # type: ignore[return-value]
    return "min" if monitor.endswith("loss") else "max"


def _check_monitor(value: str) -> str:
    if value not in MONITORABLE:
        raise ValueError(f"unknown monitor {value!r}; allowed: {', '.join(MONITORABLE)}")
    return value


def parse_config(raw: Any, *, source: str = "<config>") -> ExperimentConfig:
    """Validate an already-parsed JSON object; errors name `source`, each key and what is allowed."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object, got {type(raw).__name__}")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, source)) from None


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate one JSON config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.__class__.__name__})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    return parse_config(raw, source=str(path))


_CALLBACK_TAGS: dict[str, type[BaseModel]] = {
    "ModelCheckpoint": ModelCheckpointCallback,
    "EarlyStopping": EarlyStoppingCallback,
}


def _describe_validation_error(exc: ValidationError, source: str) -> str:
    """One line per offending key: its dotted path, what is wrong and what is allowed."""
    problems: dict[str, list[str]] = {}
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"] if not _is_union_branch(part))
        problems.setdefault(key or "(top level)", []).append(_explain(error))
    lines = [f"{source}: invalid configuration ({len(problems)} problem(s))"]
    lines += [f"  - key '{key}': " + "; or ".join(messages) for key, messages in problems.items()]
    return "\n".join(lines)


def _is_union_branch(part: Any) -> bool:
    # Inside a union pydantic names the branch it tried ("ModelCheckpoint", "int",
    # "literal['epoch']", "function-after[...]"): noise to the reader of a config file.
    return isinstance(part, str) and (
        part in _CALLBACK_TAGS or part == "int" or part.startswith("constrained-") or "[" in part
    )


def _explain(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return f"unknown key; allowed here: {', '.join(_allowed_keys(error['loc']))}"
    if error["type"] == "missing":
        return "required but missing"
    message = error["msg"].removeprefix("Value error, ")
    received = error.get("input")
    if isinstance(received, (str, int, float, bool)) or received is None:
        return f"{message} (got {json.dumps(received)})"
    return message


def _allowed_keys(location: tuple) -> list[str]:
    """The keys of the section that holds the last element of `location`."""
    model: type[BaseModel] = ExperimentConfig
    for part in location[:-1]:
        if part in _CALLBACK_TAGS:
            model = _CALLBACK_TAGS[part]
            continue
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field is not None else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return sorted(model.model_fields)


# What a training run's outcome does not depend on: these may differ between an audited and a served run.
_NOT_TRAINING = ("name", "tracking", "compression", "verbose", "device", "num_workers", "callbacks", "model_save_dir")


def training_digest(config: ExperimentConfig) -> str:
    """sha256 of what decides a training run's outcome (not its name, paths of outputs or compression)."""
    settings = json.loads(config.model_dump_json())
    for key in _NOT_TRAINING:
        settings.pop(key, None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

"""Transfer learning: encoder weights from a local file, and the schedule that unfreezes them.

Three kinds of file are understood (nothing is ever downloaded):

* a torchvision state_dict of the same architecture (e.g. the official ``resnet50-*.pth``):
  the ImageNet head (``fc.*`` / ``classifier.*``) is dropped and the first convolution's
  RGB kernel is summed into one grey channel (a grey image repeated on R, G and B gives
  exactly the activations of the summed kernel on the grey image). The encoder then
  normalises with ImageNet's statistics averaged over the three channels (an
  approximation: the per-channel statistics differ by a few percent);
* a ``mammofl-encoder`` checkpoint, written by `save_encoder_checkpoint` (autoencoder
  pretraining);
* a ``mammofl-classifier`` checkpoint: its encoder is taken, its head left behind.

Every file has a provenance (`weights_provenance`): what the weights were learned from. Our
pretraining records it in the file ("public" or "training-data"); a file we did not write
is "external" (a torchvision or other local file, named by its sha256). A federated run
refuses weights learned from site images or of unrecorded origin (`require_site_free_weights`):
those images would reach the model outside the accounted DP-SGD.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from common.errors import ConfigError, ModelError
from common.models.classifier import (
    CHECKPOINT_FORMAT as CLASSIFIER_FORMAT,
    MammoClassifier,
    load_checkpoint,
    portable_state_dict,
    read_weights_file,
    write_weights_file,
)
from common.models.encoders import Encoder

ENCODER_FORMAT = "mammofl-encoder"
ENCODER_VERSION = 1
_ENCODER_KEYS = frozenset({"encoder", "norm", "state_dict"})

# ImageNet's per-channel statistics (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225), averaged.
IMAGENET_GREY_MEAN = 0.449
IMAGENET_GREY_STD = 0.226

_TORCHVISION_HEADS = ("fc.", "classifier.")
# Official DenseNet files predate torchvision's module names: "norm.1" is now "norm1".
_LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_KEYS_SHOWN = 5


@dataclass(frozen=True)
class TransferReport:
    """What `load_pretrained_encoder` did with each tensor of the file.

    `skipped` holds normalisation tensors that cannot carry over because the file and the
    encoder use different norms (BatchNorm running statistics mean nothing to GroupNorm,
    and vice versa); those layers keep their fresh initialisation.
    """

    source: Path
    source_format: str
    loaded: tuple[str, ...]
    skipped: tuple[str, ...]
    adapted: tuple[str, ...]


@dataclass(frozen=True)
class _SourceWeights:
    """A file's encoder tensors, already renamed to our encoder's state_dict keys."""

    source_format: str
    norm: str
    state_dict: dict[str, Tensor]
    adapted: tuple[str, ...] = ()


PROVENANCE_SOURCES = ("public", "training-data")
SITE_FREE_SOURCES = ("public", "external")


@dataclass(frozen=True)
class Provenance:
    """Where a weights file's weights were learned: "public", "training-data", "external" or "unrecorded"."""

    path: str
    source: str
    sha256: str
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "source": self.source, "sha256": self.sha256, "detail": self.detail}


def save_encoder_checkpoint(encoder: Encoder, path: Path, *, source: str = "training-data", detail: str = "") -> None:
    """Write `encoder` alone, in the format `load_pretrained_encoder` reads, with its provenance.

    `source` is what the encoder learned from: "public" (no site's images) or
    "training-data" (the configured data's training images: fine centrally, refused by a
    federated run).
    """
    if source not in PROVENANCE_SOURCES:
        raise ModelError(f"encoder provenance {source!r} is invalid; valid: {', '.join(PROVENANCE_SOURCES)}")
    payload = {
        "format": ENCODER_FORMAT,
        "version": ENCODER_VERSION,
        "encoder": encoder.name,
        "norm": encoder.norm,
        "state_dict": portable_state_dict(encoder),
        "provenance": {"source": source, "detail": detail},
    }
    write_weights_file(payload, path)


def weights_provenance(path: Path) -> Provenance:
    """What the weights in `path` were learned from, and the file's sha256."""
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    payload = read_weights_file(path)
    kind = payload.get("format") if isinstance(payload, Mapping) else None
    if kind in (ENCODER_FORMAT, CLASSIFIER_FORMAT):
        recorded = payload.get("provenance")
        if isinstance(recorded, Mapping) and recorded.get("source") in PROVENANCE_SOURCES:
            return Provenance(str(path), str(recorded["source"]), digest, str(recorded.get("detail", "")))
        return Provenance(str(path), "unrecorded", digest, f"a {kind} file without a provenance record")
    return Provenance(str(path), "external", digest, "a local weights file mammofl did not write")


def require_site_free_weights(path: Path) -> Provenance:
    """The provenance of `path` if a federated run may start from it; else a ConfigError saying why."""
    if not Path(path).is_file():
        raise ConfigError(f"model.pretrained: weights file {path} not found")
    provenance = weights_provenance(path)
    if provenance.source not in SITE_FREE_SOURCES:
        raise ConfigError(
            f"model.pretrained {path}: its weights were learned from {provenance.source} "
            f"({provenance.detail or 'the sites pooled images'}); a federated run starts only from weights that saw "
            "no site image: pretrain with pretraining.source 'public' (mammofl pretrain) or give an external file")
    return provenance


def _torchvision_key(key: str) -> str:
    return _LEGACY_DENSENET_KEY.sub(r"\1\2", key)


def _from_torchvision(state_dict: Mapping[str, Tensor], encoder: Encoder) -> _SourceWeights:
    """Rename into our layout, drop the ImageNet head, sum the RGB first conv, set ImageNet stats."""
    weights = {
        f"trunk.{_torchvision_key(key)}": tensor
        for key, tensor in state_dict.items()
        if not key.startswith(_TORCHVISION_HEADS)
    }
    first_conv = f"{encoder.input_conv}.weight"
    adapted: tuple[str, ...] = ()
    if first_conv in weights and weights[first_conv].shape[1] == 3:
        weights[first_conv] = weights[first_conv].sum(dim=1, keepdim=True)
        adapted = (first_conv,)
    weights["input_mean"] = torch.tensor(IMAGENET_GREY_MEAN)
    weights["input_std"] = torch.tensor(IMAGENET_GREY_STD)
    return _SourceWeights("torchvision", "batch", weights, adapted)


def _from_encoder_checkpoint(payload: Mapping[str, Any], encoder: Encoder, path: Path) -> _SourceWeights:
    if payload.get("version") != ENCODER_VERSION:
        raise ModelError(
            f"{path}: {ENCODER_FORMAT} version {payload.get('version')!r} is not supported; "
            f"valid: {ENCODER_VERSION}"
        )
    missing = sorted(_ENCODER_KEYS - payload.keys())
    if missing:
        raise ModelError(f"{path}: incomplete {ENCODER_FORMAT} checkpoint; missing {', '.join(missing)}")
    _check_same_architecture(payload["encoder"], encoder, path)
    return _SourceWeights(ENCODER_FORMAT, payload["norm"], dict(payload["state_dict"]))


def _from_classifier_checkpoint(path: Path, encoder: Encoder) -> _SourceWeights:
    classifier, _ = load_checkpoint(path)
    _check_same_architecture(classifier.encoder.name, encoder, path)
    return _SourceWeights(CLASSIFIER_FORMAT, classifier.encoder.norm, classifier.encoder.state_dict())


def _check_same_architecture(source_name: Any, encoder: Encoder, path: Path) -> None:
    if source_name != encoder.name:
        raise ModelError(f"{path}: holds a {source_name!r} encoder, expected {encoder.name!r}")


def _is_state_dict(payload: Any) -> bool:
    return (
        isinstance(payload, Mapping)
        and bool(payload)
        and all(isinstance(tensor, Tensor) for tensor in payload.values())
    )


def _source_weights(payload: Any, encoder: Encoder, path: Path) -> _SourceWeights:
    kind = payload.get("format") if isinstance(payload, Mapping) else None
    if kind == ENCODER_FORMAT:
        return _from_encoder_checkpoint(payload, encoder, path)
    if kind == CLASSIFIER_FORMAT:
        return _from_classifier_checkpoint(path, encoder)
    if _is_state_dict(payload):
        return _from_torchvision(payload, encoder)
    raise ModelError(
        f"{path}: not a weights file for encoder {encoder.name!r}; expected a torchvision state_dict "
        f"of that architecture, a {ENCODER_FORMAT} or a {CLASSIFIER_FORMAT} checkpoint"
    )


def _norm_layer_names(encoder: Encoder) -> set[str]:
    return {
        name for name, module in encoder.named_modules() if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm))
    }


def _split_norm_tensors(
    weights: dict[str, Tensor], encoder: Encoder
) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """Weights without the tensors of normalisation layers, and the names of those left out."""
    norm_layers = _norm_layer_names(encoder)
    skipped = tuple(sorted(key for key in weights if key.rpartition(".")[0] in norm_layers))
    kept = {key: tensor for key, tensor in weights.items() if key not in skipped}
    return kept, skipped


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > _KEYS_SHOWN else shown


def _check_fit(weights: dict[str, Tensor], expected: dict[str, Tensor], encoder: Encoder, path: Path) -> None:
    # Files older than BatchNorm's batch counter lack it; BatchNorm fills it in on load.
    absent = expected.keys() - weights.keys()
    missing = sorted(key for key in absent if not key.endswith(".num_batches_tracked"))
    unexpected = sorted(weights.keys() - expected.keys())
    reshaped = sorted(
        f"{key} {list(weights[key].shape)} vs {list(expected[key].shape)}"
        for key in weights.keys() & expected.keys()
        if weights[key].shape != expected[key].shape
    )
    problems = [
        f"{label}: {_first(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", reshaped))
        if keys
    ]
    if problems:
        raise ModelError(
            f"{path}: weights do not fit encoder {encoder.name!r} (norm {encoder.norm!r}); "
            + "; ".join(problems)
        )


def load_pretrained_encoder(encoder: Encoder, path: Path) -> TransferReport:
    """Load a local weights file into `encoder` in place; all-or-nothing.

    Raises ModelError naming the file, the expected encoder and the first mismatching
    keys when the file holds another architecture.
    """
    path = Path(path)
    source = _source_weights(read_weights_file(path), encoder, path)
    expected = encoder.state_dict()
    weights, skipped = dict(source.state_dict), ()
    if source.norm != encoder.norm:
        weights, skipped = _split_norm_tensors(weights, encoder)
        expected, _ = _split_norm_tensors(expected, encoder)
    _check_fit(weights, expected, encoder, path)
    encoder.load_state_dict(weights, strict=False)
    return TransferReport(path, source.source_format, tuple(sorted(weights)), skipped, source.adapted)


@dataclass(frozen=True)
class FreezeSchedule:
    """Which parameters train in a given epoch (0-based) of transfer learning.

    For the first `head_only_epochs` only the head trains; afterwards the head and the
    last `unfreeze_last_blocks` encoder blocks (None: all of them; see `Encoder.blocks`).

    `apply` only sets requires_grad, so the optimizer is built once over *all* parameters:
    a frozen parameter gets no gradient (grad is None) and every torch optimizer skips it,
    Adam's moments included. BatchNorm layers in frozen blocks still update their running
    statistics in train mode.
    """

    head_only_epochs: int = 0
    unfreeze_last_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.head_only_epochs < 0:
            raise ConfigError(
                f"freeze.head_only_epochs {self.head_only_epochs} is invalid; valid: an integer >= 0"
            )
        if self.unfreeze_last_blocks is not None and self.unfreeze_last_blocks < 1:
            raise ConfigError(
                f"freeze.unfreeze_last_blocks {self.unfreeze_last_blocks} is invalid; "
                "valid: an integer >= 1 or null (all blocks)"
            )

    def trainable_blocks(self, blocks: list[nn.Module], epoch: int) -> list[nn.Module]:
        """The encoder blocks that train in `epoch`."""
        if epoch < self.head_only_epochs:
            return []
        if self.unfreeze_last_blocks is None:
            return blocks
        return blocks[max(0, len(blocks) - self.unfreeze_last_blocks):]

    def apply(self, model: MammoClassifier, epoch: int) -> None:
        """Set requires_grad on every parameter of `model` for `epoch` (0-based)."""
        model.encoder.requires_grad_(False)
        for block in self.trainable_blocks(model.encoder.blocks(), epoch):
            block.requires_grad_(True)
        model.head.requires_grad_(True)

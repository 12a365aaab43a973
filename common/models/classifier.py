"""The mammogram classifier: a registry encoder and a 3-logit head, and its checkpoint file.

The three classes are `common.data.records.CLASS_NAMES` (normal, benign, malignant). The
two clinical questions, "is there a lesion?" and "is it malignant?", are read off the same
3-class output (`readouts`) rather than trained as separate heads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from common.data.records import BENIGN, CLASS_NAMES, MALIGNANT, NORMAL
from common.errors import ModelError
from common.models.encoders import Encoder, Norm, build_encoder

CHECKPOINT_FORMAT = "mammofl-classifier"
CHECKPOINT_VERSION = 1
_RESERVED_KEYS = frozenset({"format", "version", "spec", "state_dict"})
_SPEC_KEYS = frozenset({"encoder", "norm", "dropout", "num_classes"})
_PLAIN_SCALARS = (str, int, float, bool, type(None), Tensor)

# Smoothing of P(malignant | abnormal): a neutral 0.5 when the model sees no abnormality at all.
_TYPE_EPSILON = 1e-6


class MammoClassifier(nn.Module):
    """Images [N, 1, S, S] in [0, 1] -> logits [N, num_classes].

    `spec` is everything `build_classifier` needs to rebuild the architecture, so a
    checkpoint holding it and the state_dict is self-contained.
    """

    def __init__(self, encoder: Encoder, *, dropout: float, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(encoder.out_features, num_classes))
        self.dropout = dropout
        self.num_classes = num_classes

    @property
    def spec(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder.name,
            "norm": self.encoder.norm,
            "dropout": self.dropout,
            "num_classes": self.num_classes,
        }

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encoder(images))


def build_classifier(
    encoder_name: str, *, norm: Norm = "batch", dropout: float = 0.2, num_classes: int = len(CLASS_NAMES)
) -> MammoClassifier:
    """A freshly initialised classifier on the named registry encoder."""
    if not 0.0 <= dropout < 1.0:
        raise ModelError(f"classifier dropout {dropout} is invalid; valid: 0 <= dropout < 1")
    if num_classes < 2:
        raise ModelError(f"classifier num_classes {num_classes} is invalid; valid: an integer >= 2")
    return MammoClassifier(build_encoder(encoder_name, norm=norm), dropout=dropout, num_classes=num_classes)


def readouts(probs: Tensor) -> dict[str, Tensor]:
    """The two clinical scores derived from 3-class probabilities [N, 3] (rows sum to 1).

    "presence": P(abnormal) = 1 - P(normal), the screening question.
    "type": P(malignant | abnormal) = p_malignant / (p_benign + p_malignant), the
    diagnostic question; smoothed by a tiny epsilon so it is 0.5 rather than 0/0 when the
    model puts (almost) all its mass on normal.
    """
    if probs.ndim != 2 or probs.shape[1] != len(CLASS_NAMES):
        raise ModelError(
            f"readouts expect probabilities of shape [N, {len(CLASS_NAMES)}] "
            f"(classes {', '.join(CLASS_NAMES)}), got {list(probs.shape)}"
        )
    benign, malignant = probs[:, BENIGN], probs[:, MALIGNANT]
    return {
        "presence": 1.0 - probs[:, NORMAL],
        "type": (malignant + _TYPE_EPSILON) / (benign + malignant + 2 * _TYPE_EPSILON),
    }


def _check_plain(key: str, value: Any) -> None:
    """Refuse values that `torch.load(weights_only=True)` could not read back."""
    if isinstance(value, Mapping):
        for item_key, item in value.items():
            _check_plain(f"{key}.{item_key}", item)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(f"{key}[{index}]", item)
    elif not isinstance(value, _PLAIN_SCALARS):
        raise ModelError(
            f"checkpoint extra {key!r} is a {type(value).__name__}; valid: str, int, float, bool, "
            "None, tensors, and lists/tuples/dicts of them"
        )


def save_checkpoint(model: MammoClassifier, path: Path, **extra: Any) -> None:
    """Write `model` with its spec; `extra` (class_names, image_size, metrics...) rides along.

    Everything stored is plain data, so `load_checkpoint` reads it without unpickling code.
    """
    clashes = _RESERVED_KEYS & extra.keys()
    if clashes:
        raise ModelError(f"checkpoint extra keys {sorted(clashes)} are reserved; use other names")
    for key, value in extra.items():
        _check_plain(key, value)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "spec": model.spec,
        "state_dict": portable_state_dict(model),
        **extra,
    }
    write_weights_file(payload, path)


def portable_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """`module`'s state_dict as detached CPU tensors, loadable on any machine."""
    return {key: tensor.detach().cpu() for key, tensor in module.state_dict().items()}


def write_weights_file(payload: Mapping[str, Any], path: Path) -> None:
    """Save `payload` (plain data and tensors only), creating the folder if needed.

    The file is written beside `path` and renamed over it, so a reader (or a resumed run whose
    aggregator was killed mid-save) finds the previous file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        torch.save(dict(payload), partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def read_weights_file(path: Path) -> Any:
    """Unpickle a weights file in `weights_only` mode: data only, no code from the file runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: weights file not found") from None
    except Exception as error:
        raise ModelError(
            f"{path}: not a readable weights file (expected a torch.save'd state_dict or "
            f"mammofl checkpoint of plain tensors and values): {error}"
        ) from error


def _checked_payload(payload: Any, path: Path) -> Mapping[str, Any]:
    """`payload` if it is a readable classifier checkpoint, else a ModelError saying why not."""
    if not isinstance(payload, Mapping) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint (written by save_checkpoint)")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ModelError(
            f"{path}: {CHECKPOINT_FORMAT} version {payload.get('version')!r} is not supported; "
            f"valid: {CHECKPOINT_VERSION}"
        )
    spec = payload.get("spec")
    if not isinstance(spec, Mapping) or not _SPEC_KEYS <= spec.keys() or "state_dict" not in payload:
        raise ModelError(
            f"{path}: incomplete {CHECKPOINT_FORMAT} checkpoint; expected 'state_dict' and a 'spec' "
            f"with {', '.join(sorted(_SPEC_KEYS))}"
        )
    return payload


def load_checkpoint(path: Path) -> tuple[MammoClassifier, dict[str, Any]]:
    """Rebuild the classifier saved by `save_checkpoint`, in eval mode, and its extras."""
    payload = _checked_payload(read_weights_file(path), path)
    spec = payload["spec"]
    model = build_classifier(
        spec["encoder"], norm=spec["norm"], dropout=spec["dropout"], num_classes=spec["num_classes"]
    )
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise ModelError(
            f"{path}: weights do not match the checkpoint's spec {dict(spec)}: {error}"
        ) from error
    extra = {key: value for key, value in payload.items() if key not in _RESERVED_KEYS}
    return model.eval(), extra

"""Frozen-encoder features, computed once per image and view and cached on disk.

While a site's encoder is frozen (always, for the parameter-free scattering encoder; during
``model.freeze.head_only_epochs`` for a pretrained CNN) every epoch would push the same
images through the same encoder again. Computed once, an epoch over the features costs
milliseconds, so DP-SGD can afford the large logical batches and many steps it needs.

Augmentation multiplicity (De et al. 2022) lives here too: ``augmentation.multiplicity`` K
gives each image K views -- view 0 the image itself, views 1..K-1 augmentations drawn from a
seed of (config seed, image, view), so a cached view is the same view every time. Training
averages an example's loss over its views *before* per-example clipping, so one example
still moves the update by at most the clip norm (see `clients.local_training`).

Under DP nothing here is released: a feature is a fixed function of one image (the
encoder's weights come from no site), and only gradients clipped per example and noised
leave the site.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from common.config import ExperimentConfig
from common.data.dataset import MammogramDataset, save_atomically
from common.data.partition import group_by_patient
from common.data.records import ImageRecord
from common.data.transforms import build_train_transform
from common.data.pipeline import make_loader
from common.models.encoders import Encoder
from common.training import show_progress

FEATURE_CACHE_VERSION = 1
_BATCH = 64


def encoder_digest(encoder: Encoder) -> str:
    """sha256 of the encoder's architecture name and every parameter and buffer (fixed filters too)."""
    digest = hashlib.sha256(f"{encoder.name}/{encoder.norm}".encode())
    tensors = dict(encoder.named_parameters()) | dict(encoder.named_buffers())
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """`encoded_views` of one encoder and configuration; one .npy [views, features] per image."""

    def __init__(self, encoder: Encoder, config: ExperimentConfig, *, device: torch.device,
                 views: int | None = None) -> None:
        self.encoder = encoder
        self.config = config
        self.device = device
        self.views = config.augmentation.multiplicity if views is None else views
        self._dataset_settings = {"size": config.model.image_size, "mode": config.data.mode}
        self._transform = build_train_transform(config.augmentation.strength, enabled=config.augmentation.enabled)
        self._settings = json.dumps({
            "version": FEATURE_CACHE_VERSION, "encoder": encoder_digest(encoder), "views": self.views,
            "augmentation": config.augmentation.model_dump(), "seed": config.seed, **self._dataset_settings,
        }, sort_keys=True)
        cache_dir = config.data.cache_dir
        self.directory = None if cache_dir is None else Path(cache_dir) / "features"

    def encoded_views(self, records: Sequence[ImageRecord]) -> Tensor:
        """Features [len(records), views, out_features] (float32, on the CPU)."""
        dataset = MammogramDataset(records, image_size=self.config.model.image_size, mode=self.config.data.mode,
                                   cache_dir=self.config.data.cache_dir)
        images = [dataset.cache_key(record) for record in dataset.records]
        keys = [self._key(image) for image in images]
        found: dict[int, np.ndarray] = {}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            for index, key in enumerate(keys):
                path = self.directory / f"{key}.npy"
                if path.is_file():
                    found[index] = np.load(path)
        missing = [index for index in range(len(keys)) if index not in found]
        chunks = range(0, len(missing), _BATCH)
        # A bar only on a terminal (a site's process in a simulation has none).
        for start in tqdm(chunks, desc="features", unit="batch", leave=False,
                          disable=not show_progress(self.config.verbose) or len(chunks) < 2):
            chunk = missing[start:start + _BATCH]
            computed = self._compute(dataset, [(index, images[index]) for index in chunk])
            for index, array in zip(chunk, computed):
                found[index] = array
                if self.directory is not None:
                    save_atomically(self.directory / f"{keys[index]}.npy", array)
        if not keys:
            return torch.zeros(0, self.views, self.encoder.out_features)
        return torch.from_numpy(np.stack([found[index] for index in range(len(keys))]))

    def _key(self, image_key: str) -> str:
        return hashlib.sha256(f"{image_key}/{self._settings}".encode()).hexdigest()

    def _view(self, image: Tensor, image_key: str, view: int) -> Tensor:
        """View `view` of an image: the same augmentation whatever the encoder."""
        if view == 0:
            return image
        seed_text = f"{image_key}/{self.config.seed}/{view}"
        seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._transform(image)

    @torch.no_grad()
    def _compute(self, dataset: MammogramDataset, items: list[tuple[int, str]]) -> list[np.ndarray]:
        images = []
        for index, key in items:
            image = dataset[index][0]
            images.extend(self._view(image, key, view) for view in range(self.views))
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            features = self.encoder(torch.stack(images).to(self.device)).float().cpu()
        finally:
            self.encoder.train(was_training)
        return list(features.reshape(len(items), self.views, -1).numpy())


class ViewsHead(nn.Module):
    """The classifier's head on cached features of K views: [B, K, features] -> logits [B, K, classes].

    The batch dimension stays the examples': Opacus' per-sample gradient of the head's
    Linear layer sums over the view dimension, so each example contributes one gradient
    (its views' average, with `ViewsLoss`), clipped to the clip norm as a whole. Flattening
    the views into the batch would make every view an "example" and multiply one image's
    influence by K.
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: Tensor) -> Tensor:
        return self.head(features)


class ViewsLoss(nn.Module):
    """`loss_fn` over every (example, view) pair: with a mean reduction each example's term is
    the mean of its views' losses, and the batch term their mean (De et al.'s multiplicity)."""

    def __init__(self, loss_fn: nn.Module) -> None:
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        views = logits.shape[1]
        return self.loss_fn(logits.flatten(0, 1), labels.repeat_interleave(views))


class PatientLoss(nn.Module):
    """`loss_fn` per patient: [B, P, K, classes] logits, [B, P] labels (-1 pads a patient's missing images).

    Each patient's term is the *sum* over their images of the image's mean loss over views,
    and the batch term the mean over patients: Opacus' per-sample gradient is then the sum of
    a patient's per-image gradients, clipped to the clip norm as one (patient-level DP).
    """

    def __init__(self, loss_fn: nn.Module) -> None:
        super().__init__()
        self.loss_fn = copy.deepcopy(loss_fn)
        self.loss_fn.reduction = "none"  # every private loss honours it (`common.losses`)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        patients, images, views, classes = logits.shape
        if patients == 0:  # an empty Poisson batch still takes its (noise-only) step
            return logits.sum() * 0.0
        valid = labels >= 0
        terms = torch.zeros(patients, images, views, dtype=logits.dtype, device=logits.device)
        chosen = logits[valid]  # [n_valid, K, classes]
        per_view = self.loss_fn(chosen.flatten(0, 1), labels[valid].repeat_interleave(views))
        terms[valid] = per_view.reshape(-1, views)
        return terms.mean(dim=2).sum(dim=1).mean()


def patient_training_data(model: nn.Module, records: Sequence[ImageRecord], config: ExperimentConfig, *,
                          device: torch.device, generator: torch.Generator | None) -> tuple[ViewsHead, DataLoader]:
    """The head and a loader of patients: (features [B, P, views, F], labels [B, P], -1 padding).

    For ``privacy.unit`` "patient": Opacus samples patients (its sample rate is then
    patients per batch over patients) and clips each patient's summed gradient; train it
    with `PatientLoss`. ``batch_size`` counts patients.
    """
    features = FeatureCache(model.encoder, config, device=device).encoded_views(records)
    patients = list(group_by_patient(records).values())
    index = {id(record): position for position, record in enumerate(records)}
    most = max((len(images) for images in patients), default=1)
    grouped = torch.zeros(len(patients), most, *features.shape[1:])
    labels = torch.full((len(patients), most), -1, dtype=torch.long)
    for row, images in enumerate(patients):
        for column, record in enumerate(images):
            grouped[row, column] = features[index[id(record)]]
            labels[row, column] = record.label
    loader = DataLoader(TensorDataset(grouped, labels), batch_size=config.batch_size, generator=generator)
    return ViewsHead(model.head), loader


def privacy_units(records: Sequence[ImageRecord], unit: str) -> int:
    """How many units DP protects in `records`: images, or patients."""
    return len(group_by_patient(records)) if unit == "patient" else len(records)


def _labels(records: Sequence[ImageRecord]) -> Tensor:
    return torch.tensor([record.label for record in records], dtype=torch.long)


def view_training_data(model: nn.Module, records: Sequence[ImageRecord], config: ExperimentConfig, *,
                       device: torch.device, shuffle: bool, generator: torch.Generator | None
                       ) -> tuple[ViewsHead, DataLoader]:
    """The head of `model` (frozen encoder) and a loader of (features [B, views, F], labels) to train it on.

    Train it with `ViewsLoss` around the loss. `shuffle` only matters without DP (Opacus
    replaces the sampler with Poisson sampling from `generator`).
    """
    features = FeatureCache(model.encoder, config, device=device).encoded_views(records)
    loader = DataLoader(TensorDataset(features, _labels(records)), batch_size=config.batch_size,
                        shuffle=shuffle and config.shuffle, generator=generator)
    return ViewsHead(model.head), loader


def evaluation_input(model: nn.Module, records: Sequence[ImageRecord], config: ExperimentConfig, *,
                     device: torch.device) -> tuple[nn.Module, DataLoader]:
    """What evaluates `model` on `records`: (module, loader) for `common.training.evaluate`.

    For an encoder without parameters, the head on the cached features of the images
    themselves (what the whole model computes, without recomputing the transform every
    round); otherwise the model on the images.
    """
    if model.encoder.trainable:
        return model, make_loader(list(records), config, train=False)
    features = FeatureCache(model.encoder, config, device=device, views=1).encoded_views(records)[:, 0]
    return model.head, DataLoader(TensorDataset(features, _labels(records)), batch_size=config.batch_size)

"""The torch Dataset every trainer reads mammograms through.

Decoding a full-field DICOM costs far more than a training step on its
downsized result, so the preprocessed array can be cached on disk (one .npy per
image, keyed by the file's identity and the preprocessing settings) and later
epochs skip the decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common.data.images import (
    Box,
    bounding_box,
    breast_on_right,
    breast_region,
    crop,
    pad_to_square,
    preprocess,
    read_image,
    read_mask,
    resize,
    whole_image_box,
)
from common.data.records import ImageRecord
from common.errors import DataError

MODES = ("full", "roi")
# ROI crops add this fraction of the lesion box's longer side on every side, for context.
ROI_MARGIN = 0.25
# Smallest ROI crop side, as a fraction of the breast box's shorter side; normals get
# exactly this size. One scale floor for both keeps the crop's zoom from telling
# normals from tiny calcification clusters.
MIN_CROP_FRACTION = 0.25
# Bump when preprocessing changes so stale cache entries are never read.
CACHE_VERSION = 1

Transform = Callable[[torch.Tensor], torch.Tensor]


class MammogramDataset(Dataset[tuple[torch.Tensor, int]]):
    """Records as (float32 tensor [1, S, S] in [0, 1], label) pairs.

    `mode` "full" feeds the whole breast; "roi" a square crop around the union of
    the record's ROI masks (records without masks, normals above all, get a crop
    of similar size at a deterministic random place in the breast). `transform`
    (augmentation) runs after the cache, on the tensor. Picklable, so it works
    with DataLoader workers; cache writes are atomic, so workers may share a cache.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        image_size: int,
        transform: Transform | None = None,
        mode: str = "full",
        cache_dir: Path | str | None = None,
    ) -> None:
        if mode not in MODES:
            raise DataError(f"unknown dataset mode {mode!r}; valid: {', '.join(MODES)}")
        if image_size < 1:
            raise DataError(f"image_size must be a positive number of pixels, got {image_size}")
        self.records = list(records)
        self.image_size = image_size
        self.transform = transform
        self.mode = mode
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    @property
    def labels(self) -> list[int]:
        """Every record's label, in dataset order (for class weights and samplers)."""
        return [record.label for record in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        record = self.records[index]
        image = torch.from_numpy(self._array(record)).unsqueeze(0)
        if self.transform is not None:
            image = self.transform(image)
        return image, record.label

    def _array(self, record: ImageRecord) -> np.ndarray:
        if self.cache_dir is None:
            return self._prepare(record)
        cached = self.cache_dir / f"{self.cache_key(record)}.npy"
        if cached.is_file():
            return np.load(cached)
        array = self._prepare(record)
        save_atomically(cached, array)
        return array

    def _prepare(self, record: ImageRecord) -> np.ndarray:
        image = read_image(record.image_path)
        if self.mode == "full":
            return preprocess(image, self.image_size)
        return roi_crop(image, record, self.image_size)

    def cache_key(self, record: ImageRecord) -> str:
        """Changes whenever the image (or, in ROI mode, a mask) file or the settings change."""
        files = [record.image_path] + (list(record.roi_mask_paths) if self.mode == "roi" else [])
        identity = [_file_identity(path) for path in files]
        settings = {"mode": self.mode, "size": self.image_size, "version": CACHE_VERSION}
        text = json.dumps([identity, settings], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def roi_crop(image: np.ndarray, record: ImageRecord, size: int) -> np.ndarray:
    """A square (size, size) crop around the record's lesions, breast oriented to the left."""
    breast = breast_region(image)
    breast_box = bounding_box(breast) or whole_image_box(image)
    shortest = min(breast_box.bottom - breast_box.top, breast_box.right - breast_box.left)
    min_side = max(1, round(shortest * MIN_CROP_FRACTION))
    box = _lesion_box(image, record.roi_mask_paths, min_side) or _normal_box(
        breast, min_side, record.image_path
    )
    patch = crop(image, box)
    if breast_on_right(image):
        patch = np.fliplr(patch)
    return resize(pad_to_square(patch), size)


def _lesion_box(image: np.ndarray, mask_paths: Sequence[Path], min_side: int) -> Box | None:
    """Square box around the union of the masks' foreground plus margin; None without any."""
    boxes = [box for box in (_mask_box(path, image.shape) for path in mask_paths) if box]
    if not boxes:
        return None
    union = Box(
        min(b.top for b in boxes),
        max(b.bottom for b in boxes),
        min(b.left for b in boxes),
        max(b.right for b in boxes),
    )
    longer = max(union.bottom - union.top, union.right - union.left)
    side = max(min_side, round(longer * (1 + 2 * ROI_MARGIN)))
    centre = ((union.top + union.bottom) // 2, (union.left + union.right) // 2)
    return _square_box(centre, side, image.shape)


def _mask_box(path: Path, image_shape: tuple[int, ...]) -> Box | None:
    """The mask's foreground box in image coordinates.

    Some CBIS-DDSM masks differ in size from their mammogram by a few pixels, so
    the box is scaled rather than assumed to share the image's grid.
    """
    mask = read_mask(path)
    box = bounding_box(mask)
    if box is None:
        return None
    row_scale = image_shape[0] / mask.shape[0]
    column_scale = image_shape[1] / mask.shape[1]
    top, left = int(box.top * row_scale), int(box.left * column_scale)
    bottom = max(top + 1, round(box.bottom * row_scale))
    right = max(left + 1, round(box.right * column_scale))
    return Box(top, bottom, left, right)


def _normal_box(breast: np.ndarray, side: int, image_path: Path) -> Box:
    """A square of `side` centred on a breast pixel drawn with a seed from the file path.

    The seed comes from the path (not Python's salted hash) so every worker and
    every run crops the same place.
    """
    rng = np.random.default_rng(zlib.crc32(str(image_path).encode()))
    candidates = np.flatnonzero(breast) if breast.any() else np.arange(breast.size)
    centre = np.unravel_index(int(rng.choice(candidates)), breast.shape)
    return _square_box((int(centre[0]), int(centre[1])), side, breast.shape)


def _square_box(centre: tuple[int, int], side: int, shape: tuple[int, ...]) -> Box:
    """A box of `side` around `centre`, shifted (and if needed shrunk) to lie inside `shape`."""
    height, width = min(side, shape[0]), min(side, shape[1])
    top = int(np.clip(centre[0] - height // 2, 0, shape[0] - height))
    left = int(np.clip(centre[1] - width // 2, 0, shape[1] - width))
    return Box(top, top + height, left, left + width)


def _file_identity(path: Path) -> list[str | int]:
    try:
        stat = path.stat()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: image file no longer exists") from exc
    return [str(path.resolve()), stat.st_mtime_ns, stat.st_size]


def save_atomically(target: Path, array: np.ndarray) -> None:
    """Write to a temporary file beside `target`, then rename: readers never see half a file."""
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, suffix=".npy.tmp")
    try:
        with os.fdopen(descriptor, "wb") as stream:
            np.save(stream, array)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise

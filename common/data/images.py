"""Reading mammograms into one pixel convention, and the geometry every model input shares.

Whatever the source (DICOM of any bit depth and photometric interpretation,
compressed or not, or a JPEG/PNG export), `read_image` returns a float32 HxW
array in [0, 1] where 1 is bright (dense) tissue. `preprocess` then turns that
into the fixed square input of the models: breast on the left, cropped to the
breast, padded without distortion and resized.

Error messages name the file and the attribute at fault, never a value read
from it (patient data lives in those headers).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from scipy import ndimage

from common import dicom_logging  # noqa: F401  (pydicom's logs quote header values: withheld)
from common.errors import DataError, DicomReadError

RASTER_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
GRAYSCALE_INTERPRETATIONS = ("MONOCHROME1", "MONOCHROME2")
# pydicom converts YBR_* to RGB while decoding, so all of these arrive as RGB.
COLOR_INTERPRETATIONS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
# ITU-R BT.601 luma weights: how a colour export is reduced to one channel.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
# Fraction of the intensity range above which a pixel counts as breast, not background.
BACKGROUND_THRESHOLD = 0.1


class Box(NamedTuple):
    """A rectangle of pixel rows [top, bottom) and columns [left, right)."""

    top: int
    bottom: int
    left: int
    right: int


def read_image(path: Path | str) -> np.ndarray:
    """Read a mammogram as float32 HxW in [0, 1], 1 = bright tissue.

    JPEG and PNG files (by suffix) are read with Pillow, everything else as DICOM.
    """
    path = Path(path)
    if is_raster(path):
        return read_raster(path)
    return read_dicom(path)


def read_image_bytes(data: bytes, *, raster: bool, name: str = "image") -> np.ndarray:
    """`read_image` for a file already in memory: a JPEG/PNG when `raster`, else DICOM.

    `name` stands for the file in error messages.
    """
    source = io.BytesIO(data)
    if raster:
        return _raster_to_unit(source, name)
    return _dicom_to_unit(_read_dataset(source, name, stop_before_pixels=False, tags=None), name)


def is_raster(path: Path) -> bool:
    """Whether `path` names a JPEG/PNG export rather than a DICOM file."""
    return path.suffix.lower() in RASTER_SUFFIXES


def read_mask(path: Path | str) -> np.ndarray:
    """Read a binary ROI mask (DICOM or raster) as a boolean HxW array."""
    return read_image(path) > 0.5


def read_dicom_header(path: Path | str, tags: Sequence[str] | None = None) -> Dataset:
    """Read a DICOM file's attributes without its pixel data (cheap on large mammograms).

    `tags` restricts reading to those keywords; raises DicomReadError when the
    file is missing, truncated or not DICOM.
    """
    path = Path(path)
    return _read_dataset(path, path, stop_before_pixels=True, tags=tags)


def read_dicom(path: Path | str) -> np.ndarray:
    """Decode a DICOM image and map it to float32 [0, 1], 1 = bright tissue.

    The Modality LUT (rescale) and then the VOI LUT or window are applied as the
    file prescribes, the result is stretched to [0, 1] and MONOCHROME1 (where
    low values are bright) is inverted so every source shares one convention.
    """
    path = Path(path)
    return _dicom_to_unit(_read_dataset(path, path, stop_before_pixels=False, tags=None), path)


def read_raster(path: Path | str) -> np.ndarray:
    """Read a JPEG/PNG (8- or 16-bit, grey or colour) as float32 [0, 1]."""
    path = Path(path)
    return _raster_to_unit(path, path)


def _dicom_to_unit(dataset: Dataset, path: Path | str) -> np.ndarray:
    pixels = _decode_pixels(dataset, path)
    if dataset.PhotometricInterpretation in COLOR_INTERPRETATIONS:
        return _stretch_to_unit(pixels @ LUMA_WEIGHTS)
    image = _stretch_to_unit(_apply_luts(pixels, dataset, path))
    if dataset.PhotometricInterpretation == "MONOCHROME1":
        return 1.0 - image
    return image


def _raster_to_unit(source: Path | BinaryIO, path: Path | str) -> np.ndarray:
    try:
        with Image.open(source) as picture:
            if picture.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
                picture = picture.convert("L")
            pixels = np.asarray(picture)
    except OSError as exc:
        raise DataError(f"{path}: not a readable JPEG/PNG image ({type(exc).__name__})") from exc
    return _stretch_to_unit(pixels)


def _read_dataset(source: Path | BinaryIO, path: Path | str, *, stop_before_pixels: bool,
                  tags: Sequence[str] | None) -> Dataset:
    """`source` read as DICOM; `path` names it in error messages."""
    try:
        return pydicom.dcmread(source, stop_before_pixels=stop_before_pixels, specific_tags=tags)
    except FileNotFoundError as exc:
        raise DicomReadError(f"{path}: no such file") from exc
    except InvalidDicomError as exc:
        raise DicomReadError(
            f"{path}: not a DICOM file (no 'DICM' marker after the 128-byte preamble)"
        ) from exc
    except (EOFError, OSError, ValueError, KeyError) as exc:
        raise DicomReadError(
            f"{path}: DICOM header cannot be parsed, the file is truncated or corrupt "
            f"({type(exc).__name__})"
        ) from exc


def _decode_pixels(dataset: Dataset, path: Path | str) -> np.ndarray:
    """The stored pixel values of a single-frame image, decompressed."""
    if "PixelData" not in dataset:
        # pydicom stops quietly at the end of a truncated file, dropping the
        # element it was reading, so a cut-off file also arrives here.
        raise DicomReadError(
            f"{path}: has no (7FE0,0010) Pixel Data: the file is truncated or holds no image"
        )
    _require_decoder(dataset, path)
    interpretation = dataset.get("PhotometricInterpretation")
    if interpretation not in GRAYSCALE_INTERPRETATIONS + COLOR_INTERPRETATIONS:
        raise DicomReadError(
            f"{path}: Photometric Interpretation is not supported; valid: "
            f"{', '.join(GRAYSCALE_INTERPRETATIONS + COLOR_INTERPRETATIONS)}"
        )
    frames = int(dataset.get("NumberOfFrames") or 1)
    if frames != 1:
        raise DicomReadError(f"{path}: holds {frames} frames; a mammogram must be one frame")
    try:
        return dataset.pixel_array
    except (ValueError, RuntimeError, AttributeError, KeyError) as exc:
        raise DicomReadError(
            f"{path}: pixel data cannot be decoded, the file is truncated or its "
            f"image attributes (group 0028) are inconsistent ({type(exc).__name__}: {exc})"
        ) from exc


def _apply_luts(pixels: np.ndarray, dataset: Dataset, path: Path | str) -> np.ndarray:
    """Stored values to presentation values: Modality LUT (rescale), then VOI LUT or window."""
    try:
        return apply_voi_lut(apply_modality_lut(pixels, dataset), dataset)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise DicomReadError(
            f"{path}: Modality or VOI LUT attributes (group 0028) are invalid ({exc})"
        ) from exc


def _require_decoder(dataset: Dataset, path: Path | str) -> None:
    """Fail early, naming the transfer syntax, when no installed plugin can decode it."""
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise DicomReadError(f"{path}: file meta has no (0002,0010) Transfer Syntax UID")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise DicomReadError(
            f"{path}: transfer syntax {syntax.name} ({syntax}) has no pixel decoder in pydicom"
        ) from exc
    if not decoder.is_available:
        raise DicomReadError(
            f"{path}: transfer syntax {syntax.name} needs a decoder plugin that is not "
            f"installed ({'; '.join(decoder.missing_dependencies)})"
        )


def _stretch_to_unit(values: np.ndarray) -> np.ndarray:
    """Map the image's own intensity range onto [0, 1]; a flat image becomes all zeros.

    Stretching per image (rather than by the declared bit depth) makes 12-, 14- and
    16-bit scanners and 8-bit exports comparable.
    """
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """Turn a [0, 1] mammogram into the model's float32 (size, size) input.

    Breast flipped to the left, cropped to its bounding box, padded to a square
    (no distortion) and resized. Deterministic: the same image gives the same output.
    """
    if size < 1:
        raise DataError(f"preprocess size must be a positive number of pixels, got {size}")
    oriented = orient_left(image)
    box = bounding_box(breast_region(oriented)) or whole_image_box(oriented)
    return resize(pad_to_square(crop(oriented, box)), size)


def breast_on_right(image: np.ndarray) -> bool:
    """Whether more intensity mass lies in the right half of the columns than in the left."""
    column_mass = image.sum(axis=0)
    half = image.shape[1] // 2
    return float(column_mass[image.shape[1] - half :].sum()) > float(column_mass[:half].sum())


def orient_left(image: np.ndarray) -> np.ndarray:
    """The image mirrored when needed so the breast (and chest wall) is on the left."""
    return np.fliplr(image) if breast_on_right(image) else image


def breast_region(image: np.ndarray, threshold: float = BACKGROUND_THRESHOLD) -> np.ndarray:
    """Boolean mask of the largest bright connected region: the breast.

    Keeping only the largest component drops the burned-in labels and film
    markers that scanned mammograms (CBIS-DDSM) carry outside the breast.
    """
    foreground = image > threshold
    labels, count = ndimage.label(foreground)
    if count <= 1:
        return foreground
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def bounding_box(mask: np.ndarray) -> Box | None:
    """The tightest box around the True pixels of `mask`, or None when it has none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    columns = np.flatnonzero(mask.any(axis=0))
    return Box(int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1)


def whole_image_box(image: np.ndarray) -> Box:
    """The box covering all of `image`."""
    return Box(0, image.shape[0], 0, image.shape[1])


def crop(image: np.ndarray, box: Box) -> np.ndarray:
    """The part of `image` inside `box`."""
    return image[box.top : box.bottom, box.left : box.right]


def pad_to_square(image: np.ndarray) -> np.ndarray:
    """Pad with background (0) to a square, keeping the aspect ratio of the content.

    Rows are padded evenly above and below; columns only on the right, so a
    left-oriented breast keeps its chest wall on the image's left edge.
    """
    height, width = image.shape
    side = max(height, width)
    top = (side - height) // 2
    return np.pad(image, ((top, side - height - top), (0, side - width)))


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to (size, size) float32 in [0, 1]; Pillow's bilinear filter antialiases when shrinking."""
    picture = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
    resized = np.asarray(picture.resize((size, size), Image.Resampling.BILINEAR))
    return np.clip(resized, 0.0, 1.0).astype(np.float32)

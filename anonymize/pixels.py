"""Burned-in text in mammograms: find it, blank it, or refuse the image.

Mammography exports carry labels, names and dates in the corners and side strips, drawn in air,
outside the breast. Two detectors work on block-pooled copies of each frame (block maxima and
minima, so a stroke one pixel wide still shows): air, breast and ink on a grid of at most
~`POOL_TARGET` blocks a side, pooled once per frame and after blanking only over the blanked
boxes; text lines inside the breast on a grid twice as fine, pooled only when full-scale ink
meets the breast:

- breast-mask-aware cleaning: air is the darkest band of the frame when it is large and flat;
  the breast (largest region that is not air) plus a margin is protected; everything outside it
  that stands out of the air background (by more than
  `CONTRAST` of the intensity range plus the background's own noise) - text, markers, rulers - is
  blanked to the background level, box by box, only on pixels outside the breast;
- a text-line detector inside the breast: ink drawn at the detector's full-scale value that forms
  a row of at least `MIN_GLYPHS` character-sized marks (morphological closing along rows).

Cleaning is "with confidence" exactly when every region found outside the breast stays clear of
the (margin-grown) breast mask, and no text line lies inside it. A frame without an air background
(a tissue crop, a CT slice, a two-valued ROI mask) is only checked for text lines; nothing in it
is blanked. Otherwise `BurnedInTextError` is raised and the caller quarantines the image.
Pixels outside the blanked boxes are never touched, so they stay bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import cv2
import numpy as np

from common.errors import DataError

POOL_TARGET: Final = 512
# A region outside the breast is ink when it departs from the air level by this share of the
# frame's intensity range, on top of NOISE_FACTOR times the air's own block-to-block spread.
CONTRAST: Final = 0.08
NOISE_FACTOR: Final = 4.0
# Margin grown around the breast before anything may be blanked, as a share of the pooled size.
BREAST_MARGIN: Final = 0.01
MIN_GLYPHS: Final = 3
# Ink blocks this close (full-resolution pixels, at most 2 blocks) form one blanked box.
GROUPING_PX: Final = 8
MAX_PASSES: Final = 3
# Air must cover this share of the frame and be this flat (median local deviation, share of range).
MIN_AIR_FRACTION: Final = 0.1
MAX_AIR_ROUGHNESS: Final = 0.008
MIN_AIR_SIDE: Final = 64
# The air band reaches this many times the air's own spread above its darkest level (at least
# MIN_AIR_BAND, at most CONTRAST of the range): faint tissue - skin, a nipple in profile - is not air.
AIR_NOISE_FACTOR: Final = 10.0
MIN_AIR_BAND: Final = 0.02
LUMA_WEIGHTS: Final = np.array([0.299, 0.587, 0.114], dtype=np.float32)
GRAYSCALE_INTERPRETATIONS: Final = ("MONOCHROME1", "MONOCHROME2")


class BurnedInTextError(DataError):
    """Burned-in text was found that cannot be blanked with confidence (or none where some must be)."""


@dataclass(frozen=True)
class Redaction:
    """A blanked box: pixel rows [top, bottom) and columns [left, right) of one frame."""

    frame: int
    top: int
    bottom: int
    left: int
    right: int


@dataclass(frozen=True)
class _Pooled:
    """Block extrema of a frame: `high`/`low` are the brightest/darkest stored luma per block."""

    high: np.ndarray
    low: np.ndarray
    factor: int


def clean_burned_in_text(pixels: np.ndarray, *, photometric: str, bits_stored: int,
                         pool_target: int = POOL_TARGET) -> list[Redaction]:
    """Blank burned-in text in place in writable `pixels` (frames, rows, columns, samples); return the boxes.

    Each frame is cleaned until a pass finds nothing more (blanking shifts the air statistics), so
    cleaning a cleaned image changes nothing. Raises BurnedInTextError when text touches or lies
    inside the breast region, or when no pass comes out clean.
    """
    if not pixels.flags.writeable:
        raise ValueError("clean_burned_in_text blanks in place; use burned_in_text_cleaned for read-only pixels")
    return burned_in_text_cleaned(pixels, photometric=photometric, bits_stored=bits_stored,
                                  pool_target=pool_target)[1]


def burned_in_text_cleaned(pixels: np.ndarray, *, photometric: str, bits_stored: int,
                           pool_target: int = POOL_TARGET) -> tuple[np.ndarray, list[Redaction]]:
    """`clean_burned_in_text` for pixels that may be read-only (a view of the file's bytes): returns
    `pixels` itself when nothing is blanked, else a blanked copy; and the boxes. `pool_target` is
    the size of the grid that air, breast and ink are found on; text lines inside the breast are
    looked for on a grid twice as fine, where the glyphs of a label stay apart."""
    redactions: list[Redaction] = []
    for index in range(pixels.shape[0]):
        pooled = _pool(_luma(pixels[index]), pool_factor(pixels.shape[1:3], pool_target))
        for _ in range(MAX_PASSES):
            plan = _plan_frame(pixels[index], pooled, photometric, bits_stored)
            if plan is None:
                break
            if not pixels.flags.writeable:
                pixels = pixels.copy()
            frame = pixels[index]
            for top, bottom, left, right in plan.boxes:
                keep = _upsample(plan.protected, pooled.factor, (top, bottom, left, right)).astype(bool)
                frame[top:bottom, left:right][~keep] = plan.fill
                redactions.append(Redaction(index, top, bottom, left, right))
                _repool(pooled, frame, redactions[-1])  # a pass re-pools only the boxes it blanked
        else:
            raise BurnedInTextError(f"frame {index} still shows ink after {MAX_PASSES} cleaning passes; "
                                    "the image is quarantined")
    return pixels, redactions


def _luma(frame: np.ndarray) -> np.ndarray:
    return frame[..., 0] if frame.shape[-1] == 1 else frame.astype(np.float32) @ LUMA_WEIGHTS


@dataclass(frozen=True)
class _Plan:
    """What one pass blanks: full-resolution boxes; inside them the protected (breast + margin)
    blocks stay and everything else becomes `fill`."""

    boxes: list[tuple[int, int, int, int]]
    protected: np.ndarray
    fill: np.ndarray


def _plan_frame(frame: np.ndarray, pooled: _Pooled, photometric: str, bits_stored: int) -> _Plan | None:
    low, high = float(pooled.low.min()), float(pooled.high.max())
    if high <= low:
        return None
    bright = _presentation(pooled, low, high, photometric)
    air, body = _air(bright)
    breast = _breast_mask(body) if air.any() else body
    _refuse_text_inside(frame, pooled, breast, photometric, bits_stored)
    if not air.any():
        return None
    protected = cv2.dilate(breast.astype(np.uint8), _disc(max(2, round(BREAST_MARGIN * max(breast.shape)))))
    outside = protected == 0
    background, threshold = _air_level(pooled, air, high - low)
    ink = (np.maximum(pooled.high - background, background - pooled.low) > threshold) & outside
    boxes = _ink_regions(ink, protected, pooled.factor, frame.shape[:2])
    return _Plan(boxes, protected, _fill_values(frame, pooled, air)) if boxes else None


def _repool(pooled: _Pooled, frame: np.ndarray, redaction: Redaction) -> None:
    """Brings the pooled extrema up to date over a blanked box. Boxes start on the block grid, so
    pooling the box alone gives exactly the blocks a full re-pooling of the frame would."""
    factor = pooled.factor
    box = _pool(_luma(frame[redaction.top:redaction.bottom, redaction.left:redaction.right]), factor)
    rows = slice(redaction.top // factor, redaction.top // factor + box.high.shape[0])
    cols = slice(redaction.left // factor, redaction.left // factor + box.high.shape[1])
    pooled.high[rows, cols] = box.high
    pooled.low[rows, cols] = box.low


def pool_factor(shape: tuple[int, ...], pool_target: int = POOL_TARGET) -> int:
    """The block side that leaves at most ~`pool_target` blocks along a frame's longer side."""
    return max(1, math.ceil(max(shape) / pool_target))


def _pool(luma: np.ndarray, factor: int | None = None) -> _Pooled:
    """Block maxima and minima over factor x factor blocks (the last blocks may be smaller).

    The factor is the frame's (`pool_factor`) unless given. Rows first:
    each band of `factor` rows reduces to one in numpy (contiguous, vectorised), which leaves a
    quarter of the data; then a one-row dilation/erosion anchored at the block's left edge,
    sampled once per block. Twice as fast as a square dilation of the whole frame, same values.
    """
    factor = factor or pool_factor(luma.shape)
    values = np.ascontiguousarray(luma)
    if values.dtype not in (np.uint8, np.uint16, np.int16, np.float32):
        values = values.astype(np.float32)
    if factor == 1:
        values = values.astype(np.float32)
        return _Pooled(values, values.copy(), 1)
    row = np.ones((1, factor), dtype=np.uint8)
    high = cv2.dilate(_row_bands(values, factor, np.max), row, anchor=(0, 0))[:, ::factor]
    low = cv2.erode(_row_bands(values, factor, np.min), row, anchor=(0, 0))[:, ::factor]
    return _Pooled(high.astype(np.float32), low.astype(np.float32), factor)


def _row_bands(values: np.ndarray, factor: int, reduce) -> np.ndarray:
    """`reduce` (np.max or np.min) over each band of `factor` rows; the last band may be shorter."""
    rows, columns = values.shape
    whole = rows // factor * factor
    bands = reduce(values[:whole].reshape(rows // factor, factor, columns), axis=1)
    if whole < rows:
        bands = np.concatenate([bands, reduce(values[whole:], axis=0, keepdims=True)])
    return bands


def _presentation(pooled: _Pooled, low: float, high: float, photometric: str) -> np.ndarray:
    """Block midpoints scaled to [0, 1] with 1 = bright (MONOCHROME1 stores bright as low)."""
    middle = (0.5 * (pooled.high + pooled.low) - low) / (high - low)
    return 1.0 - middle if photometric == "MONOCHROME1" else middle


def _air(bright: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The air background and the body: air is the darkest band of a smoothed copy, when it is
    large and flat enough to be air (a crop of tissue or a CT has none; then nothing outside a
    breast can be told apart and everything is body). The body is what lies above the air band in
    the unsmoothed copy too, so the blurred halo of a label cannot bridge it to the breast."""
    nothing = np.zeros(bright.shape, dtype=bool)
    if min(bright.shape) < MIN_AIR_SIDE or ((bright == 0) | (bright == 1)).all():
        # Too small to tell, or two values only (a segmentation mask: its regions are not text
        # on air, and blanking one would corrupt the mask).
        return nothing, ~nothing
    smooth = cv2.GaussianBlur(bright.astype(np.float32), (0, 0), 1.5)
    darkest = float(np.percentile(smooth[::4, ::4], 1))
    candidate = smooth[::4, ::4][smooth[::4, ::4] <= darkest + CONTRAST]
    spread = 1.4826 * float(np.median(np.abs(candidate - np.median(candidate))))
    level = darkest + min(CONTRAST, max(MIN_AIR_BAND, AIR_NOISE_FACTOR * spread))
    air = smooth <= level
    roughness = np.abs(bright - cv2.blur(bright.astype(np.float32), (5, 5)))
    if air.mean() < MIN_AIR_FRACTION or np.median(roughness[air][::7]) > MAX_AIR_ROUGHNESS:
        return nothing, ~nothing
    return air, ~air & (bright > level)


def _breast_mask(body: np.ndarray) -> np.ndarray:
    """The largest region that is not air, holes filled."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(body.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros(body.shape, dtype=bool)
    largest = 1 + int(stats[1:, cv2.CC_STAT_AREA].argmax())
    return _fill_holes(labels == largest)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` plus every region of its complement that does not reach the frame's border."""
    count, labels = cv2.connectedComponents((~mask).astype(np.uint8), connectivity=4)
    reaches_border = np.zeros(count, dtype=bool)
    reaches_border[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
    return mask | ~reaches_border[labels]


def _refuse_text_inside(frame: np.ndarray, pooled: _Pooled, breast: np.ndarray, photometric: str,
                        bits_stored: int) -> None:
    """Raise when a line of full-scale glyphs lies inside the breast: it cannot be blanked safely.

    Looked for on a grid twice as fine as `pooled` (pooled only when full-scale ink meets the
    breast at all, which clean images never do): on 8 px blocks the glyphs of a 40 px label merge."""
    if not _full_scale(pooled, photometric, bits_stored)[breast].any():
        return
    fine = pooled if pooled.factor == 1 else _pool(_luma(frame), max(1, pooled.factor // 2))
    rows = np.arange(fine.high.shape[0]) * fine.factor // pooled.factor
    cols = np.arange(fine.high.shape[1]) * fine.factor // pooled.factor
    ink = _full_scale(fine, photometric, bits_stored) & breast[np.ix_(rows, cols)]
    _, glyph_labels = cv2.connectedComponents(ink.astype(np.uint8), connectivity=8)
    max_height = max(3, round(0.06 * ink.shape[0]))
    lines = cv2.morphologyEx(ink.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((1, max(3, max_height)), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(lines, connectivity=8)
    for label in range(1, count):
        height, width = stats[label, cv2.CC_STAT_HEIGHT], stats[label, cv2.CC_STAT_WIDTH]
        glyphs = np.unique(glyph_labels[(labels == label) & ink])
        if height <= max_height and width >= 2 * height and glyphs.size >= MIN_GLYPHS:
            raise BurnedInTextError("burned-in text lies inside the breast region and cannot be blanked "
                                    "without destroying tissue; the image is quarantined")


def _full_scale(pooled: _Pooled, photometric: str, bits_stored: int) -> np.ndarray:
    """Blocks holding ink at the detector's full-scale value (stored 0 in MONOCHROME1)."""
    if photometric == "MONOCHROME1":
        return pooled.low <= 0
    return pooled.high >= (1 << bits_stored) - 1 - 0.5


def _air_level(pooled: _Pooled, air: np.ndarray, intensity_range: float) -> tuple[float, float]:
    """The air's stored level and the departure from it that counts as ink."""
    middle = 0.5 * (pooled.high + pooled.low)
    background = float(np.median(middle[air][::7]))
    noise = float(np.median((pooled.high - pooled.low)[air][::7]))
    return background, CONTRAST * intensity_range + NOISE_FACTOR * noise


def _ink_regions(ink: np.ndarray, protected: np.ndarray, factor: int,
                 shape: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """Full-resolution boxes around groups of ink blocks; raise when a group touches the breast margin."""
    reach = max(1, min(2, round(GROUPING_PX / factor)))  # blocks: the same distance on every grid
    grouped = cv2.dilate(ink.astype(np.uint8), np.ones((2 * reach + 1,) * 2, np.uint8)) & (protected == 0)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(grouped, connectivity=8)
    if count <= 1:
        return []
    border = cv2.dilate(protected, np.ones((3, 3), np.uint8)).astype(bool) & (protected == 0)
    if np.any(labels[border] > 0):
        raise BurnedInTextError("burned-in text or markers touch the breast region, so they cannot be "
                                "blanked with confidence; the image is quarantined")
    boxes = []
    for label in range(1, count):
        left, top, width, height = (int(v) for v in stats[label, :4])
        boxes.append((top * factor, min(shape[0], (top + height) * factor),
                      left * factor, min(shape[1], (left + width) * factor)))
    return boxes


def _fill_values(frame: np.ndarray, pooled: _Pooled, air: np.ndarray) -> np.ndarray:
    """The air's stored value per sample: what blanked pixels become."""
    sample = frame[:: pooled.factor, :: pooled.factor]
    return np.median(sample[air][::7], axis=0).round().astype(frame.dtype)


def _upsample(mask: np.ndarray, factor: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """The pooled mask over a full-resolution box, one pooled block per factor x factor pixels."""
    top, bottom, left, right = box
    rows = np.arange(top, bottom) // factor
    cols = np.arange(left, right) // factor
    return mask[np.ix_(rows, cols)]


def _disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))

"""Labels planted into text-free synthetic mammograms, to measure the burned-in text detector.

A case names where the label goes ("corner", "near-D" for D px from the breast, "inside") and
whether it is drawn at full scale or "grey" (halfway between air and the brightest tissue).
`judge` runs the detector and says what became of the label: "cleaned" (accepted, no label pixel
left, no tissue pixel changed), "quarantined", "LEAK" (accepted with the label still there) or
"TISSUE" (accepted with tissue pixels changed). Tissue is what departs from the air by more than
3 % of the range in the text-free image, so a nipple or the skin line counts. Used by
`bench/burned_in_text.py` and the detector's tests.
"""

from __future__ import annotations

import time

import cv2
import numpy as np

from anonymize.pixels import POOL_TARGET, BurnedInTextError, clean_burned_in_text
from common.data.synthetic_dicom import text_mask

TISSUE_CONTRAST = 0.03


def brightness(pixels: np.ndarray, photometric: str) -> np.ndarray:
    scaled = (pixels.astype(np.float32) - pixels.min()) / max(1.0, float(pixels.max()) - float(pixels.min()))
    return 1.0 - scaled if photometric == "MONOCHROME1" else scaled


def tissue_mask(clean: np.ndarray, photometric: str) -> np.ndarray:
    bright = cv2.GaussianBlur(brightness(clean, photometric), (0, 0), 3)  # film grain is not tissue
    return bright > float(np.percentile(bright[::8, ::8], 1)) + TISSUE_CONTRAST


def plant(clean: np.ndarray, photometric: str, bits: int, case: str,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A copy of `clean` with one label for `case`, and the label's pixel mask."""
    rows, cols = clean.shape
    glyphs = text_mask(["DOE, JANE", "12.03.2019"], font_px=max(10, round(rows * 0.012))) >= 64
    height, width = glyphs.shape
    tissue = tissue_mask(clean, photometric)
    if case == "corner":
        anchors = [(round(0.015 * rows), 0), (round(0.015 * rows), cols - width)]
        top, left = max(anchors, key=lambda a: -tissue[a[0]:a[0] + height, a[1]:a[1] + width].sum())
    else:
        top, left = _anchor(tissue, (height, width), case, rng)
    full_scale = (1 << bits) - 1
    if case.startswith("grey"):  # halfway between the air and the brightest tissue, as displayed
        bright = brightness(clean, photometric)
        air, peak = np.percentile(bright[~tissue][::7], 50), np.percentile(bright[tissue][::7], 99)
        shown = air + 0.5 * (peak - air)
        shown = 1.0 - shown if photometric == "MONOCHROME1" else shown
        value = round(float(clean.min()) + shown * (float(clean.max()) - float(clean.min())))
    else:
        value = 0 if photometric == "MONOCHROME1" else full_scale
    planted = clean.copy()
    label = np.zeros(clean.shape, dtype=bool)
    label[top:top + height, left:left + width] = glyphs
    planted[label] = value
    return planted, label


def _anchor(tissue: np.ndarray, box: tuple[int, int], case: str, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a box whose nearest pixel lies at the case's distance from the breast
    (or, for the inside cases, at least 100 px within it)."""
    height, width = box
    kernel = np.ones((height, width), np.uint8)
    if case.endswith("inside"):
        depth = cv2.distanceTransform(tissue.astype(np.uint8), cv2.DIST_L2, 5)
        ok = cv2.erode(depth, kernel, anchor=(0, 0)) >= 100
    else:
        distance = cv2.distanceTransform((~tissue).astype(np.uint8), cv2.DIST_L2, 5)
        nearest = cv2.erode(distance, kernel, anchor=(0, 0))
        wanted = int(case.rsplit("-", 1)[1])
        ok = (nearest >= wanted) & (nearest < wanted + 6)
        if wanted == 0:  # straddling the skin line: part of it on tissue, part in the air
            ok &= cv2.dilate(distance, kernel, anchor=(0, 0)) > height
    ok[tissue.shape[0] - height:] = False
    ok[:, tissue.shape[1] - width:] = False
    candidates = np.argwhere(ok)
    if not len(candidates):
        raise ValueError(f"no place for case {case} in a {tissue.shape} image; use a larger image")
    top, left = candidates[rng.integers(len(candidates))]
    return int(top), int(left)


def judge(planted: np.ndarray, clean: np.ndarray, label: np.ndarray, photometric: str, bits: int,
          pool: int = POOL_TARGET) -> tuple[str, float]:
    """The outcome of cleaning `planted`, and the seconds the detector took."""
    frame = planted[None, ..., None].copy()
    started = time.perf_counter()
    try:
        clean_burned_in_text(frame, photometric=photometric, bits_stored=bits, pool_target=pool)
    except BurnedInTextError:
        return "quarantined", time.perf_counter() - started
    spent = time.perf_counter() - started
    after = frame[0, ..., 0]
    if (after[label] == planted[label]).mean() > 0.1:
        return "LEAK", spent
    if ((after != planted) & ~label & tissue_mask(clean, photometric)).any():
        return "TISSUE", spent
    return "cleaned", spent

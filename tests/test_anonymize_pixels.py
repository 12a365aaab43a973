"""Burned-in text: blanked outside the breast with every other pixel bit-identical, or quarantined."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from anonymize.deidentify import Quarantined, deidentify_bytes
from anonymize.pixels import clean_burned_in_text
from anonymize.profile import DEFAULT_OPTIONS, parse_options
from common.data.synthetic_dicom import synthesize_dataset

SECRET = bytes(range(32))
MAMMOGRAPHY = "1.2.840.10008.5.1.4.1.1.1.2"


@pytest.fixture(scope="module")
def burned(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Full-field mammograms of three scanners (MONOCHROME2, MONOCHROME1, RLE), all with burned-in text."""
    root = tmp_path_factory.mktemp("burned") / "data"
    synthesize_dataset(root, sites=3, per_site=2, size=512, seed=5, burned_in_text=1.0)
    return sorted(p for p in root.rglob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == MAMMOGRAPHY)


def test_every_scanner_s_burned_in_text_is_blanked_and_other_pixels_stay_identical(burned: list[Path]) -> None:
    syntaxes = set()
    for path in burned:
        original = pydicom.dcmread(path)
        syntaxes.add(original.file_meta.TransferSyntaxUID)
        output, summary = deidentify_bytes(path.read_bytes(), DEFAULT_OPTIONS, SECRET)
        result = pydicom.dcmread(io.BytesIO(output))
        assert original.BurnedInAnnotation == "YES" and result.BurnedInAnnotation == "NO"
        assert summary.redactions
        before, after = original.pixel_array, result.pixel_array
        inside = np.zeros(before.shape, dtype=bool)
        for box in summary.redactions:
            inside[box.top:box.bottom, box.left:box.right] = True
        assert np.array_equal(before[~inside], after[~inside])
        ink = (1 << int(original.BitsStored)) - 1 if original.PhotometricInterpretation == "MONOCHROME2" else 0
        assert (before[inside] == ink).sum() > 50 and not (after[inside] == ink).any()
        assert result.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert RLELossless in syntaxes


def test_images_without_text_keep_their_pixel_data_untouched(tmp_path: Path) -> None:
    synthesize_dataset(tmp_path / "clean", sites=3, per_site=1, size=512, seed=9, burned_in_text=0.0)
    for path in (tmp_path / "clean").rglob("000000.dcm"):
        original = pydicom.dcmread(path)
        output, summary = deidentify_bytes(path.read_bytes(), DEFAULT_OPTIONS, SECRET)
        result = pydicom.dcmread(io.BytesIO(output))
        assert summary.redactions == ()
        assert result.PixelData == original.PixelData
        assert result.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID


def test_text_inside_the_breast_is_quarantined(burned: list[Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(burned[0])
    pixels = ds.pixel_array.copy()
    rows, cols = np.nonzero(pixels > np.percentile(pixels, 60))
    centre = (int(np.median(rows)), int(np.median(cols)))
    _draw_text(pixels, "ZQX 12.03.2019", centre, ink=(1 << int(ds.BitsStored)) - 1)
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "inside.dcm")
    with pytest.raises(Quarantined) as caught:
        deidentify_bytes((tmp_path / "inside.dcm").read_bytes(), DEFAULT_OPTIONS, SECRET)
    assert caught.value.reason == "burned-in-text"


def test_marked_burned_in_annotation_without_findable_text_is_quarantined(tmp_path: Path) -> None:
    synthesize_dataset(tmp_path / "data", sites=1, per_site=1, size=256, seed=2, burned_in_text=0.0)
    path = next((tmp_path / "data").rglob("000000.dcm"))
    ds = pydicom.dcmread(path)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(tmp_path / "marked.dcm")
    with pytest.raises(Quarantined, match="no burned-in text was found"):
        deidentify_bytes((tmp_path / "marked.dcm").read_bytes(), DEFAULT_OPTIONS, SECRET)


def test_marked_images_are_quarantined_when_pixel_cleaning_is_off(burned: list[Path]) -> None:
    with pytest.raises(Quarantined, match="clean_pixel_data option is off"):
        deidentify_bytes(burned[0].read_bytes(), parse_options("retain_modified_dates"), SECRET)


def test_colour_frames_are_blanked_in_every_channel() -> None:
    frame = np.zeros((1, 200, 160, 3), dtype=np.uint8)
    frame[0, 40:190, 0:90] = 140  # a grey "breast" against black air
    frame[0, 10:20, 110:150:3] = 255  # a row of white glyph strokes in the air
    redactions = clean_burned_in_text(frame, photometric="RGB", bits_stored=8)
    assert redactions
    assert not (frame[0, :30, 100:] == 255).any()
    assert (frame[0, 40:190, 0:90] == 140).all()


def _draw_text(pixels: np.ndarray, text: str, centre: tuple[int, int], ink: int) -> None:
    canvas = Image.new("L", (200, 30), 0)
    ImageDraw.Draw(canvas).text((2, 2), text, fill=255, font=ImageFont.load_default(size=20))
    glyphs = np.asarray(canvas) > 128
    top, left = centre[0] - 15, centre[1] - 100
    region = pixels[top:top + 30, left:left + 200]
    region[glyphs[: region.shape[0], : region.shape[1]]] = ink


@pytest.mark.parametrize("shape", [(4000, 3200), (3999, 3197), (1031, 17), (7, 2049)])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_pooling_gives_exactly_the_block_extrema_of_a_square_dilation(shape, dtype) -> None:
    # The row-band pooling must equal the straightforward definition: a factor x factor
    # dilation/erosion anchored at each block's corner, sampled once per block (partial last blocks too).
    import cv2

    from anonymize.pixels import _pool

    values = np.random.default_rng(sum(shape)).integers(0, 4096, shape).astype(dtype)
    pooled = _pool(values)
    block = np.ones((pooled.factor, pooled.factor), np.uint8)

    reference_high = cv2.dilate(values, block, anchor=(0, 0))[::pooled.factor, ::pooled.factor]
    reference_low = cv2.erode(values, block, anchor=(0, 0))[::pooled.factor, ::pooled.factor]
    assert pooled.factor > 1
    assert np.array_equal(pooled.high, reference_high.astype(np.float32))
    assert np.array_equal(pooled.low, reference_low.astype(np.float32))

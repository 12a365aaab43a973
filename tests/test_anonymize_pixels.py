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


@pytest.fixture(scope="module")
def text_free(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[np.ndarray, str, int]]:
    """Text-free full-field mammograms (4000 px) of all four scanner profiles: at this size a label
    20 px from the skin line lies within 3 blocks of the pooled grid."""
    root = tmp_path_factory.mktemp("text-free")
    synthesize_dataset(root, sites=4, per_site=1, size=4000, seed=21, burned_in_text=0.0)
    images = []
    for path in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        if ds.SOPClassUID == MAMMOGRAPHY:
            images.append((ds.pixel_array, str(ds.PhotometricInterpretation), int(ds.BitsStored)))
    return images


EITHER = {"cleaned", "quarantined"}


@pytest.mark.parametrize("case, expected", [
    ("corner", {"cleaned"}), ("near-150", {"cleaned"}), ("near-0", {"quarantined"}), ("inside", {"quarantined"}),
    ("near-20", EITHER), ("near-60", EITHER), ("grey-near-20", EITHER), ("grey-near-60", EITHER),
])
def test_planted_labels_are_blanked_or_quarantined_never_left_and_tissue_never_cut(text_free, case, expected) -> None:
    # A label in the air is blanked; one touching or inside the breast quarantines the image; none
    # survives an accepted image and no tissue pixel (skin line and nipple included) changes.
    from common.data.planted_labels import judge, plant

    outcomes = []
    for number, (clean, photometric, bits) in enumerate(text_free):
        planted, label = plant(clean, photometric, bits, case, np.random.default_rng(number))
        outcomes.append(judge(planted, clean, label, photometric, bits)[0])
    assert set(outcomes) <= expected, outcomes


def _image(bits_allocated: int, bits_stored: int, *, frames: int = 1, syntax=ExplicitVRLittleEndian,
           signed: bool = False, photometric: str = "MONOCHROME2", shape=(33, 17)) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MAMMOGRAPHY
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "2.25.1"
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if frames > 1:
        ds.NumberOfFrames = frames
    dtype = np.uint8 if bits_allocated == 8 else np.uint16
    values = np.random.default_rng(bits_stored).integers(0, 1 << bits_stored, (frames, *shape)).astype(dtype)
    ds.PixelData = values.tobytes() + (b"\0" if values.nbytes % 2 else b"")
    return ds


@pytest.mark.parametrize("ds", [
    _image(16, 12), _image(16, 16), _image(8, 8), _image(16, 14, photometric="MONOCHROME1"),
    _image(16, 12, frames=3), _image(16, 12, syntax=pydicom.uid.ImplicitVRLittleEndian),
    _image(8, 8, shape=(5, 7)),  # odd length, padded
], ids=["12-bit", "16-bit", "8-bit", "monochrome1", "multi-frame", "implicit", "odd"])
def test_uncompressed_pixels_are_read_in_place_exactly_as_pydicom_decodes_them(ds) -> None:
    from anonymize.deidentify import _decoded_pixels, _native_view

    view = _native_view(ds)
    assert view is not None and not view.flags.writeable
    decoded, in_place = _decoded_pixels(ds)
    assert in_place and np.array_equal(decoded.reshape(ds.pixel_array.shape), ds.pixel_array)


@pytest.mark.parametrize("ds", [_image(16, 12, signed=True), _image(16, 16, syntax=pydicom.uid.ExplicitVRBigEndian)],
                         ids=["signed", "big-endian"])
def test_pixels_that_need_decoding_go_through_pydicom(ds) -> None:
    from anonymize.deidentify import _native_view

    assert _native_view(ds) is None


def test_bits_above_bits_stored_are_cleared_as_pydicom_clears_them() -> None:
    # An overlay or garbage in the unused high bits must not reach the detector as intensity.
    from anonymize.deidentify import _decoded_pixels, _native_view

    ds = _image(16, 12)
    values = np.frombuffer(ds.PixelData, dtype="<u2").copy()
    values[::5] |= 0x8000
    ds.PixelData = values.tobytes()
    assert _native_view(ds) is None
    assert int(_decoded_pixels(ds)[0].max()) < 1 << 12


def _rle(ds: pydicom.Dataset) -> pydicom.Dataset:
    ds.compress(RLELossless, encoding_plugin="pydicom")
    return ds


@pytest.mark.parametrize("ds", [
    _rle(_image(16, 12)), _rle(_image(16, 16)), _rle(_image(8, 8, shape=(5, 7))),
    _rle(_image(16, 14, photometric="MONOCHROME1")), _rle(_image(16, 12, frames=3)),
], ids=["12-bit", "16-bit", "8-bit-odd", "monochrome1", "multi-frame"])
def test_rle_pixels_are_decoded_exactly_as_pydicom_decodes_them(ds) -> None:
    from anonymize.deidentify import _decoded_pixels, _rle_decoded

    decoded = _rle_decoded(ds)
    assert decoded is not None and decoded.flags.writeable  # blanking needs no copy of its own
    array, in_place = _decoded_pixels(ds)
    assert not in_place and np.array_equal(array.reshape(ds.pixel_array.shape), ds.pixel_array)


def test_rle_pixels_pydicom_would_correct_or_refuse_go_through_pydicom() -> None:
    from anonymize.deidentify import _decoded_pixels, _rle_decoded

    assert _rle_decoded(_rle(_image(16, 12, signed=True))) is None
    assert _rle_decoded(_image(16, 12)) is None  # not RLE
    high_bits = _image(16, 12)
    values = np.frombuffer(high_bits.PixelData, dtype="<u2").copy()
    values[::5] |= 0x8000
    high_bits.PixelData = values.tobytes()
    high_bits = _rle(high_bits)
    assert _rle_decoded(high_bits) is None
    assert int(_decoded_pixels(high_bits)[0].max()) < 1 << 12  # cleared by pydicom, as before
    one_frame_short = _rle(_image(16, 12, frames=3))
    one_frame_short.NumberOfFrames = 4
    assert _rle_decoded(one_frame_short) is None
    cut = _rle(_image(16, 12))
    cut.PixelData = cut.PixelData[:len(cut.PixelData) // 2]
    assert _rle_decoded(cut) is None
    with pytest.raises(Quarantined):
        _decoded_pixels(cut)


@pytest.mark.parametrize("ds", [
    _image(16, 12), _image(8, 8, shape=(5, 7)), _image(16, 12, syntax=pydicom.uid.ImplicitVRLittleEndian),
    _image(16, 12, syntax=pydicom.uid.ExplicitVRBigEndian),
], ids=["explicit", "odd-length", "implicit", "big-endian"])
def test_saving_writes_exactly_the_bytes_pydicom_writes(ds, tmp_path: Path) -> None:
    from anonymize.deidentify import save

    expected = io.BytesIO()
    ds.save_as(expected, enforce_file_format=True)
    save(ds, tmp_path / "out.dcm")
    assert (tmp_path / "out.dcm").read_bytes() == expected.getvalue()
    assert "PixelData" in ds  # put back after the write


def test_saving_with_an_element_after_the_pixel_data_keeps_it(tmp_path: Path) -> None:
    from anonymize.deidentify import save

    ds = _image(16, 12)
    ds.add_new(0xFFFCFFFC, "OB", b"\0\0")  # Data Set Trailing Padding, after (7FE0,0010)
    expected = io.BytesIO()
    ds.save_as(expected, enforce_file_format=True)
    save(ds, tmp_path / "out.dcm")
    assert (tmp_path / "out.dcm").read_bytes() == expected.getvalue()


def test_bits_above_bits_stored_and_bytes_beyond_the_image_do_not_survive(tmp_path: Path) -> None:
    # Neither shows in a viewer, either can carry text (old overlays lived in the high bits).
    synthesize_dataset(tmp_path / "data", sites=1, per_site=1, size=256, seed=3, burned_in_text=0.0)
    path = next(p for p in (tmp_path / "data").rglob("000000.dcm")
                if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == MAMMOGRAPHY)
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
        ds.decompress()
    clean = ds.pixel_array.copy()
    for extra in ("high-bits", "trailing"):
        values = np.frombuffer(ds.PixelData[:clean.nbytes], dtype="<u2").copy()
        if extra == "high-bits":
            values[::7] |= np.uint16(1 << 15)
        ds.PixelData = values.tobytes() + (b"JANE DOE 1962" if extra == "trailing" else b"")
        ds.save_as(tmp_path / f"{extra}.dcm")
        output, _ = deidentify_bytes((tmp_path / f"{extra}.dcm").read_bytes(), DEFAULT_OPTIONS, SECRET)
        result = pydicom.dcmread(io.BytesIO(output))
        assert len(result.PixelData) == clean.nbytes and b"JANE" not in output
        assert np.array_equal(result.pixel_array, clean)
        assert not (np.frombuffer(result.PixelData, dtype="<u2") >> int(ds.BitsStored)).any()


def test_a_two_valued_roi_mask_is_neither_blanked_nor_quarantined_for_its_fragments() -> None:
    # CBIS-DDSM's ROI masks are 0/255 images; a lesion in three pieces is not text on air, and
    # blanking a piece would corrupt the mask the tree needs.
    mask = np.zeros((1, 192, 154, 1), dtype=np.uint8)
    mask[0, 80:95, 60:72] = 255
    mask[0, 97:99, 74:77] = 255  # fragments a few pixels from the lesion
    mask[0, 76:78, 58:60] = 255
    before = mask.copy()

    assert clean_burned_in_text(mask, photometric="MONOCHROME2", bits_stored=8) == []
    assert np.array_equal(mask, before)

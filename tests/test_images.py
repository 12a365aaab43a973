"""Pixel reading maps every source onto float32 [0, 1] with 1 = bright tissue; preprocessing is geometric."""

from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from common.data import images
from common.data.images import (
    breast_on_right,
    preprocess,
    read_dicom_header,
    read_image,
    read_mask,
)
from common.errors import DataError, DicomReadError
from tests.fixtures.cbis_layouts import write_dicom

# Real files shipped with pydicom, one per pixel encoding we must decode.
ENCODINGS = {
    "explicit little endian, signed 16-bit": "MR_small.dcm",
    "CT with rescale": "CT_small.dcm",
    "RLE lossless": "MR_small_RLE.dcm",
    "JPEG 2000 lossless": "MR_small_jp2klossless.dcm",
    "JPEG 2000": "JPEG2000.dcm",
    "JPEG baseline, YBR colour": "SC_rgb_jpeg_dcmtk.dcm",
    "JPEG lossless": "SC_rgb_jpeg_gdcm.dcm",
}


@pytest.mark.parametrize("name", ENCODINGS.values(), ids=ENCODINGS.keys())
def test_every_supported_encoding_reads_as_unit_float_image(name):
    image = read_image(get_testdata_file(name))

    assert image.dtype == np.float32 and image.ndim == 2
    assert image.min() == 0.0 and image.max() == 1.0


@pytest.mark.parametrize("compressed", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"])
def test_lossless_compression_decodes_to_the_uncompressed_image(compressed):
    reference = read_image(get_testdata_file("MR_small.dcm"))

    np.testing.assert_allclose(read_image(get_testdata_file(compressed)), reference, atol=1e-6)


def test_8_bit_dicom_is_stretched_linearly(tmp_path):
    ramp = np.tile(np.arange(0, 256, 5, dtype=np.uint8), (4, 1))
    path = write_dicom(tmp_path / "eight.dcm", ramp)

    np.testing.assert_allclose(read_image(path), ramp / 255.0, atol=1e-6)


def test_16_bit_window_clips_outside_and_is_linear_inside(tmp_path):
    ramp = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (2, 1))
    path = write_dicom(tmp_path / "window.dcm", ramp, window=(2048, 1024))

    image = read_image(path)[0]

    assert np.all(image[ramp[0] < 1536] == 0.0) and np.all(image[ramp[0] > 2560] == 1.0)
    inside = (ramp[0] > 1600) & (ramp[0] < 2500)
    assert np.all(np.diff(image[inside]) > 0)


def test_window_is_applied_to_rescaled_values(tmp_path):
    # Stored s becomes 2*s - 1000; the window [-100, 100] is in those rescaled units.
    stored = np.array([[0, 440, 450, 500, 550, 560, 1000]], dtype=np.uint16)
    path = write_dicom(tmp_path / "rescaled.dcm", stored, rescale=(2, -1000), window=(0, 200))

    image = read_image(path)[0]

    assert image[:2].tolist() == [0.0, 0.0] and image[-2:].tolist() == [1.0, 1.0]
    assert 0.45 < image[3] < 0.55


def test_monochrome1_is_inverted_so_low_stored_values_are_bright(tmp_path):
    ramp = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (2, 1))
    path = write_dicom(tmp_path / "mono1.dcm", ramp, photometric="MONOCHROME1", window=(2048, 2048))

    image = read_image(path)[0]

    assert image[0] == 1.0 and image[-1] == 0.0
    assert np.all(np.diff(image) <= 0)


def test_truncated_pixel_data_is_a_dicom_read_error(tmp_path):
    path = tmp_path / "cut.dcm"
    path.write_bytes(open(get_testdata_file("MR_small.dcm"), "rb").read()[:-3000])

    with pytest.raises(DicomReadError, match="truncated") as error:
        read_image(path)
    assert str(path) in str(error.value)


def test_truncated_compressed_file_is_a_dicom_read_error(tmp_path):
    data = open(get_testdata_file("JPEG2000.dcm"), "rb").read()
    path = tmp_path / "cut_j2k.dcm"
    path.write_bytes(data[: len(data) * 2 // 3])

    with pytest.raises(DicomReadError, match="truncated"):
        read_image(path)


def test_text_file_named_dcm_is_not_dicom(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("patient notes, not an image\n")

    with pytest.raises(DicomReadError, match="not a DICOM file"):
        read_image(path)


def test_missing_file_is_a_dicom_read_error(tmp_path):
    with pytest.raises(DicomReadError, match="no such file"):
        read_image(tmp_path / "absent.dcm")


def test_dicom_without_pixel_data_says_so(tmp_path):
    path = write_dicom(tmp_path / "header_only.dcm", np.zeros((2, 2), dtype=np.uint8))
    dataset = pydicom.dcmread(path)
    del dataset.PixelData
    dataset.save_as(path)

    with pytest.raises(DicomReadError, match=r"\(7FE0,0010\) Pixel Data"):
        read_image(path)


def test_transfer_syntax_without_any_decoder_is_named(tmp_path):
    path = write_dicom(tmp_path / "video.dcm", np.zeros((2, 2), dtype=np.uint8))
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 video
    dataset.PixelData = encapsulate([b"\x00" * 8])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(path)

    with pytest.raises(DicomReadError, match="MPEG2.*no pixel decoder"):
        read_image(path)


def test_missing_decoder_plugin_names_what_to_install(monkeypatch):
    unavailable = SimpleNamespace(is_available=False, missing_dependencies=["pylibjpeg - requires numpy"])
    monkeypatch.setattr(images, "get_decoder", lambda syntax: unavailable)

    with pytest.raises(DicomReadError, match="not installed.*pylibjpeg"):
        read_image(get_testdata_file("JPEG2000.dcm"))


def test_multi_frame_dicom_is_refused():
    with pytest.raises(DicomReadError, match="2 frames"):
        read_image(get_testdata_file("SC_rgb_rle_2frame.dcm"))


def test_header_is_read_without_pixels(tmp_path):
    path = write_dicom(tmp_path / "scanner.dcm", np.zeros((4, 4), dtype=np.uint16),
                       manufacturer="ACME", model="Mammo 3000")

    header = read_dicom_header(path, ["Manufacturer", "ManufacturerModelName"])

    assert (header.Manufacturer, header.ManufacturerModelName) == ("ACME", "Mammo 3000")
    assert "PixelData" not in header


@pytest.mark.parametrize("mode, maximum", [("L", 255), ("I;16", 65535)])
def test_png_of_any_depth_reads_as_unit_float(tmp_path, mode, maximum):
    pixels = np.linspace(0, maximum, 30).reshape(5, 6).astype(np.uint8 if mode == "L" else np.uint16)
    path = tmp_path / "export.png"
    Image.fromarray(pixels).save(path)

    image = read_image(path)

    np.testing.assert_allclose(image, pixels / maximum, atol=1e-3)


def test_jpeg_mask_reads_as_boolean(tmp_path):
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[5:10, 8:15] = 255
    path = tmp_path / "mask.jpg"
    Image.fromarray(mask).save(path, quality=95)

    assert np.array_equal(read_mask(path), mask > 0)


def test_broken_jpeg_is_a_data_error(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")

    with pytest.raises(DataError, match="broken.jpg"):
        read_image(path)


def _toy_breast(height=80, width=60, right=False):
    """A bright half-disc at the left edge (or right), a small bright marker in the far corner."""
    yy, xx = np.mgrid[:height, :width]
    image = np.where((xx / (0.5 * width)) ** 2 + ((yy - height / 2) / (0.3 * height)) ** 2 <= 1, 0.6, 0.0)
    image[2:5, width - 5 : width - 2] = 1.0
    image = image.astype(np.float32)
    return np.fliplr(image).copy() if right else image


def test_preprocess_returns_the_requested_square_in_unit_range():
    output = preprocess(_toy_breast(), 32)

    assert output.shape == (32, 32) and output.dtype == np.float32
    assert 0.0 <= output.min() and output.max() <= 1.0


def test_preprocess_moves_a_right_breast_to_the_left():
    output = preprocess(_toy_breast(right=True), 32)

    assert not breast_on_right(output)
    np.testing.assert_allclose(output, preprocess(_toy_breast(), 32), atol=1e-6)


def test_preprocess_crops_background_and_ignores_film_markers():
    output = preprocess(_toy_breast(), 32)

    # The breast spans the full height after cropping; the marker column region is padding.
    assert output[:, 0].max() > 0.5 and output[16, :].max() > 0.5
    assert output[:4, -4:].max() == 0.0


def test_preprocess_keeps_aspect_ratio_by_padding_on_the_right():
    tall = np.zeros((100, 100), dtype=np.float32)
    tall[10:90, 0:20] = 0.8  # 80 x 20 breast against the left edge

    output = preprocess(tall, 40)

    assert output[:, :8].mean() > 0.7  # 20/80 of the square width holds tissue
    assert output[:, 12:].max() == 0.0


def test_preprocess_is_deterministic():
    image = _toy_breast()

    assert np.array_equal(preprocess(image, 24), preprocess(image.copy(), 24))


def test_preprocess_rejects_non_positive_size():
    with pytest.raises(DataError, match="positive"):
        preprocess(_toy_breast(), 0)

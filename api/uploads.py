"""Uploads: the body limit, recognising the format, de-identifying, and decoding for the model.

An upload is DICOM Part 10, PNG or JPEG, recognised by its bytes (never by the declared content
type alone). DICOM goes through :func:`anonymize.deidentify.deidentify_bytes`; a PNG or JPEG is
decoded and re-encoded as a bare PNG (EXIF, XMP, ICC and text chunks dropped) with burned-in
text blanked the way DICOM pixels are. Either way the cleaned image is decoded once more here,
so that nothing is stored that the model could not read. Dimensions are checked from the header
before any pixel is decoded, so a decompression bomb costs nothing.

Nothing in a message or summary is read from the upload's metadata.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydicom.datadict import keyword_for_tag
from pydicom.tag import Tag

from anonymize.deidentify import (
    MALFORMED_ELEMENT,
    DeidentificationSummary,
    Quarantined,
    deidentify_bytes,
    read_dataset,
)
from anonymize.pixels import BurnedInTextError, clean_burned_in_text
from anonymize.profile import DeidentificationOptions
from anonymize.vocabulary import Vocabulary
from common.data.images import read_image_bytes
from common.errors import DataError, MammoflError

DICOM_TYPE, PNG_TYPE = "application/dicom", "image/png"
PNG_MAGIC, JPEG_MAGIC, DICOM_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"DICM"
DECODED_TYPES = (DICOM_TYPE, PNG_TYPE)
DECODED_NAME = "the image"  # stands for the file in decoding errors, then cut off
ACTION_NAMES = {"X": "removed", "Z": "emptied", "D": "dummied", "C": "cleaned", "U": "uids_replaced",
                "P": "pseudonymised", "K": "kept"}
CHANGED_ACTIONS = frozenset("ZDCUP")
MAX_LISTED_KEYWORDS = 200


class UploadRejected(MammoflError):
    """An upload that cannot be stored; ``status_code`` is the HTTP answer (4xx)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class CleanImage:
    """A de-identified upload, ready to store: its bytes, what was done, and its decoded pixels."""

    data: bytes
    content_type: str
    width: int
    height: int
    pixels: np.ndarray
    deidentification: dict[str, Any]


# Bytes per band of PIL modes that are not 8-bit; and what decoding adds per pixel (a grey copy
# and the float32 image the model and the de-identification read).
RASTER_BAND_BYTES = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4}
WORKING_BYTES_PER_PIXEL = 6


class Deidentifier:
    """Turns uploaded bytes into a :class:`CleanImage`, or raises :class:`UploadRejected`."""

    def __init__(self, options: DeidentificationOptions, secret: bytes, *, max_pixels: int,
                 max_decoded_bytes: int = 256 * 1024 * 1024, vocabulary: Vocabulary | None = None) -> None:
        self._options = options
        self._vocabulary = vocabulary
        self._secret = secret
        self._max_pixels = max_pixels
        self._max_decoded_bytes = max_decoded_bytes

    def clean(self, data: bytes) -> CleanImage:
        if not data:
            raise UploadRejected(422, "the uploaded file is empty")
        if data[128:132] == DICOM_MAGIC:
            return self._clean_dicom(data)
        if data.startswith((PNG_MAGIC, JPEG_MAGIC)):
            return self._clean_raster(data)
        raise UploadRejected(415, "the upload is not an image: expected a DICOM Part 10 file, a PNG or a JPEG")

    def _clean_dicom(self, data: bytes) -> CleanImage:
        try:
            header = read_dataset(data)
            self._check_size(int(header.get("Columns") or 0), int(header.get("Rows") or 0),
                             int(header.get("NumberOfFrames") or 1),
                             int(header.get("SamplesPerPixel") or 1) * -(-int(header.get("BitsAllocated") or 16) // 8))
            cleaned, summary = deidentify_bytes(data, self._options, self._secret, vocabulary=self._vocabulary)
        except Quarantined as error:
            raise UploadRejected(422, f"the DICOM file cannot be de-identified ({error.reason}): {error}") from error
        except (TypeError, ValueError) as error:
            raise UploadRejected(422, "the DICOM file's Rows, Columns or Number of Frames is not a number") from error
        except MALFORMED_ELEMENT as error:
            raise UploadRejected(422, f"the DICOM header cannot be parsed: an element has an unknown Value "
                                      f"Representation or a malformed value ({type(error).__name__})") from error
        pixels = decode_image(cleaned, DICOM_TYPE)
        return CleanImage(cleaned, DICOM_TYPE, pixels.shape[1], pixels.shape[0], pixels, dicom_summary(summary))

    def _clean_raster(self, data: bytes) -> CleanImage:
        try:
            with Image.open(io.BytesIO(data)) as picture:
                self._check_size(*picture.size, 1, len(picture.getbands()) * RASTER_BAND_BYTES.get(picture.mode, 1))
                kind = picture.format.lower()
                picture.load()
                grey = picture if picture.mode in ("L", "I;16") else picture.convert("L")
                stored = np.array(grey)
        except Image.DecompressionBombError as error:
            raise UploadRejected(422, f"the image declares far more pixels than it could hold: over the limit "
                                      f"of {self._max_pixels} pixels (a decompression bomb)") from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise UploadRejected(422, f"the {_raster_name(data)} image cannot be decoded: truncated or corrupt "
                                      f"({type(error).__name__})") from error
        redactions = _blank_burned_in_text(stored)
        buffer = io.BytesIO()
        Image.fromarray(stored).save(buffer, format="PNG")
        cleaned = buffer.getvalue()
        pixels = decode_image(cleaned, PNG_TYPE)
        summary = {"method": "raster-reencode", "options": ["clean_pixel_data"], "key_id": None,
                   "action_counts": {"removed": 1, "cleaned": 1 if redactions else 0},
                   "removed": ["embedded metadata (EXIF, XMP, ICC profile, text chunks)"],
                   "changed": [f"re-encoded from {kind.upper()} as a bare PNG"] + (["PixelData"] if redactions else []),
                   "redactions": redactions, "dates": None}
        return CleanImage(cleaned, PNG_TYPE, pixels.shape[1], pixels.shape[0], pixels, summary)

    def _check_size(self, width: int, height: int, frames: int, stored_bytes: int) -> None:
        """Refuse before decoding what would take too many pixels, or too much memory to decode.

        A few hundred KB of compressed PNG can declare an 8900 x 8900 RGBA image: 1.2 GB once
        decoded, converted and turned into floats. The estimate counts the decoded samples
        plus the working copies (grey and float32) every upload goes through.
        """
        if width < 1 or height < 1:
            raise UploadRejected(422, f"the image declares {width} x {height} pixels; both must be at least 1")
        pixels = width * height * max(frames, 1)
        if pixels > self._max_pixels:
            raise UploadRejected(422, f"the image declares {width} x {height} pixels x {frames} frame(s), "
                                      f"over the limit of {self._max_pixels} pixels")
        needed = pixels * (max(stored_bytes, 1) + WORKING_BYTES_PER_PIXEL)
        if needed > self._max_decoded_bytes:
            raise UploadRejected(422, f"the image ({width} x {height} x {frames} frame(s), {stored_bytes} byte(s) per "
                                      f"pixel) would take about {needed // 2**20} MiB to decode, over the limit of "
                                      f"{self._max_decoded_bytes // 2**20} MiB; send a greyscale mammogram")


def decode_image(data: bytes, content_type: str) -> np.ndarray:
    """Stored (de-identified) bytes as float32 HxW in [0, 1], as `common.data.images` reads files."""
    if content_type not in DECODED_TYPES:
        raise UploadRejected(415, f"content type {content_type!r} cannot be decoded; valid: {', '.join(DECODED_TYPES)}")
    try:
        return read_image_bytes(data, raster=content_type == PNG_TYPE, name=DECODED_NAME)
    except DataError as error:
        raise UploadRejected(422, f"the image cannot be decoded: {str(error).removeprefix(f'{DECODED_NAME}: ')}") from error


def render_png(pixels: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG of a [0, 1] image."""
    buffer = io.BytesIO()
    Image.fromarray(np.round(pixels * 65535).astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def dicom_summary(summary: DeidentificationSummary) -> dict[str, Any]:
    """What was removed or changed, by attribute keyword and by kind; no value and no input hash."""
    counts: dict[str, int] = {}
    removed, changed = set(), set()
    for path, letters in summary.actions.items():
        for letter in letters:
            counts[ACTION_NAMES.get(letter, letter)] = counts.get(ACTION_NAMES.get(letter, letter), 0) + 1
        name = _attribute_name(path)
        if "X" in letters:
            removed.add(name)
        if CHANGED_ACTIONS & set(letters):
            changed.add(name)
    return {"method": "dicom-ps3.15", "options": list(summary.options), "key_id": summary.key_id,
            "action_counts": counts, "removed": _listed(removed), "changed": _listed(changed),
            "redactions": len(summary.redactions), "dates": summary.dates,
            "removed_words": sum(summary.removed_words.values())}


def _attribute_name(path: str) -> str:
    """ "(0040,A730)>(0010,0010)" -> "ContentSequence>PatientName"; private tags keep their numbers."""
    parts = []
    for text in path.split(">"):
        try:
            parts.append(keyword_for_tag(Tag(text.strip("()").replace(",", ""))) or text)
        except (ValueError, TypeError, OverflowError):
            parts.append(text)
    return ">".join(parts)


def _listed(names: Iterable[str]) -> list[str]:
    return sorted(names)[:MAX_LISTED_KEYWORDS]


def _raster_name(data: bytes) -> str:
    return "PNG" if data.startswith(PNG_MAGIC) else "JPEG"


def _blank_burned_in_text(stored: np.ndarray) -> int:
    """Blanks burned-in text in place (as for DICOM pixels); the number of boxes blanked."""
    frames = stored[None, :, :, None]
    try:
        redactions = clean_burned_in_text(frames, photometric="MONOCHROME2", bits_stored=8 * stored.itemsize)
    except BurnedInTextError as error:
        raise UploadRejected(422, f"the image cannot be de-identified (burned-in-text): {error}") from error
    return len(redactions)

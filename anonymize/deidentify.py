"""De-identify one DICOM instance: the library call behind the CLI, the batch runner and the API.

Every element is visited - sequences at any depth, private blocks, repeating groups - and gets
one action. Attributes of PS3.15 Table E.1-1 follow the table and the options in force; any other
attribute is kept only when it is known to be safe (an allow-list, not a deny-list):

- sequences are kept and their items visited; UIDs are mapped (`anonymize.uids`);
- dates follow the date options (kept, shifted, or removed), as the table's dates do;
- coded, numeric and binary values (CS, US, DS, OB...) are kept;
- free text (LO, SH, LT, ST, UT, UC, UR, AE) and person names are kept only for `SAFE_TEXT`
  keywords (code meanings, manufacturer...), otherwise removed, or emptied/dummied where the
  IOD requires them (Type 2/1);
- free text an option keeps cleaned (descriptions and comments under Clean Descriptors, SR text
  under Clean Structured Content, free-text characteristics such as Allergies under Retain Patient
  Characteristics) keeps only words of the safe vocabulary (`anonymize.vocabulary`), and so does
  the meaning of a code from a private "99..." coding scheme (a local system's free text); the
  summary counts the words replaced per attribute;
- private attributes are removed unless on the safe-private allow-list; 50xx curves and 60xx
  overlays are removed whole; anything pydicom cannot name is removed.

Values removed from identifying attributes are then scrubbed from all remaining text
(`anonymize.descriptors`), burned-in text is blanked (`anonymize.pixels`), the markers are set
(`anonymize.markers`), and the file meta is rebuilt from scratch with an empty preamble. A file
that cannot be de-identified with confidence raises `Quarantined`; nothing partial is returned.
Messages and the summary never hold a value read from the file.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

import numpy as np
import pydicom
from blake3 import blake3
from pydicom.datadict import dictionary_has_tag, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MediaStorageDirectoryStorage, RLELossless

try:  # the RLE Lossless plugin pydicom decodes with (pylibjpeg-rle, a dependency)
    from rle import decode_pixel_data as decode_rle
except ImportError:  # pragma: no cover - pydicom then decodes RLE itself, slower
    decode_rle = None

from anonymize import iod
from anonymize.dates import DateValueError, shift_date, shift_datetime
from anonymize.descriptors import IdentifyingTerms
from anonymize.markers import carries_our_markers, set_markers
from anonymize.patients import date_shift_days, is_pseudonym, pseudonym
from anonymize.pixels import GRAYSCALE_INTERPRETATIONS, BurnedInTextError, Redaction, burned_in_text_cleaned
from anonymize.private import SafePrivateList, load_safe_private
from anonymize.profile import (
    CLEAN,
    DUMMY,
    EMPTY,
    KEEP,
    REMOVE,
    UID,
    AttributeRule,
    DeidentificationOptions,
    ProfileTable,
    load_profile,
    resolve_by_type,
)
from anonymize.secret import key_id
from anonymize.uids import CLASS_UID_KEYWORDS, UidMapper
from anonymize.vocabulary import Vocabulary, load_vocabulary
from common.errors import DataError

TEXT_VRS: Final = frozenset({"AE", "LO", "LT", "SH", "ST", "UT", "UC", "UR", "PN"})
DATE_VRS: Final = frozenset({"DA", "DT", "TM"})
# Free-text attributes outside Table E.1-1 that name codes, devices or processing, never a person.
SAFE_TEXT: Final = frozenset({
    "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning", "LongCodeValue",
    "URNCodeValue", "ContextIdentifier", "MappingResourceName", "CodingSchemeName", "Manufacturer",
    "ManufacturerModelName", "SoftwareVersions", "PositionReferenceIndicator", "WindowCenterWidthExplanation",
    "RescaleType", "ConvolutionKernel", "SequenceName", "ReceiveCoilName", "TransmitCoilName", "ImagedNucleus",
    "LUTExplanation", "ContributionDescription", "DeidentificationMethod", "ImplementationVersionName",
})
# Kept (vocabulary-cleaned) only under the Clean Structured Content Option: the free text of SR content.
STRUCTURED_TEXT: Final = frozenset({"TextValue"})
# Text VRs that hold prose when an option keeps them "cleaned" (AE titles, URIs, names are not prose).
FREE_TEXT_VRS: Final = frozenset({"LO", "LT", "SH", "ST", "UT", "UC"})
# Cleaned text attributes that are not prose: kept as the option says.
NOT_PROSE: Final = frozenset({"TimezoneOffsetFromUTC"})
MAX_TEXT_LENGTH: Final = {"SH": 16, "LO": 64, "ST": 1024, "LT": 10240}
PSEUDONYMISED: Final = frozenset({"PatientID", "PatientName"})
PSEUDONYM = "P"  # our action letter for PatientID/PatientName replaced by the keyed pseudonym
DUMMY_TEXT: Final = "ANONYMIZED"
DUMMY_VALUES: Final = {"DA": "19000101", "DT": "19000101000000", "TM": "000000", "AS": "000D",
                       "IS": "0", "DS": "0", "CS": "ANONYMIZED"}
# Invalid text or UID values are harmless here (text is kept or removed as text, UIDs are hashed);
# real exports carry them often (UID components with leading zeros).
LENIENT_VRS: Final = TEXT_VRS | {"UI"}
_PRODUCED: Final = frozenset({DUMMY_TEXT, *DUMMY_VALUES.values()})
REPEATING_GROUPS: Final = (0x5000, 0x6000)  # curves and overlays: removed whole
UNDEFINED_LENGTH: Final = 0xFFFFFFFF


class Quarantined(DataError):
    """The instance cannot be de-identified with confidence; nothing of it may be written.

    `reason` is a short code for the audit ("not-dicom", "truncated", "invalid-value",
    "not-composite", "no-pixel-decoder", "burned-in-text"); the message explains it without any
    value read from the file.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DeidentificationSummary:
    """What was done to one instance, with no value read from it.

    `actions` maps a tag path ("(0010,0010)", nested "(0040,A730)>(0040,A160)") to the action
    letters applied there (K, C, X, Z, D, U, and P for the keyed pseudonym); `removed_words` maps
    the path of each vocabulary-cleaned text to how many of its words were replaced.
    """

    input_blake3: str
    output_blake3: str
    sop_class_uid: str
    options: tuple[str, ...]
    key_id: str
    actions: dict[str, str]
    redactions: tuple[Redaction, ...]
    dates: str
    removed_words: dict[str, int] = field(default_factory=dict)


@dataclass
class _Walk:
    """The state of de-identifying one data set."""

    profile: ProfileTable
    options: DeidentificationOptions
    uids: UidMapper
    safe_private: SafePrivateList
    sop_class: str
    patient_pseudonym: str
    date_shift: int | None
    vocabulary: Vocabulary
    terms: IdentifyingTerms = field(default_factory=IdentifyingTerms)
    removed_words: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    retained: set[int] = field(default_factory=set)  # id() of elements an option keeps as they are
    actions: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))


def deidentify_bytes(data: bytes, options: DeidentificationOptions, secret: bytes, *,
                     safe_private: SafePrivateList | None = None, vocabulary: Vocabulary | None = None,
                     input_blake3: str | None = None) -> tuple[bytes, DeidentificationSummary]:
    """De-identify a DICOM Part 10 file given as bytes; return the new file's bytes and a summary.

    Raises Quarantined when the input is not DICOM, is truncated or invalid, or holds burned-in
    text that cannot be cleaned with confidence. The output re-reads cleanly (checked here).
    `input_blake3` spares hashing the input again when the caller already did (`file_digest`).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # pydicom's warnings quote values: keep them off the console
        ds, summary = _deidentified(io.BytesIO(data), options, secret, safe_private, vocabulary, caught)
        output = encode(ds)
        _check_rereads(io.BytesIO(output))
    return output, replace(summary, input_blake3=input_blake3 or file_digest(data), output_blake3=file_digest(output))


def deidentify_file(source: Path, destination: Path, options: DeidentificationOptions, secret: bytes, *,
                    safe_private: SafePrivateList | None = None, vocabulary: Vocabulary | None = None,
                    input_blake3: str | None = None) -> DeidentificationSummary:
    """`deidentify_bytes` from file to file, without holding either in memory twice: the batch's
    path (read once by pydicom, written once, digests over memory maps). `destination` is written
    only when the whole file came out clean, and removed again if it does not re-read."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds, summary = _deidentified(source, options, secret, safe_private, vocabulary, caught)
        try:
            save(ds, destination)
            _check_rereads(destination)
        except BaseException:
            Path(destination).unlink(missing_ok=True)
            raise
    return replace(summary, input_blake3=input_blake3 or path_digest(source), output_blake3=path_digest(destination))


def _deidentified(source: io.BytesIO | Path, options: DeidentificationOptions, secret: bytes,
                  safe_private: SafePrivateList | None, vocabulary: Vocabulary | None,
                  caught: list) -> tuple[Dataset, DeidentificationSummary]:
    ds = read_dataset(source)
    try:
        return ds, deidentify_dataset(ds, options, secret, safe_private=safe_private, vocabulary=vocabulary,
                                      warnings_seen=caught)
    except MALFORMED_ELEMENT as exc:
        # pydicom decodes elements when first touched: an unknown VR or a length that does not fit
        # its VR surfaces wherever the profile first reads that element. Nothing is written.
        raise Quarantined("invalid-value", f"an element has an unknown Value Representation or a length "
                                           f"that does not fit its VR ({type(exc).__name__})") from exc


def file_digest(data: bytes) -> str:
    """The audit's digest of a file's bytes: BLAKE3, 256 bits, hex (what `b3sum` prints)."""
    return blake3(data).hexdigest()


def path_digest(path: Path) -> str:
    """`file_digest` of the file at `path`, read through a memory map (no copy)."""
    if Path(path).stat().st_size == 0:
        return file_digest(b"")
    return blake3().update_mmap(path).hexdigest()  # one thread: a threaded digest deadlocks forked workers


# What pydicom raises when it decodes a malformed element: an unknown VR, bytes that do not fit it.
MALFORMED_ELEMENT = (NotImplementedError, BytesLengthException, struct.error, OSError, EOFError)


def read_dataset(data: bytes | io.BytesIO | Path) -> Dataset:
    """Parse a Part 10 file (its bytes, a stream or a path); Quarantined when it is not DICOM or was cut short."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data) if isinstance(data, bytes) else data)
    except InvalidDicomError as exc:
        raise Quarantined("not-dicom", "not a DICOM Part 10 file (no 'DICM' marker after the 128-byte "
                                       "preamble)") from exc
    except (EOFError, OSError, ValueError, KeyError, TypeError, *MALFORMED_ELEMENT) as exc:
        raise Quarantined("truncated", f"the DICOM header cannot be parsed: truncated or corrupt "
                                       f"({type(exc).__name__})") from exc
    try:
        _require_complete(ds)
    except MALFORMED_ELEMENT as exc:
        raise Quarantined("invalid-value", f"an element has an unknown Value Representation or a length that does "
                                           f"not fit its VR ({type(exc).__name__})") from exc
    return ds


def _require_complete(ds: Dataset) -> None:
    """pydicom stops quietly at the end of a cut-off file, keeping a short last element: refuse it."""
    for tag in ds.keys():
        raw = ds.get_item(tag)
        if (isinstance(raw, RawDataElement) and raw.length != UNDEFINED_LENGTH and raw.value is not None
                and len(raw.value) < raw.length):
            raise Quarantined("truncated", f"element {BaseTag(tag)} is shorter than its declared length: "
                                           "the file is truncated")


def deidentify_dataset(ds: Dataset, options: DeidentificationOptions, secret: bytes, *,
                       safe_private: SafePrivateList | None = None, vocabulary: Vocabulary | None = None,
                       warnings_seen: list[warnings.WarningMessage] | None = None) -> DeidentificationSummary:
    """De-identify `ds` in place (see the module docstring); hashes in the summary are left empty."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if not sop_class or "SOPInstanceUID" not in ds:
        raise Quarantined("not-composite", "the file has no SOP Class or SOP Instance UID: not a composite "
                                           "instance this tool can de-identify")
    if sop_class == MediaStorageDirectoryStorage:
        raise Quarantined("not-composite", "a DICOMDIR media directory is not de-identified; de-identify the "
                                           "instances it indexes instead")
    present = set(ds.dir())
    walk = _start(ds, options, secret, safe_private, sop_class, vocabulary or load_vocabulary())
    _visit(walk, ds, "", top_level=True, warnings_seen=warnings_seen if warnings_seen is not None else [])
    _scrub(walk, ds)
    # Always present, so every output carries keyed proof of its origin (see anonymize.gate).
    ds.PatientID = ds.PatientName = walk.patient_pseudonym
    _restore_required(ds, sop_class, present)
    redactions, pixels_cleaned = _clean_pixels(ds, options)
    dates = "MODIFIED" if options.retain_modified_dates else "UNMODIFIED" if options.retain_full_dates else "REMOVED"
    set_markers(ds, options, dates=dates, pixels_cleaned=pixels_cleaned)
    _rebuild_file_meta(ds)
    actions = {path: "|".join(sorted(letters)) for path, letters in sorted(walk.actions.items())}
    return DeidentificationSummary("", "", sop_class, options.enabled, key_id(secret), actions,
                                   tuple(redactions), dates, dict(sorted(walk.removed_words.items())))


def _start(ds: Dataset, options: DeidentificationOptions, secret: bytes, safe_private: SafePrivateList | None,
           sop_class: str, vocabulary: Vocabulary) -> _Walk:
    """The walk's state; the date shift is keyed by the original Patient ID, and is skipped when the
    data set is already ours (its Patient ID is our pseudonym: its dates were shifted before)."""
    patient_id = str(ds.get("PatientID", "") or "")
    already_ours = is_pseudonym(secret, patient_id) and carries_our_markers(ds)
    shift = date_shift_days(secret, patient_id) if options.retain_modified_dates and not already_ours else None
    return _Walk(load_profile(), options, UidMapper(secret), safe_private or load_safe_private(), sop_class,
                 pseudonym(secret, patient_id), shift, vocabulary)


# ---------------------------------------------------------------------------------------------
# The walk: one action per element
# ---------------------------------------------------------------------------------------------


def _visit(walk: _Walk, ds: Dataset, path: str, *, top_level: bool, warnings_seen: list) -> None:
    """Apply an action to every element of `ds` (recursing into sequences), then drop private
    creators whose block is left empty."""
    for tag in list(ds.keys()):
        elem = _element(ds, tag, warnings_seen)
        here = f"{path}>{_tag_text(elem.tag)}" if path else _tag_text(elem.tag)
        action = _decide(walk, ds, elem, top_level)
        walk.actions[here].add(action)
        if action == KEEP and walk.profile.rule_for(elem.tag) is not None:
            walk.retained.add(id(elem))
        _apply(walk, ds, elem, action, here, warnings_seen)
    _drop_orphan_creators(ds)


def _element(ds: Dataset, tag: BaseTag, warnings_seen: list) -> DataElement:
    """The converted element; Quarantined when pydicom cannot read its value, or flags invalid a value
    that is interpreted (numbers, dates: NumberOfFrames "1A" must not reach the pixel decoder)."""
    seen = len(warnings_seen)
    try:
        elem = ds[tag]
    except (ValueError, KeyError, TypeError, UnicodeError, NotImplementedError) as exc:
        raise Quarantined("invalid-value", f"element {BaseTag(tag)} cannot be decoded for its VR "
                                           f"({type(exc).__name__})") from exc
    if elem.VR not in LENIENT_VRS and any("Invalid value for VR" in str(w.message) for w in warnings_seen[seen:]):
        raise Quarantined("invalid-value", f"element {BaseTag(tag)} has a value invalid for its VR {elem.VR}")
    return elem


def _decide(walk: _Walk, ds: Dataset, elem: DataElement, top_level: bool) -> str:
    tag = elem.tag
    if tag.element == 0 or tag.group == 0x0002:
        return REMOVE  # group lengths are recomputed by the writer; file meta is rebuilt
    if tag.is_private:
        return _private_action(walk, elem)
    if (tag.group & 0xFF00) in REPEATING_GROUPS:
        return REMOVE
    if top_level and elem.keyword in PSEUDONYMISED:
        return PSEUDONYM
    rule = walk.profile.rule_for(tag)
    attribute_type = iod.attribute_type(walk.sop_class, elem.keyword) if top_level else None
    if rule is not None:
        return resolve_by_type(rule.action(walk.options), attribute_type)
    return _unlisted_action(walk, elem, attribute_type)


def _private_action(walk: _Walk, elem: DataElement) -> str:
    if elem.tag.is_private_creator:
        return KEEP  # dropped afterwards when no element of its block survives
    allowed = walk.options.retain_safe_private and walk.safe_private.allows(
        elem.private_creator, elem.tag.group, elem.tag.element)
    return CLEAN if allowed else REMOVE


def _unlisted_action(walk: _Walk, elem: DataElement, attribute_type: str | None) -> str:
    """The allow-list for attributes Table E.1-1 does not name."""
    if not dictionary_has_tag(elem.tag) or elem.VR == "UN":
        return REMOVE
    if elem.VR == "SQ" or elem.VR == "UI":
        return KEEP
    if elem.VR in DATE_VRS:
        if walk.options.retain_full_dates:
            return KEEP
        return CLEAN if walk.options.retain_modified_dates else resolve_by_type("X/Z/D", attribute_type)
    if elem.VR not in TEXT_VRS:
        return KEEP
    if elem.keyword in SAFE_TEXT or (elem.keyword in STRUCTURED_TEXT and walk.options.clean_structured_content):
        return CLEAN
    return resolve_by_type("X/Z/D", attribute_type)


def _apply(walk: _Walk, ds: Dataset, elem: DataElement, action: str, path: str, warnings_seen: list) -> None:
    if action == REMOVE:
        _collect(walk, elem)
        del ds[elem.tag]
    elif action == EMPTY:
        _collect(walk, elem)
        elem.value = Sequence() if elem.VR == "SQ" else None
    elif action == PSEUDONYM:
        _collect(walk, elem)
        elem.value = walk.patient_pseudonym
    elif elem.VR == "SQ":
        for item in elem.value:
            _visit(walk, item, path, top_level=False, warnings_seen=warnings_seen)
    elif elem.VR == "UI":
        if not (action == KEEP and walk.options.retain_uids) and elem.keyword not in CLASS_UID_KEYWORDS:
            _collect(walk, elem)
            elem.value = _map_values(elem.value, walk.uids.map)
    elif action == DUMMY or action == UID:
        _collect(walk, elem)
        elem.value = _dummy(elem)
    elif action == CLEAN and (_is_prose(walk, elem) or _is_local_code_meaning(ds, elem)):
        _clean_prose(walk, elem, path)
    elif action == CLEAN and elem.VR in ("DA", "DT") and walk.date_shift is not None and elem.value not in (None, ""):
        _collect(walk, elem)
        shift = shift_date if elem.VR == "DA" else shift_datetime
        try:
            elem.value = _map_values(elem.value, lambda value: shift(value, walk.date_shift))
        except DateValueError as exc:
            raise Quarantined("invalid-value", f"element {elem.tag}: {exc}") from exc


def _is_prose(walk: _Walk, elem: DataElement) -> bool:
    """Free text that an option keeps cleaned: a table attribute (a description, a comment, a
    free-text characteristic) or SR text; not coded text kept as it is (`SAFE_TEXT`)."""
    if elem.VR not in FREE_TEXT_VRS or elem.tag.is_private or elem.keyword in NOT_PROSE:
        return False
    return walk.profile.rule_for(elem.tag) is not None or elem.keyword in STRUCTURED_TEXT


def _is_local_code_meaning(ds: Dataset, elem: DataElement) -> bool:
    """The meaning of a code from a private coding scheme (designator "99...", PS3.16 8.2): a
    local system's free text, not a standard's vocabulary, so it is cleaned like a descriptor."""
    if elem.keyword != "CodeMeaning":
        return False
    return str(ds.get("CodingSchemeDesignator", "") or "").upper().startswith("99")


def _clean_prose(walk: _Walk, elem: DataElement, path: str) -> None:
    """Only vocabulary words survive; the count of words replaced goes to the summary."""
    if elem.value in (None, ""):
        return
    removed = 0

    def clean(value: str) -> str:
        nonlocal removed
        cleaned = walk.vocabulary.clean(value, max_length=MAX_TEXT_LENGTH.get(elem.VR))
        removed += cleaned.removed_words
        return cleaned.text

    elem.value = _map_values(elem.value, clean)
    if removed:
        walk.removed_words[path] += removed


def _collect(walk: _Walk, elem: DataElement) -> None:
    """Remember the identifying values an element held, for scrubbing them elsewhere."""
    if elem.VR == "SQ":
        for item in elem.value or []:
            for nested in item:
                _collect(walk, nested)
        return
    if elem.VR not in TEXT_VRS | DATE_VRS | {"UI"} or elem.value in (None, ""):
        return
    rule = None if elem.tag.is_private else walk.profile.rule_for(elem.tag)
    if rule is not None and _is_descriptor(rule):
        return  # a description, not an identifier: its words are ordinary vocabulary
    for value in _values(elem.value):
        if str(value) in _PRODUCED or str(value) == walk.patient_pseudonym or walk.uids.is_mapped(str(value)):
            continue  # a value this tool writes, met again when de-identifying its own output
        if elem.VR == "PN":
            walk.terms.add_name(str(value))
        else:
            walk.terms.add_value(str(value))


def _is_descriptor(rule: AttributeRule) -> bool:
    return "clean_descriptors" in rule.options or "clean_structured_content" in rule.options


def _dummy(elem: DataElement) -> object:
    """A value of the element's VR that identifies nobody."""
    if elem.VR in TEXT_VRS:
        return DUMMY_TEXT[: 16 if elem.VR in ("SH", "AE") else 64]
    if elem.VR in DUMMY_VALUES:
        return DUMMY_VALUES[elem.VR]
    return None


def _map_values(value: object, mapping) -> object:
    if isinstance(value, (list, MultiValue)):
        return [mapping(str(v)) for v in value]
    return mapping(str(value))


def _values(value: object) -> Iterator[object]:
    if isinstance(value, (list, MultiValue)):
        yield from value
    else:
        yield value


def _drop_orphan_creators(ds: Dataset) -> None:
    """Remove Private Creator elements whose block no longer holds any element."""
    kept_blocks = {(tag.group, tag.element >> 8) for tag in ds.keys() if tag.is_private and tag.element > 0xFF}
    for tag in [tag for tag in ds.keys() if tag.is_private_creator]:
        if (tag.group, tag.element) not in kept_blocks:
            del ds[tag]


def _tag_text(tag: BaseTag) -> str:
    if tag.is_private and tag.element > 0xFF:
        return f"({tag.group:04X},xx{tag.element & 0xFF:02X})"
    return f"({tag.group:04X},{tag.element:04X})"


# ---------------------------------------------------------------------------------------------
# After the walk: scrub text, restore required attributes, pixels, file meta
# ---------------------------------------------------------------------------------------------


def _scrub(walk: _Walk, ds: Dataset) -> None:
    """Mask every collected identifying value wherever it remains in free text (any depth), except
    in attributes an option retains on purpose (an institution name under Retain Institution Identity)."""
    if not len(walk.terms):
        return
    for elem in ds.iterall():
        if elem.VR in TEXT_VRS and elem.value not in (None, "") and id(elem) not in walk.retained:
            elem.value = _map_values(elem.value, walk.terms.scrub)


def _restore_required(ds: Dataset, sop_class: str, present: set[str]) -> None:
    """Put back, empty (Type 2) or dummy (Type 1), any required attribute the input had and the
    walk removed: the output must stay a valid instance of its IOD."""
    for keyword, attribute_type in iod.required_attributes(sop_class).items():
        if keyword in present and keyword not in ds:
            elem = DataElement(tag_for_keyword(keyword), dictionary_VR(keyword), None)
            if elem.VR == "SQ":
                elem.value = Sequence([Dataset()] if attribute_type == "1" else [])
            elif attribute_type == "1":
                elem.value = _dummy(elem)
            ds.add(elem)


def _clean_pixels(ds: Dataset, options: DeidentificationOptions) -> tuple[list[Redaction], bool]:
    """Blank burned-in text (Clean Pixel Data Option); (boxes, whether the pixels were cleaned)."""
    marked = str(ds.get("BurnedInAnnotation", "")).upper() == "YES"
    if "PixelData" not in ds:
        return [], False
    if not options.clean_pixel_data:
        if marked:
            raise Quarantined("burned-in-text", "the image is marked BurnedInAnnotation=YES and the "
                                                "clean_pixel_data option is off")
        return [], False
    decoded, in_place = _decoded_pixels(ds)
    try:
        pixels, redactions = burned_in_text_cleaned(decoded, photometric=str(ds.PhotometricInterpretation),
                                                    bits_stored=int(ds.BitsStored))
    except BurnedInTextError as exc:
        raise Quarantined("burned-in-text", str(exc)) from exc
    if marked and not redactions:
        raise Quarantined("burned-in-text", "the image is marked BurnedInAnnotation=YES but no burned-in "
                                            "text was found to blank, so its cleaning cannot be confirmed")
    if redactions and in_place and pixels.nbytes % 2 == 0:
        ds.PixelData = memoryview(pixels).cast("B")  # same layout as read: no re-encoding, no copy
    elif redactions or _hides_extra_content(ds, in_place):
        _store_pixels(ds, pixels)
    return redactions, True


def _hides_extra_content(ds: Dataset, in_place: bool) -> bool:
    """Uncompressed unsigned greyscale pixel data carrying what no viewer shows: bytes beyond the
    image, or bits above Bits Stored (old overlays lived there). Either could hold text; the pixels
    are then written back as decoded, which has neither."""
    if not _native_unsigned_greyscale(ds):
        return False
    needed = int(ds.get("NumberOfFrames") or 1) * int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8
    return not in_place or len(ds.PixelData) > needed + needed % 2


def _decoded_pixels(ds: Dataset) -> tuple[np.ndarray, bool]:
    """The pixels as a (frames, rows, columns, samples) array, and whether it is a read-only view of
    the file's own bytes in their stored layout (uncompressed greyscale: no decoding, no copy)."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise Quarantined("not-composite", "file meta has no (0002,0010) Transfer Syntax UID")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise Quarantined("no-pixel-decoder", f"transfer syntax {syntax.name} has no pixel decoder, "
                                              "so burned-in text cannot be checked") from exc
    if not decoder.is_available:
        raise Quarantined("no-pixel-decoder", f"transfer syntax {syntax.name} needs a decoder plugin that "
                                              "is not installed, so burned-in text cannot be checked")
    interpretation = ds.get("PhotometricInterpretation")
    if interpretation not in GRAYSCALE_INTERPRETATIONS + ("RGB", "YBR_FULL", "YBR_FULL_422"):
        raise Quarantined("no-pixel-decoder", "Photometric Interpretation is not greyscale or RGB/YBR; "
                                              "burned-in text cannot be checked")
    try:
        view = _native_view(ds)
        array = view if view is not None else _rle_decoded(ds)
        if array is None:
            array = ds.pixel_array
    except (ValueError, RuntimeError, AttributeError, KeyError, TypeError) as exc:
        raise Quarantined("truncated", f"the pixel data cannot be decoded: truncated, or image attributes "
                                       f"(group 0028) inconsistent ({type(exc).__name__})") from exc
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    return array.reshape(frames, int(ds.Rows), int(ds.Columns), samples), view is not None


NATIVE_LITTLE_ENDIAN: Final = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def _unsigned_greyscale(ds: Dataset) -> bool:
    """One unsigned greyscale sample of 8 or 16 bits per pixel."""
    return (ds.get("PhotometricInterpretation") in GRAYSCALE_INTERPRETATIONS
            and int(ds.get("SamplesPerPixel") or 1) == 1 and int(ds.get("PixelRepresentation") or 0) == 0
            and ds.get("BitsAllocated") in (8, 16))


def _native_unsigned_greyscale(ds: Dataset) -> bool:
    """Uncompressed little-endian, one unsigned sample of 8 or 16 bits: stored as it is displayed."""
    return ds.file_meta.TransferSyntaxUID in NATIVE_LITTLE_ENDIAN and _unsigned_greyscale(ds)


def _pixel_dtype(ds: Dataset) -> np.dtype:
    """The little-endian unsigned dtype of `_unsigned_greyscale` pixels."""
    return np.dtype(np.uint8 if ds.BitsAllocated == 8 else "<u2")


def _as_pydicom_gives(ds: Dataset, array: np.ndarray) -> np.ndarray | None:
    """`array`, unless a bit above Bits Stored is set: pydicom clears those, so None (decode with pydicom)."""
    if int(ds.BitsStored) < 8 * array.itemsize and int(array.max()) >> int(ds.BitsStored):
        return None
    return array


def _native_view(ds: Dataset) -> np.ndarray | None:
    """Unsigned little-endian greyscale, stored as it is displayed: the pixel data's bytes read in
    place. None whenever pydicom's decoder has work to do (compression, byte order, sign, colour,
    bits above Bits Stored to clear), so the result is exactly what `ds.pixel_array` would give."""
    if not _native_unsigned_greyscale(ds) or not isinstance(ds.PixelData, bytes):
        return None
    dtype = _pixel_dtype(ds)
    count = int(ds.get("NumberOfFrames") or 1) * int(ds.Rows) * int(ds.Columns)
    if len(ds.PixelData) < count * dtype.itemsize:
        return None  # pydicom names what is missing
    return _as_pydicom_gives(ds, np.frombuffer(ds.PixelData, dtype=dtype, count=count))


def _rle_decoded(ds: Dataset) -> np.ndarray | None:
    """Unsigned greyscale RLE Lossless decoded straight by the RLE plugin pydicom itself would use
    (pylibjpeg-rle), frame by frame into one writable array. None whenever pydicom would do more
    (colour, sign, bits above Bits Stored to clear, no plugin, anything malformed: pydicom then
    decodes or names the fault), so the result is exactly what `ds.pixel_array` would give. Skips
    pydicom's copies of each frame, a fifth of an RLE mammogram's decoding time."""
    if ds.file_meta.get("TransferSyntaxUID") != RLELossless or decode_rle is None or not _unsigned_greyscale(ds):
        return None
    frames, rows, columns = int(ds.get("NumberOfFrames") or 1), int(ds.Rows), int(ds.Columns)
    dtype = _pixel_dtype(ds)
    decoded = []
    try:
        for fragment in generate_frames(ds.PixelData, number_of_frames=frames):
            frame = np.frombuffer(decode_rle(fragment, version=2, rows=rows, columns=columns,
                                             bits_allocated=int(ds.BitsAllocated), byteorder="<"), dtype=dtype)
            if frame.size != rows * columns or len(decoded) == frames:
                return None  # pydicom's decoder names what does not fit
            decoded.append(frame)
    except (ValueError, RuntimeError, TypeError, struct.error):
        return None
    if len(decoded) != frames:
        return None
    return _as_pydicom_gives(ds, decoded[0] if frames == 1 else np.concatenate(decoded))  # 1 frame: no copy


def _store_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    """Write cleaned pixels back uncompressed (pydicom's set_pixel_data), keeping the SOP Instance UID."""
    frames, _, _, samples = pixels.shape
    array = pixels if samples > 1 else pixels[..., 0]
    array = array[0] if frames == 1 else array
    interpretation = "RGB" if samples > 1 else str(ds.PhotometricInterpretation)  # pydicom decodes YBR to RGB
    try:
        ds.set_pixel_data(array, interpretation, int(ds.BitsStored), generate_instance_uid=False)
    except NotImplementedError as exc:
        raise Quarantined("unsupported-encoding", "blanked pixels cannot be written back in this file's "
                                                  "transfer syntax (big endian)") from exc


def _rebuild_file_meta(ds: Dataset) -> None:
    """New file meta holding only what Part 10 requires, and an empty preamble (both may carry PHI)."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise Quarantined("not-composite", "file meta has no (0002,0010) Transfer Syntax UID")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    ds.preamble = b"\0" * 128


PIXEL_DATA: Final = 0x7FE00010


def save(ds: Dataset, destination: Path) -> None:
    """`ds` as a Part 10 file at `destination`, exactly the bytes pydicom's `save_as` writes.

    Native (uncompressed) pixel data, when it is the last element of a little-endian file, is
    written straight from its buffer after the rest: pydicom passes every element through an
    in-memory buffer first, two extra copies of a 25 MB frame."""
    element = ds.get(PIXEL_DATA) if "PixelData" in ds else None
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if (element is None or element.is_undefined_length or max(ds.keys()) != PIXEL_DATA
            or element.VR not in ("OB", "OW") or syntax not in NATIVE_LITTLE_ENDIAN):
        ds.save_as(destination, enforce_file_format=True)
        return
    value = memoryview(element.value).cast("B")
    padding = b"\0" * (len(value) % 2)
    length = len(value) + len(padding)
    header = (struct.pack("<HH2sHI", 0x7FE0, 0x0010, element.VR.encode(), 0, length)
              if syntax == ExplicitVRLittleEndian else struct.pack("<HHI", 0x7FE0, 0x0010, length))
    del ds[PIXEL_DATA]
    try:
        with open(destination, "wb") as handle:
            ds.save_as(handle, enforce_file_format=True)
            handle.write(header)
            handle.write(value)
            handle.write(padding)
    finally:
        ds[PIXEL_DATA] = element


def encode(ds: Dataset) -> bytes:
    """The Part 10 bytes of a data set."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _check_rereads(data: io.BytesIO | Path) -> None:
    """The output must parse back completely (the pixel data, written last from a checked array or
    copied as it was, is not parsed again); a failure here is our bug, never written out."""
    try:
        for _ in pydicom.dcmread(data, stop_before_pixels=True).iterall():
            pass
    except Exception as exc:  # noqa: BLE001 - any parse failure of our own output blocks the write
        raise Quarantined("output-unreadable", f"the de-identified output does not re-read cleanly "
                                               f"({type(exc).__name__})") from exc

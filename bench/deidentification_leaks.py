"""What each de-identifier leaves: mammofl, dicognito, pydicom/deid and dicom-anonymizer on the same files.

Two synthetic mammograms carry planted fake PHI (tests/fixtures/anonymize_canaries.py): one with
a canary in every place PHI hides (identifying attributes, nested sequences, private blocks,
overlays and curves, SR content, file meta and preamble), one with free text whose names,
numbers, dates and addresses appear in no other attribute (descriptions, comments, histories, a
nested request). Each tool de-identifies both with its defaults; every output byte is searched,
case-insensitively, for every canary. The table goes to stdout, and to --out as Markdown.

    .venv/bin/python bench/deidentification_leaks.py [--out docs/deidentification-comparison.md]

Needs the dev extras (`make venv` installs them: dicognito, deid, dicom-anonymizer).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the canaries live in tests/fixtures

from anonymize.deidentify import Quarantined, deidentify_bytes
from anonymize.profile import DEFAULT_OPTIONS, DeidentificationOptions, parse_options
from common.data.synthetic_dicom import synthesize_dataset
from tests.fixtures.anonymize_canaries import (
    CANARIES,
    FREE_TEXT,
    LOCAL_CODE_MEANING,
    NESTED_FREE_TEXT,
    PHI_WORDS,
    plant_canaries,
    plant_free_text,
)

MAMMOGRAPHY = "1.2.840.10008.5.1.4.1.1.1.2"
SECRET = bytes(range(32))
# Where each canary of the first file was planted.
PLANTED = {
    "ZQXFAMILY": "Patient Name (and inside descriptors, SR text, a nested code meaning)",
    "ZQXGIVEN": "Patient Name (given name; SR text)", "ZQXMRN4242": "Patient ID (and Image Comments, SR text)",
    "ZQXOTHER777": "Other Patient IDs Sequence", "ZQXACC555": "Accession Number (top level and in a request item)",
    "ZQXSTUDY9": "Study ID", "ZQXREFDOC": "Referring Physician (and SR text)", "ZQXPERFDOC": "Performing Physician",
    "ZQXOPERATOR": "Operators' Name", "ZQXRP123": "Requested Procedure ID (nested)",
    "ZQXSPS321": "Scheduled Procedure Step ID (nested)", "ZQX Canary Hospital": "Institution Name (and Image Comments)",
    "ZQXStreet": "Institution Address", "ZQXTown": "Institution Address", "ZQXDEPT": "Institutional Department",
    "ZQXSTATION1": "Station Name (and Gantry ID, Detector ID)", "ZQXSERIAL99": "Device Serial Number",
    "ZQXNESTED": "a Person Name three sequences deep", "ZQXSRPERSON": "SR Person Observer Name",
    "ZQXOVERLAY": "60xx overlay description and label", "ZQXCURVE": "50xx curve label",
    "ZQXAE": "file meta Source AE Title", "ZQXPRIVMETA": "file meta Private Information",
    "ZQXPREAMBLE": "the 128-byte preamble", "ZQXPRIVATE": "a private element, nested",
    "ZQXGANTRY": "Gantry ID", "1.2.826.0.1.3680043.99.4242.1": "a referenced prior study's UID",
    "19610203": "Patient Birth Date", "20190506": "study, series and content dates",
}


def free_text_planted(word: str) -> str:
    """The attribute whose free text (and no other attribute) holds `word`."""
    where = [keyword for keyword, text in {**FREE_TEXT, **NESTED_FREE_TEXT}.items() if word in text]
    if word in LOCAL_CODE_MEANING:
        return "only in a nested Code Meaning of a local (99...) coding scheme"
    nested = " (nested)" if where and where[0] in NESTED_FREE_TEXT else ""
    return f"only in {', '.join(where)}{nested}"


def tools() -> dict[str, Callable[[Path], bytes]]:
    descriptors = parse_options([*DEFAULT_OPTIONS.enabled, "clean_descriptors", "clean_structured_content"])
    return {
        "mammofl default": lambda path: _ours(path, DEFAULT_OPTIONS),
        "mammofl +clean_descriptors": lambda path: _ours(path, descriptors),
        "mammofl Basic Profile": lambda path: _ours(path, DeidentificationOptions()),
        f"dicognito {version('dicognito')}": _dicognito,
        f"deid {version('deid')} (default recipe)": _deid,
        f"dicom-anonymizer {version('dicom-anonymizer')}": _dicom_anonymizer,
    }


def _ours(path: Path, options: DeidentificationOptions) -> bytes:
    try:
        return deidentify_bytes(path.read_bytes(), options, SECRET)[0]
    except Quarantined:
        return b""


def _dicognito(path: Path) -> bytes:
    from dicognito.anonymizer import Anonymizer

    dataset = pydicom.dcmread(path)
    Anonymizer().anonymize(dataset)
    return _encoded(dataset)


def _deid(path: Path) -> bytes:
    from deid.dicom import replace_identifiers

    with tempfile.TemporaryDirectory() as out:
        written = replace_identifiers([str(path)], save=True, output_folder=out)
        return Path(written[0]).read_bytes()


def _dicom_anonymizer(path: Path) -> bytes:
    from dicomanonymizer import anonymize_dataset

    dataset = pydicom.dcmread(path)
    anonymize_dataset(dataset)
    return _encoded(dataset)


def _encoded(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def canary_files(folder: Path) -> tuple[Path, Path]:
    synthesize_dataset(folder / "data", sites=1, per_site=2, size=128, seed=5, burned_in_text=0.0)
    mammogram = next(path for path in sorted((folder / "data").rglob("*.dcm"))
                     if pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID == MAMMOGRAPHY)
    structured = plant_canaries(mammogram, folder / "canaries.dcm") and folder / "canaries.dcm"
    free_text = folder / "free-text.dcm"
    plant_free_text(pydicom.dcmread(mammogram)).save_as(free_text, enforce_file_format=True)
    return structured, free_text


def leaks(output: bytes, canaries: tuple[str, ...]) -> set[str]:
    upper = output.upper()
    return {canary for canary in canaries if canary.upper().encode() in upper}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the table as Markdown here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-leaks-") as scratch:
        structured, free_text = canary_files(Path(scratch))
        found = {name: (leaks(run(structured), CANARIES), leaks(run(free_text), PHI_WORDS))
                 for name, run in tools().items()}
    names = list(found)
    lines = ["| canary | planted in | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for canary in CANARIES:
        marks = ["**left**" if canary in found[name][0] else "removed" for name in names]
        lines.append(f"| `{canary}` | {PLANTED[canary]} | " + " | ".join(marks) + " |")
    for word in PHI_WORDS:
        marks = ["**left**" if word in found[name][1] else "removed" for name in names]
        lines.append(f"| `{word}` | {free_text_planted(word)} | " + " | ".join(marks) + " |")
    total = len(CANARIES) + len(PHI_WORDS)
    lines.append("| **left, of " + str(total) + "** | | " + " | ".join(
        f"**{len(found[name][0]) + len(found[name][1])}**" for name in names) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(HEADER + table + "\n" + FOOTER, encoding="utf-8")


HEADER = """# De-identification: what each tool leaves on the same files

Measured by `bench/deidentification_leaks.py` (rerun it to refresh this table): two synthetic
mammograms with planted fake PHI, de-identified by each tool with its defaults; "left" means the
canary's bytes are still somewhere in the output file (case-insensitive search of every byte).
The first 29 rows are one file with a canary in every place PHI hides; the rest are one file
whose free text (Image Comments, Study Description, Patient Comments, Derivation Description,
Frame Comments, Additional Patient History, Allergies, and a nested Requested Procedure
Description and Reason for the Requested Procedure, and the meaning of a code from a local
coding scheme) holds names, numbers, dates and an address that no other attribute holds.

"""
FOOTER = """
Notes:
- mammofl with `clean_descriptors` keeps descriptors reduced to safe vocabulary words: a canary
  is never one of them, so it leaves as much as the default (nothing).
- dicognito replaces names, IDs and dates with consistent fakes and keeps descriptions and
  comments (its documented scope: it does not parse free text); deid's default recipe blanks a
  list of header fields and keeps what is not on it; dicom-anonymizer applies the PS3.15 table
  (so it removes the free-text attributes the table lists) but not to everything outside it.
  None of them looks at burned-in pixel text (mammofl's Clean Pixel Data Option; no canary here
  is in the pixels).
- Tool versions are in the column names; a newer version may do better.
"""


if __name__ == "__main__":
    main()

"""Regenerate the vendored de-identification tables under anonymize/profiles/.

Why a script: the tables are data taken from the DICOM standard, and a reviewer must be able to
see (and redo) exactly how they were produced. Two files come out:

``ps3.15-e1-1-<edition>.json``
    PS3.15 Table E.1-1 (Application Level Confidentiality Profile Attributes): per attribute its
    Basic Profile action and the action of every option column. Two independent sources are
    joined and cross-checked:

    - the Basic Profile column as the PyPI package ``dicom-anonymizer`` (2.1) ships it for the
      edition (module ``dicomanonymizer.dicom_anonymization_databases.dicomfields_<edition>``);
    - the option columns (and a second copy of the Basic Profile column) from the machine-readable
      parse of the standard's web edition published as
      ``standard/confidentiality_profile_attributes.json`` by innolitics/dicom-standard
      (commit 8670abd, "Update standard to rev2024b").

    The script refuses to write when the two Basic Profile columns disagree on any attribute.

``iod-attribute-types.json``
    Per SOP Class, the type (1, 1C, 2, 2C, 3) of every top-level attribute of the modules of its
    IOD, and whether the module is mandatory: what the anonymizer needs to choose between X, Z
    and D when Table E.1-1 allows several ("X/Z", "Z/D", ...), and what the tests check the
    output against (PS3.3 Type 1/2 attributes of mandatory modules). Parsed from David Clunie's
    dicom3tools templates (``libsrc/standard/{module,iodcomp}/*.tpl``, QIICR/dicom3tools commit
    72beb60, July 2025), which encode PS3.3's module tables.

Usage (paths are local copies of the two public repositories named above)::

    .venv/bin/python scripts/make_deid_profile.py \\
        --confidentiality-json dicom-standard/standard/confidentiality_profile_attributes.json \\
        --dicom3tools-standard dicom3tools/libsrc/standard
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
from pathlib import Path

from pydicom.datadict import dictionary_has_tag, tag_for_keyword

EDITION = "2024b"
PROFILES_DIR = Path(__file__).resolve().parents[1] / "anonymize" / "profiles"
# innolitics column name -> our option name (anonymize.profile.OPTION_NAMES).
OPTION_COLUMNS = {
    "rtnSafePrivOpt": "retain_safe_private",
    "rtnUIDsOpt": "retain_uids",
    "rtnDevIdOpt": "retain_device_identity",
    "rtnInstIdOpt": "retain_institution_identity",
    "rtnPatCharsOpt": "retain_patient_characteristics",
    "rtnLongFullDatesOpt": "retain_full_dates",
    "rtnLongModifDatesOpt": "retain_modified_dates",
    "cleanDescOpt": "clean_descriptors",
    "cleanStructContOpt": "clean_structured_content",
    "cleanGraphOpt": "clean_graphics",
}
# dicom-anonymizer list name -> Table E.1-1 action code.
ANONYMIZER_LISTS = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D",
                    "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*"}
PRIVATE_ROW = "(GGGG,EEEE) WHERE GGGG IS ODD"
# SOP Class UID -> dicom3tools CompositeIOD name, for the IODs the anonymizer meets.
SOP_CLASS_IODS = {
    "1.2.840.10008.5.1.4.1.1.1.2": "MammographyImageForPresentation",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "MammographyImageForProcessing",
    "1.2.840.10008.5.1.4.1.1.13.1.3": "BreastTomosynthesisImage",
    "1.2.840.10008.5.1.4.1.1.1.1": "DXImageForPresentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DXImageForProcessing",
    "1.2.840.10008.5.1.4.1.1.1": "CRImage",
    "1.2.840.10008.5.1.4.1.1.7": "SCImage",
    "1.2.840.10008.5.1.4.1.1.2": "CTImage",
    "1.2.840.10008.5.1.4.1.1.4": "MRImage",
    "1.2.840.10008.5.1.4.1.1.88.11": "BasicTextSR",
    "1.2.840.10008.5.1.4.1.1.88.22": "EnhancedSR",
    "1.2.840.10008.5.1.4.1.1.88.33": "ComprehensiveSR",
    "1.2.840.10008.5.1.4.1.1.88.50": "MammographyCADSR",
    "1.2.840.10008.5.1.4.1.1.481.5": "RTPlan",
}
_ATTRIBUTE_LINE = re.compile(r'^(\t*)(Name|Sequence)="(\w+)"\s+Type="(\w+)"')
_MACRO_CALL = re.compile(r'^(\t*)InvokeMacro="(\w+)"')
_BLOCK_START = re.compile(r'^(Module|DefineMacro)="(\w+)"')
_IOD_START = re.compile(r'^CompositeIOD="(\w+)"')
_IOD_MODULE = re.compile(r'^\s*Module="(\w+)"\s+Usage="(\w)"')
_TYPE_STRENGTH = {"1": 0, "1C": 1, "2": 2, "2C": 3, "3": 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--confidentiality-json", type=Path, required=True)
    parser.add_argument("--dicom3tools-standard", type=Path, required=True)
    args = parser.parse_args()
    profile = profile_table(json.loads(args.confidentiality_json.read_text(encoding="utf-8")))
    write_json(PROFILES_DIR / f"ps3.15-e1-1-{EDITION}.json", profile)
    write_json(PROFILES_DIR / "iod-attribute-types.json", iod_types(args.dicom3tools_standard))


def write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def profile_table(rows: list[dict]) -> dict:
    """Table E.1-1 as our JSON, after checking both sources agree on the Basic Profile column."""
    basic = anonymizer_basic_column()
    attributes = []
    for row in sorted(rows, key=lambda r: r["tag"]):
        tag = table_tag(row["tag"])
        if tag in basic and basic.pop(tag) != row["basicProfile"]:
            raise SystemExit(f"{row['tag']}: the two sources disagree on the Basic Profile action")
        attributes.append({
            "tag": tag,
            "name": row["name"],
            "in_std_comp_iod": row["stdCompIOD"] == "Y",
            "basic": row["basicProfile"],
            "options": {ours: row[column] for column, ours in OPTION_COLUMNS.items() if column in row},
        })
    unmatched = sorted(tag for tag in basic if "x" not in tag)
    if unmatched:
        raise SystemExit(f"dicom-anonymizer lists attributes the standard's table lacks: {unmatched}")
    return {
        "edition": EDITION,
        "table": "DICOM PS3.15 Table E.1-1 Application Level Confidentiality Profile Attributes",
        "produced_by": "scripts/make_deid_profile.py",
        "sources": {
            "basic_profile": f"PyPI dicom-anonymizer 2.1, dicomfields_{EDITION}",
            "option_columns": "innolitics/dicom-standard standard/confidentiality_profile_attributes.json "
                              "at commit 8670abd (rev2024b), cross-checked against the column above",
        },
        "tag_notation": "8 hex digits; 'x' stands for any hex digit (repeating groups); 'private' is the "
                        "row for every private attribute (odd group)",
        "attributes": attributes,
    }


def anonymizer_basic_column() -> dict[str, str]:
    """tag -> Basic Profile action, as dicom-anonymizer ships the edition."""
    module = importlib.import_module(f"dicomanonymizer.dicom_anonymization_databases.dicomfields_{EDITION}")
    column = {}
    for list_name, action in ANONYMIZER_LISTS.items():
        for entry in getattr(module, list_name):
            group, element = entry[0], entry[1]
            if len(entry) == 4:  # (group, element, group mask, element mask): a repeating group
                column[_masked_tag(group, element, entry[2], entry[3])] = action
            else:
                column[f"{group:04x}{element:04x}"] = action
    return column


def _masked_tag(group: int, element: int, group_mask: int, element_mask: int) -> str:
    digits = f"{group:04x}{element:04x}"
    mask = f"{group_mask:04x}{element_mask:04x}"
    return "".join(d if m == "f" else "x" for d, m in zip(digits, mask, strict=True))


def table_tag(text: str) -> str:
    """'(0010,0010)' -> '00100010'; '(60XX,3000)' -> '60xx3000'; the private row -> 'private'."""
    if text == PRIVATE_ROW:
        return "private"
    return text.strip("()").replace(",", "").lower()


def iod_types(standard_dir: Path) -> dict:
    """Top-level attribute types of each IOD in SOP_CLASS_IODS, from the dicom3tools templates."""
    blocks = parse_blocks(sorted((standard_dir / "module").glob("*.tpl")))
    iods = parse_iods(sorted((standard_dir / "iodcomp").glob("*.tpl")))
    table = {}
    for sop_class, iod_name in SOP_CLASS_IODS.items():
        attributes: dict[str, list[str]] = {}
        for module, usage in iods[iod_name]:
            for keyword, attribute_type in top_level_attributes(module, blocks):
                _merge(attributes, keyword, attribute_type, "M" if usage == "M" else "U")
        table[sop_class] = {"iod": iod_name, "attributes": dict(sorted(attributes.items()))}
    return {
        "produced_by": "scripts/make_deid_profile.py",
        "source": "dicom3tools libsrc/standard templates (QIICR/dicom3tools 72beb60, 2025-07-08), "
                  "which encode the PS3.3 module tables",
        "notation": "keyword -> [type, usage]; type is 1, 1C, 2, 2C or 3 (the strictest over the IOD's "
                    "modules); usage M when a mandatory module requires it, else U (conditional or user)",
        "sop_classes": table,
    }


def _merge(attributes: dict[str, list[str]], keyword: str, attribute_type: str, usage: str) -> None:
    if not dictionary_has_tag(tag_for_keyword(keyword) or 0):
        return  # a name dicom3tools spells differently from pydicom's dictionary: not a keyword we meet
    if keyword not in attributes:
        attributes[keyword] = [attribute_type, usage]
        return
    old_type, old_usage = attributes[keyword]
    stricter = min(old_type, attribute_type, key=_TYPE_STRENGTH.__getitem__)
    attributes[keyword] = [stricter, "M" if "M" in (old_usage, usage) else "U"]


def parse_blocks(paths: list[Path]) -> dict[str, list[str]]:
    """Module and macro name -> their lines."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for path in paths:
        for line in path.read_text(encoding="latin-1").splitlines():
            start = _BLOCK_START.match(line)
            if start:
                current = blocks.setdefault(start.group(2), [])
            elif line.startswith(("ModuleEnd", "MacroEnd")):
                current = None
            elif current is not None:
                current.append(line)
    return blocks


def parse_iods(paths: list[Path]) -> dict[str, list[tuple[str, str]]]:
    """CompositeIOD name -> [(module, usage)]."""
    iods: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for path in paths:
        for line in path.read_text(encoding="latin-1").splitlines():
            start = _IOD_START.match(line)
            if start:
                current = iods.setdefault(start.group(1), [])
            elif line.startswith("CompositeIODEnd"):
                current = None
            elif current is not None and (module := _IOD_MODULE.match(line)):
                current.append((module.group(1), module.group(2)))
    return iods


def top_level_attributes(block: str, blocks: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(keyword, type) of the attributes a module or macro puts at its own top level, macros expanded."""
    found = []
    for line in blocks.get(block, []):
        attribute = _ATTRIBUTE_LINE.match(line)
        if attribute and attribute.group(1) == "\t" and attribute.group(4) in _TYPE_STRENGTH:
            found.append((attribute.group(3), attribute.group(4)))
        call = _MACRO_CALL.match(line)
        if call and call.group(1) == "\t":
            found.extend(top_level_attributes(call.group(2), blocks))
    return found


if __name__ == "__main__":
    main()

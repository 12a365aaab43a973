"""What each IOD requires of its top-level attributes (vendored from PS3.3 via dicom3tools).

Used twice: to choose between X, Z and D where Table E.1-1 leaves the choice to the attribute's
type, and to keep the Type 1/2 attributes of mandatory modules present in the output.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Final

IOD_RESOURCE: Final = "iod-attribute-types.json"


@cache
def _sop_classes() -> dict[str, dict]:
    text = resources.files("anonymize").joinpath("profiles", IOD_RESOURCE).read_text(encoding="utf-8")
    return json.loads(text)["sop_classes"]


def attribute_type(sop_class_uid: str | None, keyword: str) -> str | None:
    """PS3.3 type ("1", "1C", "2", "2C", "3") of a top-level attribute in the SOP Class's IOD,
    or None when the IOD is not in the table or does not contain the attribute."""
    iod = _sop_classes().get(str(sop_class_uid))
    if iod is None:
        return None
    entry = iod["attributes"].get(keyword)
    return entry[0] if entry else None


def required_attributes(sop_class_uid: str | None) -> dict[str, str]:
    """Keyword -> type ("1" or "2") of the unconditional attributes of the IOD's mandatory modules;
    empty for an IOD the table does not cover."""
    iod = _sop_classes().get(str(sop_class_uid))
    if iod is None:
        return {}
    return {keyword: entry[0] for keyword, entry in iod["attributes"].items()
            if entry[1] == "M" and entry[0] in ("1", "2")}

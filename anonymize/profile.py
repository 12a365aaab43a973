"""The de-identification profile: PS3.15 Table E.1-1, its options, and what they decide per attribute.

The table itself is vendored data (``profiles/ps3.15-e1-1-<edition>.json``, produced by
``scripts/make_deid_profile.py``); this module only reads it and answers one question: given the
options in force, which action applies to an attribute. Actions are the standard's letters:
K keep, C clean, X remove, Z empty (or dummy), D dummy, U replace UID; "X/Z", "Z/D"... leave the
choice to the attribute's type in the IOD (`resolve_by_type`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import cache
from importlib import resources
from typing import Final

from pydicom.tag import BaseTag

from common.errors import ConfigError

PROFILE_EDITION: Final = "2024b"
PROFILE_RESOURCE: Final = f"ps3.15-e1-1-{PROFILE_EDITION}.json"

# PS3.16 CID 7050 "De-identification Method", coding scheme DCM.
BASIC_PROFILE_CODE: Final = ("113100", "Basic Application Confidentiality Profile")
OPTION_CODES: Final[dict[str, tuple[str, str]]] = {
    "clean_pixel_data": ("113101", "Clean Pixel Data Option"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_full_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
}

OPTION_HELP: Final[dict[str, str]] = {
    "retain_safe_private": "keep private attributes listed on the creator-qualified safe-private allow-list",
    "retain_uids": "keep original UIDs instead of mapping them to keyed 2.25. UIDs",
    "retain_device_identity": "keep device identifiers (station name, serial numbers, detector IDs)",
    "retain_institution_identity": "keep institution name, address and department",
    "retain_patient_characteristics": "keep age, sex, size, weight and similar characteristics",
    "retain_full_dates": "keep dates and times unchanged",
    "retain_modified_dates": "shift every date of a patient by one keyed, non-zero number of days",
    "clean_descriptors": "keep free-text descriptions and comments, reduced to words of the safe vocabulary",
    "clean_structured_content": "keep SR and acquisition context content, its text reduced to safe vocabulary",
    "clean_pixel_data": "detect burned-in text and blank it; quarantine images that cannot be cleaned",
}
OPTION_NAMES: Final = tuple(OPTION_HELP)
# The options a mammography research export wants: useful (age, intervals) yet clean. No free text:
# descriptions, comments and SR text are removed as the Basic Profile says, unless a user asks for
# clean_descriptors / clean_structured_content (which keep safe vocabulary words only).
DEFAULT_OPTION_NAMES: Final = ("retain_patient_characteristics", "retain_modified_dates", "clean_pixel_data")
# Table E.1-1 columns that `DeidentificationOptions` does not offer: graphics (overlays, curves) are
# always removed rather than cleaned, so the Clean Graphics Option is never claimed.
UNOFFERED_COLUMNS: Final = frozenset({"clean_graphics"})

KEEP, CLEAN, REMOVE, EMPTY, DUMMY, UID = "K", "C", "X", "Z", "D", "U"
# Options that retain (K) never override one that cleans (C) for the same attribute: for example a
# calibration date under Retain Device Identity and Modified Dates is shifted, not kept.
_PROTECTION = {CLEAN: 0, KEEP: 1}


@dataclass(frozen=True)
class DeidentificationOptions:
    """Which PS3.15 options are in force; every field False is the Basic Profile alone."""

    retain_safe_private: bool = False
    retain_uids: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_patient_characteristics: bool = False
    retain_full_dates: bool = False
    retain_modified_dates: bool = False
    clean_descriptors: bool = False
    clean_structured_content: bool = False
    clean_pixel_data: bool = False

    def __post_init__(self) -> None:
        if self.retain_full_dates and self.retain_modified_dates:
            raise ConfigError("options retain_full_dates and retain_modified_dates exclude each other; choose one")

    @property
    def enabled(self) -> tuple[str, ...]:
        """Names of the options in force, in OPTION_NAMES order."""
        return tuple(field.name for field in fields(self) if getattr(self, field.name))

    @property
    def retains_dates(self) -> bool:
        return self.retain_full_dates or self.retain_modified_dates


def parse_options(names: str | list[str] | tuple[str, ...]) -> DeidentificationOptions:
    """Options from names ("a,b" or a list; "-" or "_" alike); ConfigError names an unknown one."""
    if isinstance(names, str):
        names = [name for name in names.split(",") if name.strip()]
    chosen = {name.strip().replace("-", "_") for name in names}
    unknown = sorted(chosen - set(OPTION_NAMES))
    if unknown:
        raise ConfigError(f"unknown de-identification option(s) {', '.join(unknown)}; valid: {', '.join(OPTION_NAMES)}")
    return DeidentificationOptions(**dict.fromkeys(chosen, True))


DEFAULT_OPTIONS: Final = parse_options(DEFAULT_OPTION_NAMES)


@dataclass(frozen=True)
class AttributeRule:
    """One row of Table E.1-1."""

    name: str
    basic: str
    options: dict[str, str]

    def action(self, options: DeidentificationOptions) -> str:
        """The action in force: the most protective of the enabled options' actions, else the basic one."""
        chosen = [action for option, action in self.options.items()
                  if option not in UNOFFERED_COLUMNS and getattr(options, option)]
        return min(chosen, key=_PROTECTION.__getitem__) if chosen else self.basic


class ProfileTable:
    """Table E.1-1 indexed by tag, with its repeating-group rows (50xx, 60xx) and the private row."""

    def __init__(self, document: dict) -> None:
        self.edition: str = document["edition"]
        self.exact: dict[int, AttributeRule] = {}
        self.masked: list[tuple[int, int, AttributeRule]] = []
        for row in document["attributes"]:
            rule = AttributeRule(row["name"], row["basic"], row["options"])
            if row["tag"] == "private":
                self.private = rule
            elif "x" in row["tag"]:
                value = int(row["tag"].replace("x", "0"), 16)
                mask = int("".join("0" if c == "x" else "f" for c in row["tag"]), 16)
                self.masked.append((value, mask, rule))
            else:
                self.exact[int(row["tag"], 16)] = rule

    def rule_for(self, tag: BaseTag) -> AttributeRule | None:
        """The row governing a public tag, or None when the table does not list it."""
        rule = self.exact.get(int(tag))
        if rule is not None:
            return rule
        return next((rule for value, mask, rule in self.masked if int(tag) & mask == value), None)


@cache
def load_profile() -> ProfileTable:
    """The vendored Table E.1-1 of PROFILE_EDITION (read once per process)."""
    text = resources.files("anonymize").joinpath("profiles", PROFILE_RESOURCE).read_text(encoding="utf-8")
    return ProfileTable(json.loads(text))


def resolve_by_type(action: str, attribute_type: str | None) -> str:
    """One action out of a combined one ("X/Z", "Z/D", "X/D", "X/Z/D", "X/Z/U*"), per PS3.15 E.1.1:
    the weakest action that keeps the IOD valid for the attribute's type (1 needs a value, 2 needs
    presence). Unknown type (nested, or an IOD we have no table for): the weakest action allowed."""
    choices = action.replace("*", "").split("/")
    if len(choices) == 1:
        return choices[0]
    base_type = (attribute_type or "3")[0]
    if base_type == "1":
        preferred = (DUMMY, UID, EMPTY)
    elif base_type == "2":
        preferred = (EMPTY, DUMMY, UID)
    else:
        preferred = (REMOVE, EMPTY, DUMMY, UID)
    return next(choice for choice in preferred if choice in choices)

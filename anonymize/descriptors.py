"""Clean Descriptors: identifying values removed from one attribute are scrubbed from every other.

A hospital's export repeats names and IDs in places no table can list: a series description
"SMITH MAMMO", a private comment holding the MRN, a station name inside a gantry ID. While the
profile removes the identifying attributes, `IdentifyingTerms` collects their values; afterwards
every text value still in the data set (private ones included) has each occurrence of a term,
matched as a whole word and case-insensitively, overwritten with '*' of the same length (so no
VR length limit is broken).
"""

from __future__ import annotations

import re
from typing import Final

MASK: Final = "*"
MIN_TERM_LENGTH: Final = 2
MIN_TOKEN_LENGTH: Final = 4
_NAME_SEPARATORS = re.compile(r"[\^=]")
_TOKEN_SEPARATORS = re.compile(r"[\s,;:/\\@()\[\]]+")


class IdentifyingTerms:
    """Values removed from identifying attributes, and the scrubbing of the text that remains."""

    def __init__(self) -> None:
        self._terms: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def add_name(self, value: str) -> None:
        """A person name: every component and every word of it is identifying."""
        for component in _NAME_SEPARATORS.split(value):
            self._add(component)
            for word in component.split():
                self._add(word)

    def add_value(self, value: str) -> None:
        """Any other removed text (an ID, an institution or station, a private string): the whole
        value, and its tokens that carry digits, which is what identifiers look like. Plain words
        are not taken alone: "Breast" from a department name must not blank every BREAST."""
        self._add(value)
        for token in _TOKEN_SEPARATORS.split(value):
            token = token.strip(".-_")
            if len(token) >= MIN_TOKEN_LENGTH and any(c.isdigit() for c in token):
                self._add(token)

    def _add(self, term: str) -> None:
        term = term.strip()
        if len(term) >= MIN_TERM_LENGTH:
            self._terms.add(term)
            self._pattern = None

    def __len__(self) -> int:
        return len(self._terms)

    def scrub(self, text: str) -> str:
        """`text` with every collected term masked."""
        if not self._terms or not text:
            return text
        return self._compiled().sub(lambda match: MASK * len(match.group(0)), text)

    def _compiled(self) -> re.Pattern[str]:
        if self._pattern is None:
            alternatives = "|".join(re.escape(term) for term in sorted(self._terms, key=len, reverse=True))
            self._pattern = re.compile(rf"(?<![0-9A-Za-z])(?:{alternatives})(?![0-9A-Za-z])", re.IGNORECASE)
        return self._pattern

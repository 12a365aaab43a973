"""Vocabulary cleaning of kept free text: only words known to be safe survive.

What the Clean Descriptors (and Clean Structured Content) options keep of a description, a
comment or a free-text patient characteristic: each word on the allow-list (views, laterality,
procedure and modality words, body parts, the BI-RADS lexicon; ``profiles/descriptor-vocabulary.json``,
extensible) is kept as it was written; every other word -- a name, a street, a hospital -- and
every token holding a digit -- a date, a time, a phone number, a record number, an ID -- is
replaced by one `PLACEHOLDER` per run of such words. The result is counted, never quoted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Final

from common.errors import ConfigError

VOCABULARY_RESOURCE: Final = "descriptor-vocabulary.json"
VOCABULARY_FORMAT: Final = "mammofl-descriptor-vocabulary/1"
PLACEHOLDER: Final = "[removed]"
# Words are runs of letters and digits (any script); everything between them is a separator.
_WORD = re.compile(r"[^\W_]+")
# Separators kept between two kept words: ordinary punctuation only, never '@', '#', ':' or digits.
_PLAIN_SEPARATOR = re.compile(r"[ \-/,.()]+")
_TERM = re.compile(r"^[A-Za-z]+$")


@dataclass(frozen=True)
class CleanedText:
    text: str
    removed_words: int


@dataclass(frozen=True)
class Vocabulary:
    """Upper-case words a kept descriptor may retain."""

    words: frozenset[str]

    def clean(self, text: str, *, max_length: int | None = None) -> CleanedText:
        """`text` with every word not on the list (or holding a digit) replaced by `PLACEHOLDER`."""
        parts: list[str] = []
        removed = 0
        position = 0
        previous_kept = False
        for match in _WORD.finditer(text):
            separator = text[position:match.start()]
            position = match.end()
            word = match.group(0)
            if word.isascii() and word.isalpha() and word.upper() in self.words:
                if previous_kept:
                    parts.append(separator if _PLAIN_SEPARATOR.fullmatch(separator) else " ")
                elif parts:
                    parts.append(" ")
                parts.append(word)
                previous_kept = True
            else:
                removed += 1
                if parts and parts[-1] == PLACEHOLDER:
                    continue
                if parts:
                    parts.append(" ")
                parts.append(PLACEHOLDER)
                previous_kept = False
        cleaned = "".join(parts)
        if max_length is not None and len(cleaned) > max_length:
            cleaned = cleaned[:max_length].rsplit(" ", 1)[0] if " " in cleaned[:max_length] else cleaned[:max_length]
        return CleanedText(cleaned, removed)

    def extended(self, words: set[str] | frozenset[str]) -> Vocabulary:
        return Vocabulary(self.words | frozenset(word.upper() for word in words))


def _terms_from_document(document: object, *, source: str) -> frozenset[str]:
    if not isinstance(document, dict) or document.get("format") != VOCABULARY_FORMAT:
        raise ConfigError(f"descriptor vocabulary {source} lacks \"format\": \"{VOCABULARY_FORMAT}\"")
    groups = document.get("terms")
    if not isinstance(groups, dict) or not all(isinstance(words, list) for words in groups.values()):
        raise ConfigError(f"descriptor vocabulary {source}: \"terms\" must map group names to lists of words")
    return _checked({word for words in groups.values() for word in words}, source=source)


def _checked(words: set, *, source: str) -> frozenset[str]:
    bad = sorted(str(word) for word in words if not isinstance(word, str) or not _TERM.match(word))
    if bad:
        raise ConfigError(f"descriptor vocabulary {source}: {len(bad)} entr{'y is' if len(bad) == 1 else 'ies are'} "
                          f"not a single word of letters A-Z (digits, spaces and punctuation never survive "
                          f"cleaning, so they cannot be listed); the first: {bad[0][:40]!r}")
    return frozenset(word.upper() for word in words)


@cache
def _shipped() -> Vocabulary:
    text = resources.files("anonymize").joinpath("profiles", VOCABULARY_RESOURCE).read_text(encoding="utf-8")
    return Vocabulary(_terms_from_document(json.loads(text), source=VOCABULARY_RESOURCE))


def load_vocabulary(extra: Path | str | None = None) -> Vocabulary:
    """The shipped vocabulary, extended by `extra`: a file of the same JSON format, or one word per
    line (``#`` starts a comment). ConfigError names the file and what is wrong with it."""
    if extra is None:
        return _shipped()
    path = Path(extra)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"descriptor vocabulary {path} cannot be read ({type(error).__name__})") from None
    if text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"descriptor vocabulary {path} is not valid JSON (line {error.lineno})") from None
        return _shipped().extended(_terms_from_document(document, source=str(path)))
    words = {line.split("#", 1)[0].strip() for line in text.splitlines()} - {""}
    return _shipped().extended(_checked(words, source=str(path)))

"""The creator-qualified allow-list of safe private attributes (Retain Safe Private Option).

A private attribute is only ever kept when this list names it by private creator, odd group and
element byte (PS3.15 E.3.10: "safe" means known not to carry identity, per the vendor's
conformance statement); everything else private is removed. The vendored list
(``profiles/safe-private.json``) starts empty on purpose: a site adds the attributes it has
reviewed for its own scanners, and may pass its own list instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Final

from common.errors import ConfigError

SAFE_PRIVATE_RESOURCE: Final = "safe-private.json"


@dataclass(frozen=True)
class SafePrivateList:
    """(creator, group, element byte) triples whose value may be kept."""

    entries: frozenset[tuple[str, int, int]]

    def allows(self, creator: str | None, group: int, element: int) -> bool:
        """Whether private element (group, xxEE) of `creator`'s block is on the list."""
        return creator is not None and (creator.strip(), group, element & 0xFF) in self.entries


def load_safe_private(path: Path | str | None = None) -> SafePrivateList:
    """The list at `path`, or the vendored one; ConfigError names a malformed entry."""
    if path is None:
        text = resources.files("anonymize").joinpath("profiles", SAFE_PRIVATE_RESOURCE).read_text(encoding="utf-8")
        source = SAFE_PRIVATE_RESOURCE
    else:
        text, source = Path(path).read_text(encoding="utf-8"), str(path)
    entries = set()
    for number, entry in enumerate(json.loads(text)["entries"]):
        try:
            group, element = int(entry["group"], 16), int(entry["element"], 16)
            creator = str(entry["creator"]).strip()
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: entry {number} needs 'creator', hex 'group' and hex 'element'") from exc
        if group % 2 == 0 or not 0 <= element <= 0xFF:
            raise ConfigError(f"{source}: entry {number} must name an odd group and an element byte 00-FF")
        entries.add((creator, group, element))
    return SafePrivateList(frozenset(entries))

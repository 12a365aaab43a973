"""The audit trail of a de-identification run: one JSON line per input file, and a run summary.

A line says what happened to a file - input digest -> output digest (BLAKE3, as `b3sum` prints), the action per tag, the
blanked boxes, or why it was quarantined - and never a value read from it. Input file names can
themselves be identifying, so a line carries the input's path only in the "mirror" layout, where
the output tree repeats those paths anyway; in the "uid" layout files are known by their hashes.
The audit is also the run's memory: a later run skips inputs whose hash is already recorded.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

STATE_DIR: Final = ".mammofl-anonymize"
AUDIT_FILE: Final = "audit.jsonl"
SUMMARY_FILE: Final = "summary.json"
WRITTEN, QUARANTINED, SKIPPED, FAILED = "written", "quarantined", "skipped", "failed"


@dataclass(frozen=True)
class AuditRecord:
    """What happened to one input file."""

    status: str
    input_blake3: str
    options: tuple[str, ...]
    key_id: str
    output_blake3: str | None = None
    output: str | None = None
    path: str | None = None
    reason: str | None = None
    message: str | None = None
    sop_class_uid: str | None = None
    dates: str | None = None
    actions: dict[str, str] = field(default_factory=dict)
    redactions: list[list[int]] = field(default_factory=list)
    removed_words: dict[str, int] = field(default_factory=dict)  # per vocabulary-cleaned text: a count, never the words
    input_bytes: int = 0
    kind: str | None = None  # of a file that is not DICOM: its file name extension (".csv"), never its content

    def to_json(self) -> str:
        return json.dumps({key: value for key, value in asdict(self).items() if value not in (None, {}, [])},
                          sort_keys=True)


@dataclass(frozen=True)
class BatchSummary:
    """Counts of one run; `reasons` counts quarantines by reason code, `not_dicom` the files that are
    not DICOM by file name extension (index CSVs, manifests: never written, copy them yourself if
    they carry no PHI)."""

    written: int
    quarantined: int
    skipped: int
    failed: int
    input_bytes: int
    seconds: float
    reasons: dict[str, int]
    audit_path: Path
    summary_path: Path
    not_dicom: dict[str, int] = field(default_factory=dict)

    @property
    def files_per_second(self) -> float:
        processed = self.written + self.quarantined
        return processed / self.seconds if self.seconds > 0 else 0.0


class AuditLog:
    """Appends records to ``<state dir>/audit.jsonl`` and writes ``summary.json`` at the end."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / AUDIT_FILE
        self.summary_path = state_dir / SUMMARY_FILE
        self.counts: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.not_dicom: Counter[str] = Counter()
        self.input_bytes = 0
        self._handle = self.path.open("a", encoding="utf-8")

    def write(self, record: AuditRecord) -> None:
        self.counts[record.status] += 1
        if record.status == QUARANTINED and record.reason:
            self.reasons[record.reason] += 1
            if record.kind is not None:
                self.not_dicom[record.kind] += 1
        if record.status != SKIPPED:
            self.input_bytes += record.input_bytes
            self._handle.write(record.to_json() + "\n")
            self._handle.flush()

    def close(self, seconds: float) -> BatchSummary:
        self._handle.close()
        summary = BatchSummary(self.counts[WRITTEN], self.counts[QUARANTINED], self.counts[SKIPPED],
                               self.counts[FAILED], self.input_bytes, seconds, dict(self.reasons),
                               self.path, self.summary_path, dict(sorted(self.not_dicom.items())))
        content = {key: value for key, value in asdict(summary).items() if key not in ("audit_path", "summary_path")}
        self.summary_path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return summary


def completed_inputs(state_dir: Path, options: tuple[str, ...], key: str) -> dict[str, AuditRecord]:
    """Records of inputs a previous run finished (written or quarantined) with the same options and key."""
    path = state_dir / AUDIT_FILE
    done: dict[str, AuditRecord] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        fields_ = json.loads(line)
        if "input_blake3" not in fields_:
            continue  # a line of an earlier version (SHA-256 digests): that input is simply done again
        fields_["options"] = tuple(fields_["options"])
        record = AuditRecord(**fields_)
        if record.status in (WRITTEN, QUARANTINED) and record.options == options and record.key_id == key:
            done[record.input_blake3] = record
    return done

"""De-identify a file or a folder tree: in parallel over cores, resumable, never half-written.

Each input is read, de-identified in memory, checked to re-read, and only then written to a
temporary file beside its destination and renamed over it (atomic on one file system), so an
interrupted run leaves no partial output. Quarantined inputs are never written; the audit says
why. A later run over the same input skips every file whose hash the audit already records for
the same options and secret, so running twice changes nothing more.

Layouts: "mirror" keeps the input's relative paths (what CSV-indexed data sets such as CBIS-DDSM
need; the paths themselves are not de-identified), "uid" names each output
``<study>/<series>/<instance>.dcm`` by its de-identified UIDs.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pydicom
from tqdm import tqdm

from anonymize.audit import (
    FAILED,
    QUARANTINED,
    SKIPPED,
    STATE_DIR,
    WRITTEN,
    AuditLog,
    AuditRecord,
    BatchSummary,
    completed_inputs,
)
from anonymize.deidentify import Quarantined, deidentify_file, path_digest
from anonymize.private import SafePrivateList, load_safe_private
from anonymize.profile import DEFAULT_OPTIONS, DeidentificationOptions
from anonymize.secret import key_id, load_secret
from anonymize.vocabulary import Vocabulary, load_vocabulary
from common.allocator import keep_freed_memory
from common.errors import ConfigError

LAYOUTS: Final = ("mirror", "uid")


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs, sent once per worker process."""

    input_root: Path
    output_root: Path
    single_file: bool
    layout: str
    options: DeidentificationOptions
    secret: bytes
    safe_private: SafePrivateList
    vocabulary: Vocabulary
    completed: dict[str, AuditRecord]


_job: _Job | None = None


def run_anonymize(input_path: Path | str, output_path: Path | str, *,
                  options: DeidentificationOptions = DEFAULT_OPTIONS, secret_file: Path | str,
                  workers: int | None = None, progress: bool = False, layout: str = "mirror",
                  safe_private_file: Path | str | None = None,
                  vocabulary_file: Path | str | None = None) -> BatchSummary:
    """De-identify `input_path` (a file or a folder, recursively) into `output_path`.

    With a file as input, `output_path` is the output file; with a folder, the output folder.
    The audit and summary go to ``<output folder>/.mammofl-anonymize/``. Raises ConfigError on an
    unusable secret file, layout or path pair; per-file problems are quarantines in the audit.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    files = _input_files(input_path, output_path)
    secret = load_secret(secret_file)
    single_file = input_path.is_file()
    output_root = output_path.parent if single_file else output_path
    state_dir = output_root / STATE_DIR
    job = _Job(input_path.parent if single_file else input_path, output_path, single_file, layout, options, secret,
               load_safe_private(safe_private_file), load_vocabulary(vocabulary_file),
               completed_inputs(state_dir, options.enabled, key_id(secret)))
    audit = AuditLog(state_dir)
    started = time.perf_counter()
    with tqdm(total=len(files), disable=not progress, desc="anonymizing", unit="file") as bar:
        for record in _records(job, files, workers):
            audit.write(record)
            bar.update(1)
    return audit.close(time.perf_counter() - started)


def _input_files(input_path: Path, output_path: Path) -> list[Path]:
    """The files to process, sorted; hidden files and folders (our state folder) are skipped."""
    if input_path.is_file():
        return [input_path]
    if not input_path.is_dir():
        raise ConfigError(f"input {input_path} is neither a file nor a folder")
    if output_path.resolve().is_relative_to(input_path.resolve()):
        raise ConfigError(f"output {output_path} lies inside input {input_path}; choose a folder outside it")
    return sorted(path for path in input_path.rglob("*")
                  if path.is_file() and not any(part.startswith(".") for part in path.relative_to(input_path).parts))


def _records(job: _Job, files: list[Path], workers: int | None):
    """Process `files`, yielding audit records as they finish (inline when one worker suffices)."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(files) or 1))
    if workers == 1:
        _start_worker(job)
        yield from map(_process, files)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_start_pool_worker, initargs=(job,)) as pool:
        yield from pool.map(_process, files, chunksize=max(1, min(16, len(files) // (4 * workers))))


def _start_worker(job: _Job) -> None:
    global _job
    _job = job


def _start_pool_worker(job: _Job) -> None:
    # A worker process is ours alone: let it reuse each file's freed image buffers instead of the
    # kernel faulting in and zeroing 25 MB again per file, a sixth of a worker's time (12
    # full-field files, one worker: 89 ms per file without, 75 ms with).
    keep_freed_memory()
    _start_worker(job)


def _process(path: Path) -> AuditRecord:
    """De-identify one file and write it atomically; never raises for a problem with the file."""
    job = _job
    digest = path_digest(path)
    relative = None if job.single_file else path.relative_to(job.input_root).as_posix()
    shown_path = relative if job.layout == "mirror" else None
    base = {"input_blake3": digest, "options": job.options.enabled, "key_id": key_id(job.secret),
            "path": shown_path, "input_bytes": path.stat().st_size}
    previous = job.completed.get(digest)
    if previous is not None and (previous.status == QUARANTINED or _exists(job, previous.output)):
        return AuditRecord(status=SKIPPED, **base)
    temporary = _temporary(job)
    try:
        summary = deidentify_file(path, temporary, job.options, job.secret, safe_private=job.safe_private,
                                  vocabulary=job.vocabulary, input_blake3=digest)
        destination = _destination(job, relative, temporary)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temporary, destination)
    except Quarantined as exc:
        kind = (path.suffix.lower() or "(no extension)") if exc.reason == "not-dicom" else None
        return AuditRecord(status=QUARANTINED, reason=exc.reason, message=str(exc), kind=kind, **base)
    except Exception as exc:  # noqa: BLE001 - one broken file must not stop the batch; audited as failed
        return AuditRecord(status=FAILED, reason=type(exc).__name__, message="unexpected error; see the reason "
                           "(an exception type) and rerun this file alone to debug", **base)
    finally:
        temporary.unlink(missing_ok=True)
    return AuditRecord(status=WRITTEN, output_blake3=summary.output_blake3,
                       output=destination.relative_to(job.output_root.parent if job.single_file
                                                      else job.output_root).as_posix(),
                       sop_class_uid=summary.sop_class_uid, dates=summary.dates, actions=summary.actions,
                       redactions=[[r.frame, r.top, r.bottom, r.left, r.right] for r in summary.redactions],
                       removed_words=summary.removed_words, **base)


def _temporary(job: _Job) -> Path:
    """Where an output is written before it is renamed into place: the state folder, on the same
    file system as every destination (so the rename is atomic), and no folder is made for an input
    that ends up quarantined."""
    root = job.output_root.parent if job.single_file else job.output_root
    return root / STATE_DIR / f".output.{os.getpid()}.tmp"


def _exists(job: _Job, output: str | None) -> bool:
    root = job.output_root.parent if job.single_file else job.output_root
    return output is not None and (root / output).is_file()


def _destination(job: _Job, relative: str | None, written: Path) -> Path:
    if job.single_file:
        return job.output_root
    if job.layout == "mirror":
        return job.output_root / relative
    header = pydicom.dcmread(written, stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
    return job.output_root / header.StudyInstanceUID / header.SeriesInstanceUID / f"{header.SOPInstanceUID}.dcm"

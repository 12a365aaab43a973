"""The folder runner: parallel, resumable, atomic, audited without PHI; the secret file; the gate."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from anonymize.batch import run_anonymize
from anonymize.gate import NotDeidentifiedError, require_deidentified_file
from anonymize.secret import create_secret, load_secret
from common.data.synthetic_dicom import synthesize_dataset
from common.errors import ConfigError


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic export (some images with burned-in text) plus three broken files."""
    root = tmp_path_factory.mktemp("batch") / "in"
    synthesize_dataset(root, sites=2, per_site=3, size=128, seed=4, burned_in_text=0.5)
    shutil.copy(get_testdata_file("rtplan_truncated.dcm"), root / "truncated.dcm")
    shutil.copy(get_testdata_file("badVR.dcm"), root / "bad-vr.dcm")
    (root / "notes.txt").write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_secret(tmp_path_factory.mktemp("secrets") / "anonymize.key")


@pytest.fixture(scope="module")
def first_run(inputs: Path, secret_file: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("batch-out") / "out"
    return out, run_anonymize(inputs, out, secret_file=secret_file, workers=2)


def test_every_dicom_file_is_written_or_quarantined_and_the_batch_goes_on(inputs: Path, secret_file: Path,
                                                                           first_run) -> None:
    out, summary = first_run
    dicoms = [p for p in inputs.rglob("*.dcm") if p.name not in ("truncated.dcm", "bad-vr.dcm")]
    assert summary.written == len(dicoms) and summary.failed == 0
    assert summary.reasons == {"not-dicom": 7 + 1 + 6, "truncated": 1, "invalid-value": 1}  # CSVs, manifest, txt
    assert summary.not_dicom == {".csv": 12, ".json": 1, ".txt": 1}  # what they are, by name only
    masks = [p for p in dicoms if pydicom.dcmread(p, stop_before_pixels=True).get("SeriesDescription") == "ROI mask images"]
    assert masks and all((out / p.relative_to(inputs)).is_file() for p in masks)  # a CBIS-DDSM tree needs them
    assert not (out / "truncated.dcm").exists() and not (out / "bad-vr.dcm").exists()
    assert not list(out.rglob("*.tmp"))
    for path in out.rglob("*.dcm"):
        require_deidentified_file(path, load_secret(secret_file))


def test_the_audit_has_a_line_per_file_and_no_value_from_any_file(inputs: Path, first_run) -> None:
    out, summary = first_run
    lines = [json.loads(line) for line in summary.audit_path.read_text().splitlines()]
    assert len(lines) == summary.written + summary.quarantined
    written = [line for line in lines if line["status"] == "written"]
    assert all(line["input_blake3"] != line["output_blake3"] and line["actions"] for line in written)
    assert any(line.get("redactions") for line in written)
    audit_text = summary.audit_path.read_text().upper()
    for path in inputs.rglob("*.dcm"):
        ds = pydicom.dcmread(path, force=True)
        # (UIDs may appear: the mirror layout keeps the input's relative paths, CBIS folder names included.)
        for keyword in ("PatientName", "PatientID", "InstitutionName", "AccessionNumber", "StationName"):
            value = str(ds.get(keyword, "") or "")
            if len(value) >= 4:
                assert value.upper() not in audit_text, keyword
    assert json.loads(summary.summary_path.read_text())["written"] == summary.written


def test_a_second_run_skips_everything_and_changes_nothing(inputs: Path, secret_file: Path, first_run) -> None:
    out, first = first_run
    before = {p: p.read_bytes() for p in out.rglob("*.dcm")}
    second = run_anonymize(inputs, out, secret_file=secret_file, workers=2)
    assert second.skipped == first.written + first.quarantined
    assert second.written == second.quarantined == 0
    assert {p: p.read_bytes() for p in out.rglob("*.dcm")} == before


def test_an_audit_of_an_earlier_version_is_read_and_its_files_done_again(inputs: Path, secret_file: Path,
                                                                         tmp_path: Path) -> None:
    # Audits written before the switch to BLAKE3 digests carry "input_sha256": they must not stop a run.
    single = next(inputs.rglob("*.dcm"))
    out = tmp_path / "out"
    state = out / ".mammofl-anonymize"
    state.mkdir(parents=True)
    (state / "audit.jsonl").write_text(json.dumps({"status": "written", "input_sha256": "ab" * 32, "options": [],
                                                   "key_id": "k", "output": "x.dcm"}) + "\n")

    summary = run_anonymize(single.parent, out, secret_file=secret_file, workers=1)

    assert summary.written >= 1 and summary.failed == 0


def test_anonymizing_the_output_again_reproduces_it(first_run, secret_file: Path, tmp_path: Path) -> None:
    out, _ = first_run
    again = run_anonymize(out, tmp_path / "again", secret_file=secret_file, workers=1)
    assert again.quarantined == 0
    for path in out.rglob("*.dcm"):
        assert (tmp_path / "again" / path.relative_to(out)).read_bytes() == path.read_bytes()


def test_uid_layout_names_files_by_de_identified_uids_and_a_single_file_works(inputs: Path, secret_file: Path,
                                                                               tmp_path: Path) -> None:
    summary = run_anonymize(inputs / "site-01", tmp_path / "by-uid", secret_file=secret_file, workers=1, layout="uid")
    outputs = list((tmp_path / "by-uid").rglob("*.dcm"))
    assert len(outputs) == summary.written
    for path in outputs:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert path.relative_to(tmp_path / "by-uid").parts == (ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                                               f"{ds.SOPInstanceUID}.dcm")
    assert all("path" not in json.loads(line) for line in summary.audit_path.read_text().splitlines())
    source = next(inputs.rglob("000000.dcm"))
    single = run_anonymize(source, tmp_path / "one.dcm", secret_file=secret_file)
    assert single.written == 1 and (tmp_path / "one.dcm").is_file()


def test_the_gate_refuses_images_the_anonymizer_did_not_produce(inputs: Path) -> None:
    with pytest.raises(NotDeidentifiedError, match="not produced by mammofl anonymize"):
        require_deidentified_file(next(inputs.rglob("000000.dcm")))


def test_secret_files_are_created_private_and_refused_when_missing_or_open(tmp_path: Path, inputs: Path) -> None:
    path = create_secret(tmp_path / "s" / "new.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(load_secret(path)) == 32
    with pytest.raises(ConfigError, match="already exists"):
        create_secret(path)
    with pytest.raises(ConfigError, match="does not exist"):
        run_anonymize(inputs, tmp_path / "out", secret_file=tmp_path / "missing.key")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_secret(path)
    key_text = bytes(load_secret_unchecked(path)).hex()
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError) as caught:
        run_anonymize(inputs, inputs / "inside", secret_file=path)
    assert key_text not in str(caught.value)


def load_secret_unchecked(path: Path) -> bytes:
    return bytes.fromhex(path.read_text().strip())

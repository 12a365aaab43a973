"""The command line: help everywhere, clear errors with exit status 2, the smoke run end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mammofl.cli import main

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = [[], ["data"], ["data", "synth"], ["config"], ["config", "check"], ["pretrain"], ["train"],
               ["simulate"], ["experiments"], ["privacy-report"], ["keys"], ["keys", "rotate"], ["anonymize"], ["compress"]]


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=lambda words: " ".join(words) or "mammofl")
def test_every_command_has_help(words, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*words, "--help"])
    assert exited.value.code == 0
    assert "usage: mammofl" in capsys.readouterr().out


def test_console_script_is_installed():
    result = subprocess.run([Path(sys.executable).parent / "mammofl", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("mammofl ")


def test_bad_config_exits_2_naming_file_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"epochs": 3, "optimizer": "rmsprop"}))

    assert main(["train", str(bad)]) == 2

    error = capsys.readouterr().err
    assert "bad.json" in error and "key 'optimizer'" in error and "'adam', 'adamw' or 'sgd'" in error
    assert not (tmp_path / "runs").exists()


def test_synth_rejects_out_of_range_arguments(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--sites", "0"]) == 2
    assert "sites" in capsys.readouterr().err


def test_missing_pretrained_file_is_a_clear_error(tmp_path, capsys, monkeypatch):
    config = json.loads((REPO / "configs" / "smoke.json").read_text())
    config["model"]["pretrained"] = str(tmp_path / "absent.pt")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)

    assert main(["train", str(path)]) == 2
    assert "absent.pt not found" in capsys.readouterr().err


def test_smoke_config_pretrains_and_trains_end_to_end(tmp_path, monkeypatch, capsys):
    config = json.loads((REPO / "configs" / "smoke.json").read_text())
    config["model"]["pretrained"] = "pretrained/encoder.pt"
    path = tmp_path / "smoke.json"
    path.write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)

    assert main(["pretrain", str(path)]) == 0
    assert (tmp_path / "pretrained" / "encoder.pt").is_file()
    assert main(["train", str(path)]) == 0

    (run,) = (tmp_path / "runs").iterdir()
    for relative in ("config.json", "metrics.jsonl", "model/best.pt", "model/last.pt", "summary.md",
                     "export_model/model.pt"):
        assert (run / relative).is_file(), relative
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line.get("epoch") for line in lines[:-1]] == [1, 2]
    assert lines[-1]["split"] == "test" and 0.0 <= lines[-1]["accuracy"] <= 1.0
    assert "Test metrics" in capsys.readouterr().out


def test_keys_create_rotate_rewrap_and_retire_keep_images_readable(tmp_path, capsys, monkeypatch):
    from api.crypto import list_keys, load_keyring

    monkeypatch.setattr("mammofl.cli._wait_for_old_keys_last_users", lambda: None)
    from api.store.sqlite import SQLiteImageStore

    keyring, database = tmp_path / "keyring.json", tmp_path / "store.db"
    assert main(["keys", "create", "--keyring", str(keyring)]) == 0
    (first_key,) = [info.key_id for info in list_keys(keyring)]
    with SQLiteImageStore(database, load_keyring(keyring)) as store:
        image_id = store.put("site-a", b"pixels" * 1000, content_type="application/dicom").image_id

    assert main(["keys", "rotate", "--keyring", str(keyring), "--sqlite", str(database), "--retire-old"]) == 0

    keys = list_keys(keyring)
    assert [info.key_id for info in keys] != [first_key] and len(keys) == 1
    with SQLiteImageStore(database, load_keyring(keyring)) as store:
        assert store.get("site-a", image_id).data == b"pixels" * 1000
    assert "re-wrapped 1 data key(s)" in capsys.readouterr().out
    assert main(["keys", "create", "--keyring", str(keyring)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_store_purge_leaves_a_deleted_images_key_nowhere_and_its_key_encryption_key_destroyed(tmp_path, capsys,
                                                                                                 monkeypatch):
    # A copy of the database taken before the delete (a backup, a replica) still holds the deleted
    # image's wrapped key: after the purge no key in the keyring unwraps it.
    import base64
    import shutil

    from api.crypto import Keyring, WrongKeyError, list_keys, load_keyring
    from api.store.sqlite import SQLiteImageStore

    monkeypatch.setattr("mammofl.cli._wait_for_old_keys_last_users", lambda: None)
    keyring, database = tmp_path / "keyring.json", tmp_path / "store.db"
    assert main(["keys", "create", "--keyring", str(keyring)]) == 0
    (old_key,) = [info.key_id for info in list_keys(keyring)]
    old_material = base64.b64encode(Keyring.from_file(keyring).material(old_key))
    with SQLiteImageStore(database, load_keyring(keyring)) as store:
        kept = store.put("site-a", b"kept" * 5000).image_id
        gone = store.put("site-a", b"gone" * 5000).image_id
        (wrapped,) = store.read_rows("SELECT wrapped_key FROM images WHERE image_id = ?", (gone.bytes,))[0]
        store.make_deletions_final()
        shutil.copy(database, tmp_path / "backup.db")
        store.delete("site-a", gone)

    assert main(["store", "purge", "--sqlite", str(database), "--keyring", str(keyring)]) == 0

    assert old_key not in Keyring.from_file(keyring).key_ids and old_material not in keyring.read_bytes()
    assert [path.name for path in tmp_path.glob("store.db*") if wrapped in path.read_bytes()] == []
    with SQLiteImageStore(tmp_path / "backup.db", Keyring.from_file(keyring), create_schema=False) as backup:
        with pytest.raises(WrongKeyError, match=old_key):
            backup.get("site-a", gone)
    with SQLiteImageStore(database, Keyring.from_file(keyring)) as store:
        assert store.get("site-a", kept).data == b"kept" * 5000
    assert "checkpointed the write-ahead log" in capsys.readouterr().out

    assert main(["store", "purge", "--sqlite", str(database), "--keyring", str(keyring), "--nodetool", "nodetool"]) == 2
    assert "--nodetool applies to a Cassandra store" in capsys.readouterr().err
    before = keyring.read_bytes()
    assert main(["store", "purge", "--sqlite", str(tmp_path / "absent.db"), "--keyring", str(keyring)]) == 2
    assert keyring.read_bytes() == before  # nothing rotated for a store that is not there


def test_store_purge_with_the_wrong_keyring_changes_nothing_and_says_so(tmp_path, capsys, monkeypatch):
    # A careless operator: the keyring named is not the one the store's images are wrapped with.
    # Before, the purge "succeeded" re-wrapping nothing, leaving deleted images recoverable.
    from api.crypto import create_key, load_keyring
    from api.store.sqlite import SQLiteImageStore

    monkeypatch.setattr("mammofl.cli._wait_for_old_keys_last_users", lambda: None)
    real, wrong, database = tmp_path / "real.json", tmp_path / "wrong.json", tmp_path / "store.db"
    create_key(real)
    create_key(wrong)
    with SQLiteImageStore(database, load_keyring(real)) as store:
        store.put("site-a", b"image" * 100)
    before = wrong.read_bytes()

    assert main(["store", "purge", "--sqlite", str(database), "--keyring", str(wrong)]) == 2

    error = capsys.readouterr().err
    assert "1 image(s)" in error and "is it the service's keyring? Nothing was changed" in error
    assert wrong.read_bytes() == before


def test_a_rotation_while_the_service_runs_loses_no_image(tmp_path, capsys, monkeypatch):
    # Before: the running service kept its start-up keyring, so re-wrapped images answered
    # WrongKeyError and new uploads were wrapped with the key just destroyed.
    from api.crypto import Keyring, list_keys, load_keyring
    from api.store.sqlite import SQLiteImageStore

    keyring, database = tmp_path / "keyring.json", tmp_path / "store.db"
    assert main(["keys", "create", "--keyring", str(keyring)]) == 0
    service = SQLiteImageStore(database, load_keyring(keyring, follow=True))
    lagging = SQLiteImageStore(database, Keyring.from_file(keyring))  # a worker that has not re-read the file yet
    before = service.put("site-a", b"before" * 500).image_id
    late = []
    monkeypatch.setattr("mammofl.cli._wait_for_old_keys_last_users",
                        lambda: late.append(lagging.put("site-a", b"late" * 500).image_id))

    assert main(["keys", "rotate", "--keyring", str(keyring), "--sqlite", str(database), "--retire-old"]) == 0

    (active,) = [info.key_id for info in list_keys(keyring)]
    assert service.get("site-a", before).data == b"before" * 500  # the running service follows the file
    after = service.put("site-a", b"after" * 500)
    assert after.key_id == active
    restarted = SQLiteImageStore(database, Keyring.from_file(keyring))
    for image_id, data in ((before, b"before" * 500), (after.image_id, b"after" * 500), (late[0], b"late" * 500)):
        assert restarted.get("site-a", image_id).data == data
    assert "re-wrapped 1 data key(s) written with an old key meanwhile" in capsys.readouterr().out
    for store in (service, lagging, restarted):
        store.close()

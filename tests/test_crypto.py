"""Envelope encryption and the keyring: keys stay secret, every ciphertext is bound to its place."""

import base64
import json
import os
import stat
import uuid

import pytest

from api.crypto import (
    KEYRING_ENV,
    ImageCipher,
    IntegrityError,
    Keyring,
    KeyringError,
    WrappedKey,
    WrongKeyError,
    create_key,
    list_keys,
    load_keyring,
    retire_key,
    rotate_key,
)

IMAGE_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
OTHER_IMAGE_ID = uuid.UUID("00000000-0000-4000-8000-000000000002")


@pytest.fixture
def keyring_path(tmp_path):
    return tmp_path / "secrets" / "keyring.json"


@pytest.fixture
def data_key():
    return os.urandom(32)


@pytest.fixture
def cipher(data_key):
    return ImageCipher(data_key, image_id=IMAGE_ID, site_id="site-a")


def test_create_key_writes_an_owner_only_keyring_with_one_active_key(keyring_path):
    key_id = create_key(keyring_path)

    assert stat.S_IMODE(keyring_path.stat().st_mode) == 0o600
    keyring = Keyring.from_file(keyring_path)
    assert keyring.active_key_id == key_id and keyring.key_ids == (key_id,)
    assert len(keyring.material(key_id)) == 32


def test_create_key_refuses_to_overwrite_a_keyring(keyring_path):
    create_key(keyring_path)
    before = keyring_path.read_bytes()

    with pytest.raises(KeyringError, match="already exists.*keys rotate"):
        create_key(keyring_path)
    assert keyring_path.read_bytes() == before


def test_rotate_adds_an_active_key_and_keeps_the_old_one(keyring_path):
    first = create_key(keyring_path)
    old_material = Keyring.from_file(keyring_path).material(first)

    second = rotate_key(keyring_path)

    keyring = Keyring.from_file(keyring_path)
    assert second != first and keyring.active_key_id == second
    assert keyring.material(first) == old_material
    assert [(info.key_id, info.active) for info in list_keys(keyring_path)] == [(first, False), (second, True)]
    assert stat.S_IMODE(keyring_path.stat().st_mode) == 0o600


def test_retire_removes_an_old_key_but_never_the_active_one(keyring_path):
    first = create_key(keyring_path)
    second = rotate_key(keyring_path)

    with pytest.raises(KeyringError, match=f"'{second}' is the active key"):
        retire_key(keyring_path, second)
    retire_key(keyring_path, first)

    assert Keyring.from_file(keyring_path).key_ids == (second,)
    with pytest.raises(WrongKeyError, match=f"'{first}' is not in the keyring"):
        retire_key(keyring_path, first)


def test_a_retired_keys_material_is_overwritten_where_the_old_keyring_file_was(keyring_path):
    # Before: the keyring was replaced by rename only, so every earlier version of the file (and so
    # every retired key) stayed readable in its freed inode. A hard link keeps the old inode in
    # view: after each rewrite it holds zeros only.
    first = create_key(keyring_path)
    material = base64.b64encode(Keyring.from_file(keyring_path).material(first))
    versions = []
    for operation in (lambda: rotate_key(keyring_path), lambda: retire_key(keyring_path, first)):
        link = keyring_path.with_name(f"version-{len(versions)}")
        os.link(keyring_path, link)
        assert material in link.read_bytes()
        operation()
        versions.append(link.read_bytes())

    assert all(version and set(version) == {0} for version in versions)
    assert material not in keyring_path.read_bytes()
    assert first not in Keyring.from_file(keyring_path).key_ids


def test_a_keyring_readable_by_others_is_refused(keyring_path):
    create_key(keyring_path)
    keyring_path.chmod(0o644)

    with pytest.raises(KeyringError, match="mode 0644.*chmod 600"):
        Keyring.from_file(keyring_path)


@pytest.mark.parametrize("document, complaint", [
    ("not json", "is not JSON"),
    ('{"keys": {}}', "lacks \"format\""),
    ('{"format": "mammofl-keyring/1", "active": "k", "keys": {"k": {"material": "AAAA", '
     '"created_at": "2026-01-01T00:00:00+00:00"}}}', "'k' is 3 bytes"),
    ('{"format": "mammofl-keyring/1", "active": "x", "keys": {"k": {"material": "'
     + base64.b64encode(bytes(32)).decode() + '", "created_at": "2026-01-01T00:00:00+00:00"}}}',
     "\"active\" is 'x'"),
])
def test_a_malformed_keyring_is_refused_naming_the_file_and_the_problem(keyring_path, document, complaint):
    keyring_path.parent.mkdir()
    keyring_path.write_text(document)
    keyring_path.chmod(0o600)

    with pytest.raises(KeyringError, match=complaint) as raised:
        Keyring.from_file(keyring_path)
    assert str(keyring_path) in str(raised.value)


def test_the_keyring_loads_from_the_environment_before_any_file(keyring_path, monkeypatch):
    key_id = create_key(keyring_path)
    monkeypatch.setenv(KEYRING_ENV, base64.b64encode(keyring_path.read_bytes()).decode())

    assert load_keyring(None).active_key_id == key_id
    assert load_keyring(keyring_path.parent / "absent.json").active_key_id == key_id


def test_a_garbled_environment_keyring_is_refused(monkeypatch):
    monkeypatch.setenv(KEYRING_ENV, "%%% not base64 %%%")

    with pytest.raises(KeyringError, match=KEYRING_ENV):
        load_keyring(None)


def test_no_keyring_at_all_says_how_to_make_one(monkeypatch):
    monkeypatch.delenv(KEYRING_ENV, raising=False)

    with pytest.raises(KeyringError, match="mammofl keys create"):
        load_keyring(None)


def test_key_material_never_shows_in_repr(keyring_path):
    create_key(keyring_path)
    keyring = Keyring.from_file(keyring_path)
    material = keyring.material(keyring.active_key_id)

    assert base64.b64encode(material).decode() not in repr(keyring)
    assert material.hex() not in repr(keyring) and repr(material) not in repr(keyring)


def test_a_chunk_decrypts_only_at_its_own_image_site_index_and_count(cipher, data_key):
    plaintext = os.urandom(1000)
    sealed = cipher.encrypt_chunk(plaintext, index=3, count=5)

    assert plaintext not in sealed
    assert cipher.decrypt_chunk(sealed, index=3, count=5) == plaintext
    misplaced = [
        (cipher, {"index": 2, "count": 5}),
        (cipher, {"index": 3, "count": 4}),
        (ImageCipher(data_key, image_id=OTHER_IMAGE_ID, site_id="site-a"), {"index": 3, "count": 5}),
        (ImageCipher(data_key, image_id=IMAGE_ID, site_id="site-b"), {"index": 3, "count": 5}),
    ]
    for other, place in misplaced:
        with pytest.raises(IntegrityError, match="failed authentication"):
            other.decrypt_chunk(sealed, **place)


@pytest.mark.parametrize("damage", [
    lambda sealed: sealed[:-1],
    lambda sealed: sealed[:10],
    lambda sealed: sealed[:40] + bytes([sealed[40] ^ 1]) + sealed[41:],
    lambda sealed: bytes([sealed[0] ^ 0x80]) + sealed[1:],
], ids=["cut-off tag", "shorter than a nonce", "flipped bit", "altered nonce"])
def test_a_damaged_chunk_fails_with_an_integrity_error(cipher, damage):
    sealed = cipher.encrypt_chunk(b"pixels" * 100, index=0, count=1)

    with pytest.raises(IntegrityError, match=f"chunk 0 of 1 of image {IMAGE_ID}"):
        cipher.decrypt_chunk(damage(sealed), index=0, count=1)


def test_sealed_metadata_opens_only_for_its_own_image(cipher, data_key):
    document = {"attributes": {"rows": 4096, "note": "de-identified"}, "sha256": "ab" * 32}
    sealed = cipher.seal_metadata(document)

    assert b"de-identified" not in sealed
    assert cipher.open_metadata(sealed) == document
    with pytest.raises(IntegrityError, match="sealed metadata"):
        ImageCipher(data_key, image_id=OTHER_IMAGE_ID, site_id="site-a").open_metadata(sealed)


def test_a_wrapped_data_key_unwraps_with_its_key_encryption_key_only(cipher, data_key):
    keyring = Keyring.generate()
    wrapped = cipher.wrap(keyring)
    chunk = cipher.encrypt_chunk(b"pixels", index=0, count=1)

    unwrapped = ImageCipher.unwrap(keyring, wrapped, image_id=IMAGE_ID, site_id="site-a")

    assert wrapped.key_id == keyring.active_key_id and data_key not in wrapped.ciphertext
    assert unwrapped.decrypt_chunk(chunk, index=0, count=1) == b"pixels"


def test_unwrapping_with_a_different_key_under_the_same_id_is_a_wrong_key_error(cipher, keyring_path):
    key_id = create_key(keyring_path)
    wrapped = cipher.wrap(Keyring.from_file(keyring_path))
    document = json.loads(keyring_path.read_text())
    document["keys"][key_id]["material"] = base64.b64encode(os.urandom(32)).decode()
    keyring_path.write_text(json.dumps(document))

    with pytest.raises(WrongKeyError, match=f"does not unwrap with key-encryption key '{key_id}'"):
        ImageCipher.unwrap(Keyring.from_file(keyring_path), wrapped, image_id=IMAGE_ID, site_id="site-a")


def test_unwrapping_with_a_keyring_that_lacks_the_key_is_a_wrong_key_error(cipher):
    wrapped = cipher.wrap(Keyring.generate())

    with pytest.raises(WrongKeyError, match="is not in the keyring"):
        ImageCipher.unwrap(Keyring.generate(), wrapped, image_id=IMAGE_ID, site_id="site-a")


def test_a_wrapped_key_moved_to_another_image_does_not_unwrap(cipher):
    keyring = Keyring.generate()
    wrapped = cipher.wrap(keyring)

    with pytest.raises(WrongKeyError):
        ImageCipher.unwrap(keyring, WrappedKey(wrapped.key_id, wrapped.ciphertext),
                           image_id=OTHER_IMAGE_ID, site_id="site-a")

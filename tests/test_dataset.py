"""MammogramDataset yields model-ready tensors, crops lesions in ROI mode and caches safely."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from common.data import dataset as dataset_module
from common.data.cbis import load_cbis_ddsm
from common.data.dataset import MammogramDataset
from common.data.records import ImageRecord
from common.errors import DataError
from tests.fixtures.cbis_layouts import build_direct_tree, write_dicom


@pytest.fixture
def records(tmp_path):
    build_direct_tree(tmp_path / "cbis")
    return sorted(load_cbis_ddsm(tmp_path / "cbis"), key=lambda r: str(r.image_path))


def test_items_are_single_channel_unit_tensors_with_int_labels(records):
    dataset = MammogramDataset(records, image_size=32)

    image, label = dataset[0]

    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert isinstance(label, int) and label == records[0].label
    assert len(dataset) == len(records) and dataset.labels == [r.label for r in records]


def test_transform_runs_on_the_tensor(records):
    dataset = MammogramDataset(records, image_size=16, transform=lambda t: t * 0 + 0.5)

    assert torch.all(dataset[0][0] == 0.5)


@pytest.mark.parametrize("argument, message", [({"mode": "patch"}, "valid: full, roi"),
                                               ({"image_size": 0}, "positive")])
def test_invalid_settings_are_data_errors(records, argument, message):
    settings = {"image_size": 16, **argument}
    with pytest.raises(DataError, match=message):
        MammogramDataset(records, **settings)


def _lesion_image(tmp_path, mask_shape=(200, 160)):
    """A dim breast with one bright lesion; its mask possibly on a slightly different grid."""
    image = np.zeros((200, 160), dtype=np.uint16)
    image[20:180, :100] = 800
    image[120:140, 30:50] = 4000
    mask = np.zeros(mask_shape, dtype=np.uint8)
    rows, columns = mask_shape[0] / 200, mask_shape[1] / 160
    mask[round(120 * rows) : round(140 * rows), round(30 * columns) : round(50 * columns)] = 255
    image_path = write_dicom(tmp_path / "image.dcm", image)
    mask_path = write_dicom(tmp_path / "mask.dcm", mask)
    return ImageRecord(image_path, label=2, split="train", patient_id="P_1", roi_mask_paths=(mask_path,))


@pytest.mark.parametrize("mask_shape", [(200, 160), (196, 158)], ids=["same grid", "mask grid differs"])
def test_roi_mode_centres_a_square_crop_on_the_lesion(tmp_path, mask_shape):
    record = _lesion_image(tmp_path, mask_shape)

    crop, _ = MammogramDataset([record], image_size=30, mode="roi")[0]

    centre = crop[0, 10:20, 10:20]
    assert float(centre.mean()) > 0.9  # lesion fills the middle
    assert float(crop[0].mean()) < 0.7  # with surrounding tissue as context


def test_roi_mode_without_masks_crops_the_breast_deterministically(records):
    normal = next(r for r in records if not r.roi_mask_paths)

    first, _ = MammogramDataset([normal], image_size=16, mode="roi")[0]
    second, _ = MammogramDataset([normal], image_size=16, mode="roi")[0]

    assert torch.equal(first, second)
    assert float(first.max()) > 0.3  # inside the breast, not empty background


def test_cache_serves_later_reads_without_decoding(records, tmp_path, monkeypatch):
    dataset = MammogramDataset(records, image_size=24, cache_dir=tmp_path / "cache")
    first = [dataset[i][0] for i in range(len(dataset))]

    def refuse(path):
        raise AssertionError(f"decoded {path} despite the cache")

    monkeypatch.setattr(dataset_module, "read_image", refuse)
    again = [dataset[i][0] for i in range(len(dataset))]

    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len(list((tmp_path / "cache").glob("*.npy"))) == len(records)
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_cache_key_changes_with_the_file_and_the_settings(records, tmp_path):
    cache = tmp_path / "cache"
    MammogramDataset(records[:1], image_size=24, cache_dir=cache)[0]
    MammogramDataset(records[:1], image_size=32, cache_dir=cache)[0]
    MammogramDataset(records[:1], image_size=24, mode="roi", cache_dir=cache)[0]
    stat = records[0].image_path.stat()
    os.utime(records[0].image_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    MammogramDataset(records[:1], image_size=24, cache_dir=cache)[0]

    assert len(list(cache.glob("*.npy"))) == 4


def test_works_with_dataloader_workers_sharing_a_cache(records, tmp_path):
    dataset = MammogramDataset(records, image_size=16, cache_dir=tmp_path / "cache")
    loader = DataLoader(dataset, batch_size=2, num_workers=2)

    batches = list(loader)

    assert sum(len(labels) for _, labels in batches) == len(records)
    assert batches[0][0].shape == (2, 1, 16, 16)
    assert len(list(Path(tmp_path / "cache").glob("*.npy"))) == len(records)


def test_loader_workers_start_from_a_forkserver_and_read_every_training_image(tmp_path):
    # A fork of a process running gRPC threads (a deployed ClientApp) crashes in gRPC's event
    # engine; workers must come from a clean process, and the dataset must survive pickling.
    from common.config import parse_config
    from common.data.pipeline import load_records, make_loader

    config = parse_config({
        "num_workers": 2, "batch_size": 4, "augmentation": {"enabled": True, "strength": 0.5},
        "model": {"image_size": 32},
        "data": {"root": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache"),
                 "synthetic": {"sites": 1, "per_site": 8, "size": 64, "burned_in_text": 0.0}},
        "tracking": {"runs_dir": str(tmp_path / "runs"), "wandb_mode": "disabled"}})
    records = [record for record in load_records(config.data) if record.split == "train"]

    loader = make_loader(records, config, train=True)
    seen = sum(len(labels) for _, labels in loader)

    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    assert seen == len(records) > 0

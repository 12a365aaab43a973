"""Encoder weights from local files, and the freeze schedule of transfer learning."""

import re

import pytest
import torch
import torchvision
from torch import nn

from common.errors import ConfigError, ModelError
from common.models.classifier import build_classifier, save_checkpoint
from common.models.encoders import build_encoder
from common.models.transfer import (
    IMAGENET_GREY_MEAN,
    FreezeSchedule,
    load_pretrained_encoder,
    save_encoder_checkpoint,
)


@pytest.fixture(scope="module")
def torchvision_resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None)


@pytest.fixture(scope="module")
def resnet18_file(torchvision_resnet18, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision_resnet18.state_dict(), path)
    return path


def test_torchvision_weights_load_with_first_conv_summed_over_rgb(torchvision_resnet18, resnet18_file):
    encoder = build_encoder("resnet18")

    report = load_pretrained_encoder(encoder, resnet18_file)

    rgb_kernel = torchvision_resnet18.conv1.weight
    assert torch.equal(encoder.trunk.conv1.weight, rgb_kernel.sum(dim=1, keepdim=True))
    assert torch.equal(encoder.trunk.layer3[1].conv2.weight, torchvision_resnet18.layer3[1].conv2.weight)
    assert torch.equal(encoder.trunk.bn1.running_var, torchvision_resnet18.bn1.running_var)
    assert float(encoder.input_mean) == pytest.approx(IMAGENET_GREY_MEAN)
    assert report.source_format == "torchvision" and report.adapted == ("trunk.conv1.weight",)
    assert report.skipped == () and not any(key.startswith("trunk.fc") for key in report.loaded)


def test_summed_kernel_sees_grey_as_the_rgb_kernel_sees_it_repeated(torchvision_resnet18, resnet18_file):
    encoder = build_encoder("resnet18")
    load_pretrained_encoder(encoder, resnet18_file)
    grey = torch.rand(2, 1, 32, 32)

    rgb_response = torchvision_resnet18.conv1(grey.repeat(1, 3, 1, 1))
    assert torch.allclose(encoder.trunk.conv1(grey), rgb_response, atol=1e-5)


def test_another_architecture_is_refused_naming_file_encoder_and_keys(resnet18_file):
    encoder = build_encoder("resnet34")
    before = encoder.trunk.conv1.weight.clone()

    with pytest.raises(ModelError, match=r"resnet18\.pth.*'resnet34'.*missing: trunk\.layer1\.2"):
        load_pretrained_encoder(encoder, resnet18_file)
    assert torch.equal(encoder.trunk.conv1.weight, before)


def test_batch_norm_file_into_group_norm_encoder_skips_norm_layers(torchvision_resnet18, resnet18_file):
    encoder = build_encoder("resnet18", norm="group")

    report = load_pretrained_encoder(encoder, resnet18_file)

    deep_conv = encoder.trunk.get_submodule("layer4.0.conv1")
    assert torch.equal(deep_conv.weight, torchvision_resnet18.layer4[0].conv1.weight)
    assert isinstance(encoder.trunk.bn1, nn.GroupNorm)
    assert torch.equal(encoder.trunk.bn1.weight, torch.ones(64))
    assert {"trunk.bn1.running_mean", "trunk.bn1.weight", "trunk.layer1.0.bn2.bias"} <= set(report.skipped)
    assert not any("bn" in key for key in report.loaded)


def test_official_densenet_files_with_legacy_key_names_load(tmp_path):
    reference = torchvision.models.densenet121(weights=None)
    legacy = {  # as published: "norm.1" for "norm1", and no BatchNorm batch counters
        re.sub(r"\.(norm|conv)([12])\.", r".\1.\2.", key): tensor
        for key, tensor in reference.state_dict().items()
        if not key.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    path = tmp_path / "densenet121.pth"
    torch.save(legacy, path)
    encoder = build_encoder("densenet121")

    load_pretrained_encoder(encoder, path)

    layer = "denseblock2.denselayer3"
    loaded = encoder.trunk.features.get_submodule(layer).conv2.weight
    assert torch.equal(loaded, reference.features.get_submodule(layer).conv2.weight)


def test_encoder_checkpoint_round_trip_and_name_check(tmp_path):
    source = build_encoder("smallcnn", norm="group")
    source.set_input_statistics(0.3, 0.2)
    path = tmp_path / "encoder.pt"
    save_encoder_checkpoint(source, path)
    target = build_encoder("smallcnn", norm="group")

    report = load_pretrained_encoder(target, path)

    assert report.source_format == "mammofl-encoder"
    for key, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], tensor), key
    with pytest.raises(ModelError, match="encoder.pt.*'smallcnn' encoder, expected 'resnet18'"):
        load_pretrained_encoder(build_encoder("resnet18"), path)


def test_classifier_checkpoint_lends_its_encoder(tmp_path):
    classifier = build_classifier("smallcnn")
    path = tmp_path / "classifier.pt"
    save_checkpoint(classifier, path)
    encoder = build_encoder("smallcnn")

    report = load_pretrained_encoder(encoder, path)

    assert report.source_format == "mammofl-classifier"
    assert torch.equal(encoder.trunk.stem[0].weight, classifier.encoder.trunk.stem[0].weight)


def test_unreadable_or_unknown_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 64)
    unknown = tmp_path / "unknown.pth"
    torch.save({"format": "something-else"}, unknown)

    with pytest.raises(ModelError, match="garbage.pth"):
        load_pretrained_encoder(build_encoder("smallcnn"), garbage)
    with pytest.raises(ModelError, match="unknown.pth.*torchvision state_dict"):
        load_pretrained_encoder(build_encoder("smallcnn"), unknown)


def trainable_parts(model):
    """Per encoder block, then the head: does it train?"""
    parts = [*model.encoder.blocks(), model.head]
    return [all(p.requires_grad for p in part.parameters()) for part in parts]


def test_freeze_schedule_opens_the_last_blocks_after_the_head_only_epochs():
    model = build_classifier("smallcnn")  # 4 encoder blocks
    schedule = FreezeSchedule(head_only_epochs=2, unfreeze_last_blocks=2)

    schedule.apply(model, 0)
    assert trainable_parts(model) == [False, False, False, False, True]
    schedule.apply(model, 1)
    assert trainable_parts(model) == [False, False, False, False, True]
    schedule.apply(model, 2)
    assert trainable_parts(model) == [False, False, True, True, True]


def test_freeze_schedule_defaults_to_training_everything():
    model = build_classifier("smallcnn")
    FreezeSchedule(head_only_epochs=1).apply(model, 0)

    FreezeSchedule().apply(model, 0)

    assert all(trainable_parts(model))


def test_freeze_schedule_rejects_nonsense():
    with pytest.raises(ConfigError, match="head_only_epochs"):
        FreezeSchedule(head_only_epochs=-1)
    with pytest.raises(ConfigError, match="unfreeze_last_blocks"):
        FreezeSchedule(unfreeze_last_blocks=0)


def test_adam_built_over_frozen_parameters_leaves_them_alone_until_unfrozen():
    torch.manual_seed(0)
    model = build_classifier("smallcnn")
    schedule = FreezeSchedule(head_only_epochs=1)
    schedule.apply(model, 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    images, labels = torch.rand(4, 1, 64, 64), torch.tensor([0, 1, 2, 1])

    def step():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    stem, head = model.encoder.trunk.stem[0].weight, model.head[1].weight
    stem_before, head_before = stem.detach().clone(), head.detach().clone()
    step()
    assert stem.grad is None and torch.equal(stem, stem_before)
    assert not torch.equal(head, head_before)

    schedule.apply(model, 1)
    step()
    assert not torch.equal(stem, stem_before)

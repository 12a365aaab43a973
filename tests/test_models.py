"""The encoder registry and the classifier: shapes, DP-readiness, readouts and checkpoints."""

import functools
import logging
import math
from pathlib import Path

import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.data.records import CLASS_NAMES
from common.errors import ModelError
from common.models.classifier import build_classifier, load_checkpoint, readouts, save_checkpoint
from common.config import PARAMETER_FREE_ENCODERS
from common.models.encoders import ENCODER_NAMES, NORMS, build_encoder

IMAGE_SIZE = 64


@functools.cache
def shared_encoder(name, norm):
    """Building the large torchvision encoders dominates this file's runtime: build each once."""
    return build_encoder(name, norm=norm)


# The parameter-free scattering encoder has its own tests (test_scattering.py).
LEARNED_ENCODERS = tuple(name for name in ENCODER_NAMES if name not in PARAMETER_FREE_ENCODERS)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", LEARNED_ENCODERS)
def test_every_encoder_maps_grey_images_to_features(name, norm):
    encoder = shared_encoder(name, norm)
    images = torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE)

    features = encoder.forward_features(images)
    pooled = encoder(images)

    side = math.ceil(IMAGE_SIZE / encoder.reduction)
    assert features.shape == (2, encoder.out_features, side, side)
    assert pooled.shape == (2, encoder.out_features)
    assert encoder.get_submodule(encoder.input_conv).in_channels == 1
    block_params = sum(p.numel() for block in encoder.blocks() for p in block.parameters())
    assert block_params == sum(p.numel() for p in encoder.parameters())


@pytest.mark.parametrize("name", LEARNED_ENCODERS)
def test_group_variant_is_accepted_by_opacus_and_batch_variant_is_not(name):
    assert ModuleValidator.validate(shared_encoder(name, "group"), strict=False) == []
    assert ModuleValidator.validate(shared_encoder(name, "batch"), strict=False) != []


def test_the_group_variant_is_built_without_a_log_line_per_swapped_batch_norm(caplog):
    fixer_loggers = [logging.getLogger(name) for name in ("opacus.validators.module_validator",
                                                           "opacus.validators.batch_norm")]
    levels = [logger.level for logger in fixer_loggers]

    with caplog.at_level(logging.INFO):
        encoder = build_encoder("resnet18", norm="group")

    assert any(isinstance(module, nn.GroupNorm) for module in encoder.modules())
    assert not [record for record in caplog.records if record.name.startswith("opacus")]
    assert [logger.level for logger in fixer_loggers] == levels  # as they were, for every other caller


def test_unknown_encoder_or_norm_names_the_valid_choices():
    with pytest.raises(ModelError, match="resnet18.*densenet121"):
        build_encoder("vgg16")
    with pytest.raises(ModelError, match="batch, group"):
        build_encoder("smallcnn", norm="layer")


def test_encoder_normalises_its_own_input_with_stored_statistics():
    encoder = build_encoder("smallcnn").eval()
    images = torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE)

    encoder.set_input_statistics(0.2, 0.5)

    assert encoder.state_dict()["input_mean"] == pytest.approx(0.2)
    assert torch.allclose(encoder.forward_features(images), encoder.trunk((images - 0.2) / 0.5))


@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")
# resnet18 and mobilenet_v3_small stand for the torchvision blocks with an in-place residual +=
@pytest.mark.parametrize("name", ["smallcnn", "resnet18", "mobilenet_v3_small"])
def test_group_norm_classifier_takes_a_dp_sgd_step(name):
    torch.manual_seed(0)
    model = build_classifier(name, norm="group")
    data = TensorDataset(torch.rand(8, 1, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    private_model, private_optimizer, private_loader = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(data, batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    first_conv = model.encoder.get_submodule(model.encoder.input_conv).weight
    before = first_conv.detach().clone()

    images, labels = next(iter(private_loader))
    nn.functional.cross_entropy(private_model(images), labels).backward()
    private_optimizer.step()

    assert first_conv.grad_sample.shape[0] == 4
    assert not torch.equal(first_conv, before)


def test_classifier_outputs_one_logit_per_class_and_carries_its_spec():
    model = build_classifier("smallcnn", norm="group", dropout=0.3)

    logits = model(torch.rand(3, 1, IMAGE_SIZE, IMAGE_SIZE))

    assert logits.shape == (3, len(CLASS_NAMES))
    assert model.spec == {"encoder": "smallcnn", "norm": "group", "dropout": 0.3, "num_classes": 3}


def test_classifier_rejects_an_impossible_dropout():
    with pytest.raises(ModelError, match="dropout"):
        build_classifier("smallcnn", dropout=1.0)


def test_readouts_answer_presence_and_type_from_three_class_probabilities():
    probs = torch.tensor([[0.5, 0.1, 0.4], [0.9, 0.05, 0.05], [1.0, 0.0, 0.0]])

    scores = readouts(probs)

    assert torch.allclose(scores["presence"], torch.tensor([0.5, 0.1, 0.0]))
    assert torch.allclose(scores["type"], torch.tensor([0.8, 0.5, 0.5]), atol=1e-5)


def test_readouts_name_the_expected_shape():
    with pytest.raises(ModelError, match=r"\[N, 3\]"):
        readouts(torch.rand(4, 2))


def test_checkpoint_round_trip_reproduces_predictions_and_extras(tmp_path):
    torch.manual_seed(0)
    model = build_classifier("smallcnn")
    model.train()
    model(torch.rand(8, 1, IMAGE_SIZE, IMAGE_SIZE))  # move BatchNorm running statistics off their defaults
    model.eval()
    images = torch.rand(4, 1, IMAGE_SIZE, IMAGE_SIZE)
    path = tmp_path / "model.pt"

    save_checkpoint(model, path, class_names=list(CLASS_NAMES), image_size=IMAGE_SIZE, metrics={"auc": 0.7})
    restored, extra = load_checkpoint(path)

    assert torch.equal(restored(images), model(images))
    assert restored.spec == model.spec and not restored.training
    assert extra == {"class_names": list(CLASS_NAMES), "image_size": IMAGE_SIZE, "metrics": {"auc": 0.7}}


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    model = build_classifier("smallcnn")
    path = tmp_path / "last.pt"
    save_checkpoint(model, path, round=1)

    def dies_midway(payload, target):
        Path(target).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # as the aggregator killed while it writes

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, path, round=2)
    assert load_checkpoint(path)[1] == {"round": 1}
    assert [file.name for file in tmp_path.iterdir()] == ["last.pt"]


def test_checkpoint_extras_must_stay_plain_data(tmp_path):
    model = build_classifier("smallcnn")
    with pytest.raises(ModelError, match="'metrics.auc'"):
        save_checkpoint(model, tmp_path / "m.pt", metrics={"auc": object()})
    with pytest.raises(ModelError, match="reserved"):
        save_checkpoint(model, tmp_path / "m.pt", spec={})


def test_corrupt_or_foreign_checkpoint_names_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)

    with pytest.raises(ModelError, match="corrupt.pt.*not a readable weights file"):
        load_checkpoint(corrupt)
    with pytest.raises(ModelError, match="foreign.pt.*mammofl-classifier"):
        load_checkpoint(foreign)
    with pytest.raises(ModelError, match="missing.pt.*not found"):
        load_checkpoint(tmp_path / "missing.pt")

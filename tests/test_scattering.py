"""The scattering encoder: kymatio's transform as convolutions, standardised on public images."""

import pytest
import torch
from opacus.validators import ModuleValidator

from common.models.classifier import build_classifier
from common.models.encoders import build_encoder
from common.models.scattering import Scattering2D
from common.models.transfer import load_pretrained_encoder, weights_provenance
from common.pretraining import measure_feature_statistics


def test_the_convolutional_scattering_matches_kymatios_fft_transform_inside_the_border():
    # kymatio's public frontend (kymatio.torch) cannot import with SciPy >= 1.15; its 2-D
    # torch frontend can, and is the reference.
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    torch.manual_seed(0)
    images = torch.rand(4, 1, 64, 64)

    ours = Scattering2D()(images)
    reference = ScatteringTorch2D(J=2, shape=(64, 64), L=8)(images).squeeze(1)

    assert ours.shape == reference.shape == (4, 81, 16, 16)
    # Padding differs at the border (reflection here, kymatio's own there): compare inside.
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
    for order, channels in (("0", slice(0, 1)), ("1", slice(1, 17)), ("2", slice(17, 81))):
        error = (ours[inner][:, channels] - reference[inner][:, channels]).norm() / reference[inner][:, channels].norm()
        assert error < 0.01, f"order {order}: relative error {float(error):.4f}"  # measured 3e-7, 9e-4, 2e-3


def test_the_scattering_encoder_learns_nothing_and_opacus_accepts_its_classifier():
    encoder = build_encoder("scattering", norm="group")
    model = build_classifier("scattering", norm="group")

    features = encoder(torch.rand(3, 1, 64, 64))

    assert features.shape == (3, encoder.out_features) == (3, 243)
    assert not encoder.trainable and encoder.blocks() == []
    assert ModuleValidator.validate(model, strict=False) == []
    assert torch.isfinite(features).all()


def test_feature_statistics_come_from_the_pool_and_travel_in_the_encoder_file(tmp_path):
    torch.manual_seed(0)
    pool = [(torch.rand(1, 64, 64) * 0.8, 0) for _ in range(40)]
    path = tmp_path / "scattering.pt"

    result = measure_feature_statistics(pool, encoder_name="scattering", norm="group", batch_size=16,
                                        out_path=path, source="public", source_detail="40 noise images")
    encoder = build_encoder("scattering", norm="group").eval()
    before = encoder(torch.stack([image for image, _ in pool]))
    load_pretrained_encoder(encoder, path)
    after = encoder(torch.stack([image for image, _ in pool]))

    assert result.images == 40 and weights_provenance(path).source == "public"
    assert before.mean(dim=0).abs().max() > 1.0  # raw log-scattering statistics are far from 0
    assert after.mean(dim=0).abs().max() < 1e-3
    assert after.std(dim=0).sub(1).abs().max() < 1e-3


def test_an_encoder_with_weights_is_not_given_statistics_instead_of_pretraining(tmp_path):
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="autoencoder"):
        measure_feature_statistics([(torch.rand(1, 32, 32), 0)] * 2, encoder_name="smallcnn", norm="batch",
                                   batch_size=2, out_path=tmp_path / "x.pt")

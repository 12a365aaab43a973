"""Patient-level DP (``privacy.unit`` "patient"): one patient, all their images, moves a step by at most C."""

import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from common.config import parse_config
from common.data.features import PatientLoss, ViewsHead, ViewsLoss, patient_training_data, privacy_units
from common.errors import ConfigError
from tests.test_local_training import CPU, feature_config

CLIP = 0.5
pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")


def clipped_sum(features: torch.Tensor, labels: torch.Tensor, loss: torch.nn.Module) -> torch.Tensor:
    """Opacus' sum of clipped per-sample gradients of a linear head over one batch of everything."""
    torch.manual_seed(0)
    head = torch.nn.Linear(features.shape[-1], 3)
    engine = PrivacyEngine()
    model, optimizer, _ = engine.make_private(
        module=ViewsHead(head), optimizer=torch.optim.SGD(head.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(features, labels), batch_size=len(features)),
        noise_multiplier=0.0, max_grad_norm=CLIP, poisson_sampling=False)
    loss(model(features), labels).backward()
    optimizer.clip_and_accumulate()
    return torch.cat([parameter.summed_grad.flatten() for parameter in head.parameters()])


def patients(images_of_target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four ordinary patients of 1-3 images and a target patient (index 0) with huge, mislabelled images."""
    torch.manual_seed(1)
    most = max(images_of_target, 3)
    features = torch.zeros(5, most, 1, 6)
    labels = torch.full((5, most), -1)
    for patient, count in enumerate([images_of_target, 1, 2, 3, 2]):
        scale = 5.0 if patient == 0 else 1.0
        features[patient, :count] = torch.randn(count, 1, 6) * scale
        labels[patient, :count] = torch.randint(0, 3, (count,))
    return features, labels


@pytest.mark.parametrize("images", [1, 8])
def test_one_patient_moves_the_clipped_sum_by_at_most_the_clip_norm(images):
    features, labels = patients(images)
    loss = PatientLoss(torch.nn.CrossEntropyLoss())

    with_patient = clipped_sum(features, labels, loss)
    without = clipped_sum(features[1:], labels[1:], loss)

    assert float((with_patient - without).norm()) <= CLIP + 1e-5
    assert float((with_patient - without).norm()) > 0.9 * CLIP  # a huge patient is clipped to C, not to 0


def test_image_level_clipping_would_let_the_same_patient_move_it_by_8_clip_norms():
    features, labels = patients(8)
    rows = [(p, i) for p in range(5) for i in range(features.shape[1]) if labels[p, i] >= 0]
    images = torch.stack([features[p, i] for p, i in rows])
    image_labels = torch.stack([labels[p, i] for p, i in rows])
    loss = ViewsLoss(torch.nn.CrossEntropyLoss())

    moved = (clipped_sum(images, image_labels, loss) - clipped_sum(images[8:], image_labels[8:], loss)).norm()

    assert float(moved) > 2 * CLIP  # why the unit matters: 8 images, up to 8 C


def test_the_loss_sums_a_patients_images_and_ignores_padding():
    logits = torch.randn(2, 3, 1, 3)
    labels = torch.tensor([[0, 2, -1], [1, -1, -1]])
    expected = (torch.nn.functional.cross_entropy(logits[0, :2, 0], labels[0, :2], reduction="sum")
                + torch.nn.functional.cross_entropy(logits[1, :1, 0], labels[1, :1], reduction="sum")) / 2
    assert torch.allclose(PatientLoss(torch.nn.CrossEntropyLoss())(logits, labels), expected)
    assert PatientLoss(torch.nn.CrossEntropyLoss())(torch.zeros(0, 3, 1, 3), torch.zeros(0, 3).long()) == 0


def test_a_private_round_samples_patients_and_accounts_them(tmp_path):
    from clients.local_training import train_site_round
    from clients.privacy import SitePrivacyState
    from common.data.pipeline import load_records
    from common.models.classifier import build_classifier

    config = feature_config(tmp_path, augmentation={"enabled": False, "multiplicity": 1}, batch_size=2,
                            privacy={"enabled": True, "target_epsilon": 8.0, "unit": "patient"},
                            federation={"local_epochs": 1, "rounds": 1, "fraction_evaluate": 0.0})
    records = [record for record in load_records(config.data) if record.split == "train"]
    units = privacy_units(records, "patient")
    assert units < len(records)  # the synthetic exams have several images per patient
    head, loader = patient_training_data(build_classifier("scattering", norm="group", dropout=0.0), records, config,
                                         device=CPU, generator=None)
    assert len(loader.dataset) == units and int((loader.dataset.tensors[1] >= 0).sum()) == len(records)
    state = SitePrivacyState.load_or_create(tmp_path / "state", "site-01", config.privacy)

    result = train_site_round(build_classifier("scattering", norm="group", dropout=0.0), records, config,
                              server_round=1, device=CPU, privacy_state=state, state_dir=tmp_path / "state")

    batches = -(-units // config.batch_size)
    assert result.privacy.sample_rate == pytest.approx(1 / batches)  # patients per batch over patients
    assert result.privacy.unit == "patient" and 0 < result.privacy.epsilon <= 8.0


def test_patient_level_dp_refuses_a_trained_encoder():
    with pytest.raises(ConfigError, match="privacy.unit 'patient'"):
        parse_config({"encoder": "smallcnn", "training": "federated",
                      "privacy": {"enabled": True, "target_epsilon": 8.0, "unit": "patient"}})
    config = parse_config({"encoder": "smallcnn", "privacy": {"enabled": True, "target_epsilon": 8.0,
                           "unit": "patient"}, "training": "federated",
                           "augmentation": False, "model": {"freeze": {"head_only_epochs": 1000}}})
    assert config.privacy.unit == "patient"


def test_a_site_that_protects_patients_refuses_image_level_runs():
    from clients.privacy import SiteLimits, SiteRefusal

    limits = SiteLimits.from_node_config({"data-dir": "/d", "budget-epsilon": 8.0, "privacy-unit": "patient"})
    image_run = parse_config({"privacy": {"enabled": True, "target_epsilon": 4.0}}).privacy
    patient_run = image_run.model_copy(update={"unit": "patient"})
    with pytest.raises(SiteRefusal, match="patient-level DP only"):
        limits.require_allowed("site-a", image_run, 1000)
    assert limits.require_allowed("site-a", patient_run, 1000) == (4.0, "run")


def test_a_privacy_history_is_never_composed_across_units(tmp_path):
    from clients.privacy import SitePrivacyState, SiteRefusal

    image = parse_config({"privacy": {"enabled": True, "target_epsilon": 4.0}}).privacy
    state = SitePrivacyState.load_or_create(tmp_path, "site-a", image)
    state.noise_multiplier = 1.0
    state.record_round(1, [(1.0, 0.1, 10)])
    state.save(tmp_path)

    with pytest.raises(SiteRefusal, match="accounted per image"):
        SitePrivacyState.load_or_create(tmp_path, "site-a", image.model_copy(update={"unit": "patient"}))
    assert SitePrivacyState.load_or_create(tmp_path, "site-a", image).unit == "image"

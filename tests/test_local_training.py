"""A site's local DP-SGD step: ghost clipping equals flat clipping; the transfer schedule holds."""

import warnings

import pytest
import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, TensorDataset

from clients.local_training import make_private, train_site_round
from common.config import parse_config
from common.data.pipeline import load_records
from common.models.classifier import build_classifier
from common.training import train_one_epoch

CPU = torch.device("cpu")


def flat_weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([parameter.detach().flatten() for parameter in model.parameters()])


def one_private_epoch(clipping: str, physical_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights before and after one epoch of noiseless DP-SGD with a tight clip."""
    torch.manual_seed(0)
    model = build_classifier("smallcnn", norm="group", dropout=0.0)
    start = flat_weights(model)
    images, labels = torch.rand(32, 1, 32, 32), torch.randint(0, 3, (32,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)
    config = parse_config({"privacy": {"enabled": True, "noise_multiplier": 1.0, "budget_epsilon": 10,
                                       "max_grad_norm": 0.05, "clipping": clipping}})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.manual_seed(1)  # the same Poisson batches for both clipping modes
    private_model, private_optimizer, loss_fn, private_loader = make_private(
        PrivacyEngine(), model, optimizer, loader, torch.nn.CrossEntropyLoss(), noise_multiplier=0.0, config=config)
    with BatchMemoryManager(data_loader=private_loader, max_physical_batch_size=physical_batch,
                            optimizer=private_optimizer) as physical_loader:
        train_one_epoch(private_model, physical_loader, private_optimizer, loss_fn, device=CPU)
    return start, flat_weights(model)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("physical_batch", [64, 4])
def test_ghost_clipping_takes_exactly_the_steps_flat_clipping_takes(physical_batch):
    start, flat = one_private_epoch("flat", 64)

    _, ghost = one_private_epoch("ghost", physical_batch)

    assert (flat - start).abs().max() > 1e-4  # the epoch did move the weights
    assert torch.allclose(ghost, flat, atol=1e-6)


def test_a_site_trains_only_the_head_for_the_configured_head_only_epochs(tmp_path):
    config = parse_config({
        "device": "cpu", "batch_size": 8, "num_workers": 0, "learning_rate": 0.01, "encoder": "smallcnn",
        "model": {"image_size": 32, "freeze": {"head_only_epochs": 2}}, "federation": {"local_epochs": 1},
        "data": {"root": str(tmp_path / "data"), "cache_dir": None,
                 "synthetic": {"sites": 1, "per_site": 8, "size": 64, "burned_in_text": 0.0}},
        "tracking": {"runs_dir": str(tmp_path / "runs"), "wandb_mode": "disabled"}})
    records = [record for record in load_records(config.data) if record.split == "train"]
    model = build_classifier("smallcnn", norm="group", dropout=0.0)

    def snapshot():
        return ([p.detach().clone() for p in model.encoder.parameters()],
                [p.detach().clone() for p in model.head.parameters()])

    def moved(before, after):
        return any(not torch.equal(a, b) for a, b in zip(before, after))

    for server_round, encoder_trains in ((1, False), (2, False), (3, True)):
        encoder_before, head_before = snapshot()
        train_site_round(model, records, config, server_round=server_round, device=CPU,
                         privacy_state=None, state_dir=None)
        encoder_after, head_after = snapshot()
        assert moved(head_before, head_after)
        assert moved(encoder_before, encoder_after) == encoder_trains


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_views_average_into_one_gradient_per_example_before_clipping():
    """Augmentation multiplicity: an example's K views make one gradient, clipped as a whole."""
    from opacus import GradSampleModule

    from common.data.features import ViewsHead, ViewsLoss

    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(5, 3))
    features, labels = torch.randn(4, 6, 5) * 10, torch.tensor([0, 1, 2, 1])  # 4 examples, 6 views
    private = GradSampleModule(ViewsHead(head))

    ViewsLoss(torch.nn.CrossEntropyLoss())(private(features), labels).backward()
    per_example = head[0].weight.grad_sample

    assert per_example.shape == (4, 3, 5)  # one gradient per example, not per view
    for example in range(4):
        view_grads = []
        for view in range(6):
            weight = head[0].weight.detach().clone().requires_grad_(True)
            logits = torch.nn.functional.linear(features[example, view], weight, head[0].bias.detach())
            torch.nn.functional.cross_entropy(logits[None], labels[example:example + 1]).backward()
            view_grads.append(weight.grad)
        assert torch.allclose(per_example[example], torch.stack(view_grads).mean(dim=0), atol=1e-5)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:Secure RNG turned off")
def test_one_example_with_many_views_moves_the_head_by_at_most_the_clip_norm():
    from common.data.features import ViewsHead, ViewsLoss

    torch.manual_seed(0)
    head = torch.nn.Linear(5, 3)
    start = flat_weights(head)
    loader = DataLoader(TensorDataset(torch.randn(1, 16, 5) * 100, torch.tensor([2])), batch_size=1)
    config = parse_config({"privacy": {"enabled": True, "noise_multiplier": 1.0, "budget_epsilon": 10,
                                       "max_grad_norm": 0.1}})
    private_model, optimizer, loss_fn, private_loader = make_private(
        PrivacyEngine(), ViewsHead(head), torch.optim.SGD(head.parameters(), lr=1.0), loader,
        ViewsLoss(torch.nn.CrossEntropyLoss()), noise_multiplier=0.0, config=config)

    moved = 0.0
    for _ in range(20):  # Poisson batches: the one example is in some of them
        for batch, labels in private_loader:
            optimizer.zero_grad()
            before = flat_weights(head)
            loss_fn(private_model(batch), labels).backward()
            optimizer.step()
            moved = max(moved, float((flat_weights(head) - before).norm()))

    assert 0.05 < moved <= 0.1 + 1e-6  # lr 1, expected batch 1: a step is at most the clip norm
    assert not torch.equal(flat_weights(head), start)


def test_the_exponential_average_follows_its_warmed_up_decay_and_is_what_copy_to_releases():
    from common.training import ExponentialAverage

    parameter = torch.nn.Parameter(torch.zeros(2))
    average = ExponentialAverage([parameter], decay=0.9)
    expected = torch.zeros(2)
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0], start=1):
        with torch.no_grad():
            parameter.fill_(value)
        average.update()
        decay = min(0.9, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * value

    average.copy_to()

    assert torch.allclose(parameter.detach(), expected)
    assert 0.0 < float(expected[0]) < 5.0  # neither the start nor the last iterate


def feature_config(tmp_path, **overrides):
    raw = {
        "device": "cpu", "batch_size": 8, "num_workers": 0, "learning_rate": 0.1, "optimizer": "sgd",
        "encoder": "scattering", "training": "federated", "model": {"image_size": 32},
        "augmentation": {"enabled": True, "strength": 1.0, "multiplicity": 3},
        "federation": {"local_epochs": 2, "rounds": 1},
        "data": {"root": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache"),
                 "synthetic": {"sites": 1, "per_site": 12, "size": 64, "burned_in_text": 0.0}},
        "tracking": {"runs_dir": str(tmp_path / "runs"), "wandb_mode": "disabled"}}
    for key, value in overrides.items():
        raw[key] = value if not isinstance(value, dict) else {**raw.get(key, {}), **value}
    return parse_config(raw)


def test_cached_features_are_what_the_encoder_computes_and_are_read_back_not_recomputed(tmp_path, monkeypatch):
    from common.data.dataset import MammogramDataset
    from common.data.features import FeatureCache
    from common.models.encoders import build_encoder

    config = feature_config(tmp_path)
    records = [record for record in load_records(config.data) if record.split == "train"][:5]
    encoder = build_encoder("scattering", norm="group").eval()
    images = torch.stack([image for image, _ in MammogramDataset(records, image_size=32)])

    views = FeatureCache(encoder, config, device=CPU).encoded_views(records)
    monkeypatch.setattr(encoder, "forward", lambda images: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = FeatureCache(encoder, config, device=CPU).encoded_views(records)

    assert views.shape == (5, 3, 243)
    assert torch.allclose(views[:, 0], build_encoder("scattering", norm="group")(images), atol=1e-5)
    assert not torch.allclose(views[:, 1], views[:, 0])  # the other views are augmentations
    assert not torch.allclose(views[:, 1], views[:, 2])
    assert torch.equal(again, views)


def test_a_changed_encoder_does_not_read_the_old_encoders_features(tmp_path):
    from common.data.features import FeatureCache
    from common.models.encoders import build_encoder

    config = feature_config(tmp_path)
    records = [record for record in load_records(config.data) if record.split == "train"][:2]
    encoder = build_encoder("scattering", norm="group").eval()
    first = FeatureCache(encoder, config, device=CPU).encoded_views(records)

    encoder.trunk.standardise.set_statistics(torch.full((243,), 1.0), torch.full((243,), 2.0))
    second = FeatureCache(encoder, config, device=CPU).encoded_views(records)

    assert torch.allclose(second, (first - 1.0) / 2.0, atol=1e-5)


def test_a_private_round_on_cached_features_trains_the_head_and_accounts_every_step(tmp_path):
    from clients.privacy import SitePrivacyState

    config = feature_config(tmp_path, privacy={"enabled": True, "target_epsilon": 8.0, "budget_epsilon": 8.0},
                            federation={"local_epochs": 2, "rounds": 1, "ema_decay": 0.5, "fraction_evaluate": 0.0})
    records = [record for record in load_records(config.data) if record.split == "train"]
    model = build_classifier("scattering", norm="group", dropout=0.0)
    head_before = flat_weights(model.head)
    state = SitePrivacyState.load_or_create(tmp_path / "state", "site-01", config.privacy)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_site_round(model, records, config, server_round=1, device=CPU, privacy_state=state,
                                  state_dir=tmp_path / "state")

    # Opacus' "Secure RNG turned off" is not said every round: our generators are (clients.privacy).
    assert not [warning for warning in caught if "Secure RNG" in str(warning.message)]
    batches = -(-len(records) // config.batch_size)
    assert result.privacy.steps == batches * 2 and result.train_loss is None
    assert 0 < result.privacy.epsilon <= 8.0
    assert not torch.equal(flat_weights(model.head), head_before)

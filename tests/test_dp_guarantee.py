"""The DP guarantee against a hostile aggregator: secret noise, bounded sensitivity, nothing unaccounted.

Each test is one way the aggregator (who writes the config, so knows its seed) could learn more
about a site's images than the accountant says: predictable noise, a loss whose per-example
clipping does not bound one example, BatchNorm buffers that move, a training loss sent in clear,
a "validation" on training images, a budget the site did not set, weights learned from site images.
"""

import math
import re

import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from clients.site_round import NoHeldOutPatientsError, Site, train_locally, validate
from clients.local_training import make_private, train_site_round
from clients.privacy import SiteLimits, SitePrivacyState, SiteRefusal
from common.config import parse_config
from common.data.pipeline import load_records
from common.errors import ConfigError, MammoflError
from common.losses import build_loss
from common.models.classifier import build_classifier
from common.models.transfer import require_site_free_weights, save_encoder_checkpoint, weights_provenance
from common.training import seed_everything, train_one_epoch

CPU = torch.device("cpu")
NOISE = 1.0
CLIP = 1.0
LEARNING_RATE = 0.1


def site_config(tmp_path, **overrides):
    raw = {
        "seed": 3, "device": "cpu", "training": "federated", "batch_size": 64, "learning_rate": LEARNING_RATE,
        "optimizer": "sgd", "num_workers": 0, "encoder": "smallcnn", "augmentation": False, "verbose": 0,
        "model": {"image_size": 32, "dropout": 0.0},
        "data": {"root": str(tmp_path / "data"), "cache_dir": None,
                 "synthetic": {"sites": 1, "per_site": 24, "size": 64, "seed": 3, "burned_in_text": 0.0}},
        "federation": {"rounds": 1, "local_epochs": 1},
        "privacy": {"enabled": True, "noise_multiplier": NOISE, "budget_epsilon": 1000.0, "max_grad_norm": CLIP},
        "tracking": {"runs_dir": str(tmp_path / "runs"), "wandb_mode": "disabled"},
    }
    for key, value in overrides.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return parse_config(raw)


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([tensor.detach().flatten().float() for tensor in model.state_dict().values()])


def one_private_round(config, records, state_dir, initial: dict) -> torch.Tensor:
    """The update one DP round makes from `initial`, seeded the way the ClientApp seeds a round."""
    model = build_classifier(config.encoder, norm=config.norm, dropout=0.0)
    model.load_state_dict(initial)
    generator = seed_everything(config.seed * 1000 + 1)
    state = SitePrivacyState.load_or_create(state_dir, "site-01", config.privacy)
    train_site_round(model, records, config, server_round=1, device=CPU, privacy_state=state,
                     state_dir=state_dir, generator=generator)
    return flat(model) - torch.cat([tensor.flatten().float() for tensor in initial.values()])


@pytest.fixture(scope="module")
def site_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    config = site_config(root)
    return config, [record for record in load_records(config.data) if record.split == "train"]


def test_two_runs_of_one_config_and_seed_add_independent_noise_of_the_expected_size(site_records, tmp_path):
    # One step with every image in the batch (sample rate 1): the clipped gradient sum is the
    # same in both runs, so the updates differ by lr (z1 - z2) / n with z ~ N(0, (sigma C)^2 I_d).
    config, records = site_records
    initial = build_classifier(config.encoder, norm=config.norm, dropout=0.0).state_dict()
    trainable = sum(parameter.numel() for parameter in build_classifier(config.encoder, norm=config.norm).parameters())

    first = one_private_round(config, records, tmp_path / "a", initial)
    second = one_private_round(config, records, tmp_path / "b", initial)

    expected = LEARNING_RATE * NOISE * CLIP * math.sqrt(2 * trainable) / len(records)
    assert not torch.equal(first, second)
    assert 0.9 * expected <= float((first - second).norm()) <= 1.1 * expected


LOSSES = [("cross_entropy", None), ("weighted_cross_entropy", (0.5, 1.0, 2.0)), ("focal", None),
          ("focal", (0.5, 1.0, 2.0))]


def summed_clipped_gradient(images, labels, loss_fn, clipping: str) -> torch.Tensor:
    """The sum of clipped per-example gradients DP-SGD takes (noise 0, every example sampled)."""
    torch.manual_seed(0)
    model = build_classifier("smallcnn", norm="group", dropout=0.0)
    before = torch.cat([parameter.detach().flatten() for parameter in model.parameters()])
    loader = DataLoader(TensorDataset(images, labels), batch_size=len(labels))
    config = parse_config({"privacy": {"enabled": True, "noise_multiplier": 1.0, "budget_epsilon": 10,
                                       "max_grad_norm": CLIP, "clipping": clipping}})
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    private_model, private_optimizer, private_loss, private_loader = make_private(
        PrivacyEngine(), model, optimizer, loader, loss_fn, noise_multiplier=0.0, config=config)
    train_one_epoch(private_model, private_loader, private_optimizer, private_loss, device=CPU)
    after = torch.cat([parameter.detach().flatten() for parameter in model.parameters()])
    return (before - after) * private_optimizer.expected_batch_size


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("clipping", ["flat", "ghost"])
@pytest.mark.parametrize("loss, class_weights", LOSSES)
def test_one_example_moves_the_summed_clipped_gradient_by_at_most_the_clip_norm(loss, class_weights, clipping):
    torch.manual_seed(1)
    images, labels = torch.rand(8, 1, 32, 32), torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    outlier = torch.full((1, 1, 32, 32), 1000.0)  # its gradient is far beyond the clip norm
    private_config = parse_config({"privacy": {"enabled": True, "noise_multiplier": 1.0, "budget_epsilon": 10},
                                   "loss": loss, "class_weights": class_weights})

    def summed(x, y):
        loss_fn = build_loss(private_config.loss, [0, 0, 0], class_weights=private_config.class_weights, private=True)
        return summed_clipped_gradient(x, y, loss_fn, clipping)

    with_all = summed(images, labels)
    for neighbour_images, neighbour_labels in (
        (torch.cat([images, outlier]), torch.cat([labels, torch.tensor([2])])),  # add the outlier
        (images[1:], labels[1:]),  # remove an ordinary image
    ):
        assert float((summed(neighbour_images, neighbour_labels) - with_all).norm()) <= CLIP * 1.0001


def test_a_batch_normalised_weighted_loss_is_what_breaks_that_bound():
    """The check above can fail: torch's weighted mean (our non-private weighted loss) divides by
    the batch's summed weights."""
    # Eight normal images, each gradient within the clip norm; one heavily weighted malignant
    # image added shrinks all eight by the new normaliser, moving the sum by several C.
    torch.manual_seed(1)
    images, labels = torch.rand(8, 1, 32, 32), torch.zeros(8, dtype=torch.long)
    weighted_mean = build_loss("weighted_cross_entropy", [0, 0, 0], class_weights=(1.0, 1.0, 1000.0))
    before = summed_clipped_gradient(images, labels, weighted_mean, "flat")
    after = summed_clipped_gradient(torch.cat([images, torch.rand(1, 1, 32, 32)]), torch.cat([labels, torch.tensor([2])]),
                                    weighted_mean, "flat")
    assert float((after - before).norm()) > 2 * CLIP


@pytest.mark.parametrize("overrides, message", [
    ({"loss": "weighted_cross_entropy"}, "public class_weights"),
    ({"privacy": {"accountant": "gdp"}}, "use 'rdp' or 'prv'"),
    ({"model": {"norm": "batch"}}, "head_only_epochs >= 1"),
    ({"validation_split": 0.0, "federation": {"fraction_evaluate": 0.5}}, "training images"),
    ({"callbacks": [{"class_name": "ModelCheckpoint", "config": {"monitor": "train_loss"}}]}, "monitor a val_ metric"),
    ({"federation": {"strategy": "fedadam", "client_dp": {"mode": "server-fixed"}}}, "fedavg"),
])
def test_config_check_refuses_what_would_release_outside_the_accountant(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        site_config(tmp_path, **overrides)


def test_config_check_names_the_class_weights_key_when_they_do_not_fit(tmp_path):
    with pytest.raises(ConfigError, match="class_weights"):
        site_config(tmp_path, loss="weighted_cross_entropy", class_weights=[1.0, 2.0])


def test_a_stored_state_with_an_accountant_we_do_not_trust_stops_the_site(tmp_path, site_records):
    config, _ = site_records
    state = SitePrivacyState.load_or_create(tmp_path, "site-01", config.privacy)
    state.accountant = "gdp"
    state.save(tmp_path)
    with pytest.raises(MammoflError, match="'gdp' is not offered"):
        SitePrivacyState.load_or_create(tmp_path, "site-01", config.privacy)


def test_frozen_batch_norm_buffers_do_not_move_in_a_site_round_with_or_without_dp(tmp_path, site_records):
    # A frozen encoder's features are computed in eval mode and cached (common.data.features):
    # its BatchNorm statistics, buffers that travel in the update, stay as they came.
    _, records = site_records
    frozen = {"model": {"norm": "batch", "freeze": {"head_only_epochs": 10}}}
    for private in (True, False):
        config = site_config(tmp_path, **frozen, privacy={"enabled": private})
        model = build_classifier(config.encoder, norm="batch", dropout=0.0)
        before = {name: tensor.clone() for name, tensor in model.named_buffers()}
        head_before = flat(model.head)
        train_site_round(model, records, config, server_round=1, device=CPU,
                         privacy_state=SitePrivacyState.load_or_create(tmp_path / str(private), "s", config.privacy),
                         state_dir=tmp_path / str(private))
        assert not torch.equal(flat(model.head), head_before)
        assert [name for name, tensor in model.named_buffers() if not torch.equal(tensor, before[name])] == []


def test_the_hold_keeps_frozen_batch_norm_layers_in_eval_mode_under_train_mode():
    from clients.local_training import frozen_batch_norms_held

    images = torch.rand(8, 1, 32, 32)
    moved = {}
    for held in (True, False):
        model = build_classifier("smallcnn", norm="batch", dropout=0.0).train()
        model.encoder.requires_grad_(False)
        before = {name: tensor.clone() for name, tensor in model.encoder.named_buffers()}
        if held:
            with frozen_batch_norms_held(model):
                model(images)
        else:
            model(images)
        moved[held] = [name for name, tensor in model.encoder.named_buffers() if not torch.equal(tensor, before[name])]
    assert moved[True] == []
    assert moved[False]  # the hold is what keeps them: without it, train mode moves them


def site_of(config, records, tmp_path, node=None) -> Site:
    split = len(records) * 3 // 4
    return Site(site_id="site-01", config=config, train=records[:split], val=records[split:],
                state_dir=tmp_path, limits=SiteLimits.from_node_config(node or {}))


def test_a_private_site_reports_no_training_loss_and_a_plain_one_does(tmp_path, site_records):
    config, records = site_records
    for private in (True, False):
        run_config = site_config(tmp_path, privacy={"enabled": private})
        model = build_classifier(run_config.encoder, norm=run_config.norm, dropout=0.0)
        metrics, privacy = train_locally(site_of(run_config, records, tmp_path / str(private)), model, 1)
        assert privacy["status"] == "trained"
        assert ("train_loss" in metrics) == (not private)


def test_a_site_without_held_out_patients_evaluates_nothing(tmp_path, site_records):
    config, records = site_records
    site = Site(site_id="site-01", config=config, train=records, val=[], state_dir=tmp_path)
    with pytest.raises(NoHeldOutPatientsError, match="no held-out patients"):
        validate(site, build_classifier(config.encoder, norm=config.norm))


def test_a_site_sends_validation_metrics_only_when_its_run_and_its_operator_ask_for_them(tmp_path, site_records):
    config, records = site_records
    model = build_classifier(config.encoder, norm=config.norm)
    assert "val_macro_auc" in validate(site_of(config, records, tmp_path), model)

    unasked = site_config(tmp_path, federation={"fraction_evaluate": 0.0})
    with pytest.raises(SiteRefusal, match="fraction_evaluate 0"):
        validate(site_of(unasked, records, tmp_path), model)  # a hostile aggregator asks anyway
    with pytest.raises(SiteRefusal, match="--no-evaluation"):
        validate(site_of(config, records, tmp_path, {**DEPLOYED, "allow-evaluation": "false"}), model)


DEPLOYED = {"site-id": "site-01", "data-dir": "/site/data", "budget-epsilon": 2.0, "max-delta": 1e-5}


@pytest.mark.parametrize("privacy, node, reason", [
    ({"enabled": True, "target_epsilon": 8.0, "noise_multiplier": None}, DEPLOYED, "above the site's own 2"),
    ({"enabled": True, "target_delta": 1e-3}, DEPLOYED, "above the site's maximum"),
    ({"enabled": True, "target_delta": 0.01}, {}, "not below 1/\\(10 n\\)"),
    ({"enabled": False}, DEPLOYED, "allow-non-private"),
    ({"enabled": True}, {key: value for key, value in DEPLOYED.items() if key != "budget-epsilon"}, "no budget"),
])
def test_a_site_refuses_a_run_asking_more_than_it_allows(tmp_path, site_records, privacy, node, reason):
    _, records = site_records
    config = site_config(tmp_path, privacy=privacy)
    model = build_classifier(config.encoder, norm=config.norm, dropout=0.0)
    start = flat(model)

    metrics, row = train_locally(site_of(config, records, tmp_path, node), model, 1)

    assert row["status"] == "refused" and metrics["num-examples"] == 0
    assert pytest.approx(0) == float((flat(model) - start).abs().max())  # the global model echoed
    assert re.search(reason, row["reason"])


def test_a_site_may_be_asked_less_than_its_budget_and_the_row_says_whose_bound_applied(tmp_path, site_records):
    _, records = site_records
    results = {}
    for asked in (1.0, 2.0):
        config = site_config(tmp_path, privacy={"budget_epsilon": asked, "noise_multiplier": 10.0})
        model = build_classifier(config.encoder, norm=config.norm, dropout=0.0)
        metrics, row = train_locally(site_of(config, records, tmp_path / str(asked), DEPLOYED), model, 1)
        results[asked] = (row["status"], row.get("budget-bound"), metrics.get("budget_epsilon"))
    assert results == {1.0: ("trained", "run", 1.0), 2.0: ("trained", "site", 2.0)}


def test_site_run_requires_a_budget_and_hands_its_limits_to_the_client_app(tmp_path, capsys):
    from flwr.common.config import parse_config_args

    from clients.site import SiteNode
    from mammofl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["site", "run", "--site-id", "a", "--data", str(tmp_path), "--superlink", "x:1", "--insecure"])
    assert exit_info.value.code == 2 and "--budget-epsilon" in capsys.readouterr().err
    node = SiteNode(site_id="a", data_dir=tmp_path, state_dir=tmp_path, superlink="x:1", root_certificates=None,
                    auth_private_key=None, budget_epsilon=2.0, max_delta=1e-4)

    limits = SiteLimits.from_node_config(parse_config_args([node.node_config()]))

    assert limits == SiteLimits(deployed=True, budget_epsilon=2.0, max_delta=1e-4, allow_non_private=False,
                                allow_evaluation=True)
    with pytest.raises(SiteRefusal, match="above the site's own 2"):
        limits.require_allowed("a", parse_config({"privacy": {"enabled": True, "target_epsilon": 8.0}}).privacy, 100)


def test_weights_learned_from_site_images_are_refused_for_a_federated_run(tmp_path):
    encoder = build_classifier("smallcnn", norm="group").encoder
    for source in ("public", "training-data"):
        save_encoder_checkpoint(encoder, tmp_path / f"{source}.pt", source=source)
    torch.save(build_classifier("smallcnn", norm="group").encoder.trunk.state_dict(), tmp_path / "external.pt")

    assert require_site_free_weights(tmp_path / "public.pt").source == "public"
    external = require_site_free_weights(tmp_path / "external.pt")
    assert external.source == "external" and len(external.sha256) == 64
    with pytest.raises(ConfigError, match="learned from training-data"):
        require_site_free_weights(tmp_path / "training-data.pt")
    legacy = {"format": "mammofl-encoder", "version": 1, "encoder": "smallcnn", "norm": "group",
              "state_dict": encoder.state_dict()}
    torch.save(legacy, tmp_path / "legacy.pt")
    assert weights_provenance(tmp_path / "legacy.pt").source == "unrecorded"
    with pytest.raises(ConfigError, match="learned from unrecorded"):
        require_site_free_weights(tmp_path / "legacy.pt")


def test_the_privacy_report_says_plainly_when_the_model_predicts_one_class(tmp_path):
    from common.runs import RunDirectory
    from server.privacy_ledger import PrivacyLedger, write_report

    run = RunDirectory(tmp_path)
    ledger = PrivacyLedger(tmp_path / "privacy")
    ledger.append({"site": "site-01", "round": 1, "status": "trained", "steps": 4, "sample_rate": 0.5,
                   "noise_multiplier": 1.0, "max_grad_norm": 1.0, "epsilon": 2.0, "delta": 1e-5,
                   "budget_epsilon": 8.0, "accountant": "rdp"})
    run.log_metrics({"round": 1, "test_macro_auc": 0.56, "test_balanced_accuracy": 1 / 3, "test_predicted_classes": 1})

    report = write_report(ledger)

    assert "single class" in report["model"]["unusable_because"]
    assert "**FAILED: the model predicts a single class" in (tmp_path / "privacy" / "report.md").read_text()


@pytest.fixture(scope="module")
def larger_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("larger")
    config = site_config(root, data={"synthetic": {"sites": 1, "per_site": 120, "size": 64, "seed": 4,
                                                   "burned_in_text": 0.0}})
    return root, [record for record in load_records(config.data) if record.split == "train"]


@pytest.mark.parametrize("records_used, batch_size, physical, workers, epochs", [
    (None, 64, 16, 2, 3),  # Poisson batches split into physical ones, with DataLoader workers
    (93, 1, 64, 0, 1),  # 93 batches of one: Opacus' sampler draws int(1 / (1/93)) = 92 a epoch
])
def test_the_accountant_records_exactly_the_steps_the_budget_check_planned(
        larger_site, tmp_path, records_used, batch_size, physical, workers, epochs):
    root, records = larger_site
    records = records[:records_used] if records_used else records
    config = site_config(root, batch_size=batch_size, num_workers=workers,
                         privacy={"max_physical_batch_size": physical}, federation={"local_epochs": epochs},
                         data={"synthetic": {"sites": 1, "per_site": 120, "size": 64, "seed": 4, "burned_in_text": 0.0}})
    batches = math.ceil(len(records) / batch_size)
    state = SitePrivacyState.load_or_create(tmp_path, "site-01", config.privacy)
    model = build_classifier(config.encoder, norm=config.norm, dropout=0.0)

    result = train_site_round(model, records, config, server_round=1, device=CPU, privacy_state=state,
                              state_dir=tmp_path)

    assert result.privacy.steps == int(1 / (1 / batches)) * epochs
    assert sum(steps for _, _, steps in state.history) == result.privacy.steps

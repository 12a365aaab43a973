"""Does DP federated training learn? A transfer-learned encoder, DP-SGD on the head, 3 sites.

At this size (about 80 training images per site) DP-SGD on every weight of even the small CNN
drowns in noise (measured: test macro AUC 0.45-0.49, chance is 0.5). The mission's recipe
works: pretrain the encoder without site data (our autoencoder on a public stand-in set),
freeze it, and let each site fine-tune the head with DP-SGD, so the noise spreads over a few
hundred weights instead of a hundred thousand.
"""

import json

import pytest

from server.privacy_ledger import PrivacyLedger
from simulations.federated import simulate
from simulations.pretrain import pretrain_from_config
from tests.test_federated import federated_config

TARGET_EPSILON = 8.0
# Chance is 0.5 for both AUCs. With noise from fresh entropy (so a different model every run),
# six runs of this exact setting gave macro AUC 0.675-0.731 and presence AUC 0.78-0.87; the
# thresholds sit well below that and well above chance. (Adam at lr 0.01, which the test used
# while noise followed the config seed, gave 0.40-0.66: its normalised steps follow the noise.)
MIN_MACRO_AUC = 0.60
MIN_PRESENCE_AUC = 0.68


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("utility")
    public = {"sites": 1, "per_site": 200, "size": 96, "seed": 99, "burned_in_text": 0.0, "lesion_contrast": 2.0}
    config = federated_config(
        root,
        optimizer="sgd", learning_rate=0.3, batch_size=64,
        data={"synthetic": {"sites": 3, "per_site": 150, "size": 96, "seed": 11, "burned_in_text": 0.0,
                            "test_fraction": 0.3, "lesion_contrast": 2.0}},
        model={"image_size": 64, "pretrained": str(root / "encoder.pt"), "freeze": {"head_only_epochs": 1000}},
        pretraining={"source": "public", "public_root": str(root / "public"), "public": public, "epochs": 8},
        federation={"rounds": 3, "local_epochs": 5, "min_train_sites": 1, "fraction_evaluate": 0.0},
    )
    pretrain_from_config(config)
    return simulate(config, log=lambda message: None)


@pytest.mark.slow
def test_dp_federated_fine_tuning_of_a_pretrained_encoder_beats_chance(transfer_run):
    last = [row for row in transfer_run.run.read_metrics() if "round" in row][-1]
    assert last["round"] == 3 and last["sites_trained"] == 3
    assert last["test_macro_auc"] >= MIN_MACRO_AUC
    assert last["test_presence_auc"] >= MIN_PRESENCE_AUC
    ledger = PrivacyLedger(transfer_run.run.root / "privacy").rows()
    assert max(row["epsilon"] for row in ledger) <= TARGET_EPSILON


def test_the_privacy_report_names_the_starting_weights_and_every_release(transfer_run):
    privacy = transfer_run.run.root / "privacy"
    report = json.loads((privacy / "report.json").read_text())
    assert report["pretrained"]["source"] == "public" and len(report["pretrained"]["sha256"]) == 64
    assert set(report["releases"]) == {"model update", "number of training images", "privacy row",
                                       "validation metrics"}
    markdown = (privacy / "report.md").read_text()
    assert "## What each site releases" in markdown and "fresh operating-system entropy" in markdown


def test_a_federated_run_refuses_weights_learned_from_site_images_before_reading_any(tmp_path):
    from common.errors import ConfigError
    from common.models.classifier import build_classifier
    from common.models.transfer import save_encoder_checkpoint

    save_encoder_checkpoint(build_classifier("smallcnn", norm="group").encoder, tmp_path / "encoder.pt",
                            source="training-data")
    config = federated_config(tmp_path, model={"image_size": 64, "pretrained": str(tmp_path / "encoder.pt")})

    with pytest.raises(ConfigError, match="learned from training-data"):
        simulate(config, log=lambda message: None)
    assert not (tmp_path / "data").exists()


def test_pretraining_a_federated_config_on_the_sites_pooled_images_is_refused(tmp_path):
    from common.errors import ConfigError

    config = federated_config(tmp_path, model={"image_size": 64, "pretrained": str(tmp_path / "encoder.pt")})

    with pytest.raises(ConfigError, match="pretraining.source"):
        pretrain_from_config(config)
    assert not (tmp_path / "data").exists()  # refused before a single site image was read

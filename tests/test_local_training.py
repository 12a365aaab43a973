"""A site's local DP-SGD step: ghost clipping equals flat clipping; the transfer schedule holds."""

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

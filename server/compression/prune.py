"""Pruning a trained classifier: zeroing single weights, or cutting whole channels.

Unstructured pruning (torch.nn.utils.prune, global L1 magnitude) shrinks the file once
stored sparse but leaves the dense kernels as slow as before. Structured pruning removes
channels, which only pays if every layer that consumes a removed channel (the next
convolution, a BatchNorm, a residual sum, the head) is cut to match; torch-pruning's
dependency graph finds those groups, so the result is a smaller dense network that is
really faster.

Channels are ranked by first-order Taylor importance, |weight x gradient| summed over a
dependency group, with the gradient of the model's cross-entropy against its own
predictions on the server's calibration images (no labels needed). Weight magnitude,
tried first, ignores that BatchNorm rescales every channel: at 50 % on our smallcnn it
kept 44 % agreement with fp32 (presence AUC fell from 0.99 to 0.05), Taylor kept 86 %.
"""

from __future__ import annotations

import copy

import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.utils import prune

from common.models.classifier import MammoClassifier
from server.compression.finetune import Finetune

IMPORTANCE_BATCH = 16


def weight_layers(model: nn.Module) -> list[nn.Module]:
    """Every convolution and linear layer: the weights that pruning and int8 rounding act on."""
    return [module for module in model.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]


def weight_sparsity(model: nn.Module) -> float:
    """The share of zero entries over the weights of `weight_layers`: what pruning set to zero."""
    weights = [module.weight for module in weight_layers(model)]
    zeros = sum(int((weight == 0).sum()) for weight in weights)
    return zeros / sum(weight.numel() for weight in weights)


def prune_unstructured(model: MammoClassifier, sparsity: float, finetune: Finetune | None = None) -> MammoClassifier:
    """A copy of `model` with the `sparsity` share of smallest-magnitude weights set to zero.

    Global over all layers, so layers with many small weights give up more. `finetune`
    trains the survivors while the masks still hold the pruned weights at zero; the masks
    are then folded into the weights (``prune.remove``), leaving ordinary parameters.
    """
    pruned = copy.deepcopy(model)
    targets = [(module, "weight") for module in weight_layers(pruned)]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    if finetune is not None:
        finetune(pruned)
    for module, name in targets:
        prune.remove(module, name)
    return pruned.eval()


def prune_channels(
    model: MammoClassifier, channel_sparsity: float, images: Tensor, finetune: Finetune | None = None
) -> MammoClassifier:
    """A copy of `model` with `channel_sparsity` of each prunable layer's channels removed.

    `images` [K, 1, S, S] (calibration images) drive the Taylor ranking; the 3 class
    logits are kept, as is the single input channel (nothing produces it to be pruned).
    `finetune` then trains the narrower network.
    """
    pruned = copy.deepcopy(model).eval()
    output_layer = next(module for module in reversed(list(pruned.head)) if isinstance(module, nn.Linear))
    pruner = tp.pruner.BasePruner(
        pruned,
        images[:1],
        importance=tp.importance.GroupTaylorImportance(),
        pruning_ratio=channel_sparsity,
        ignored_layers=[output_layer],
    )
    _accumulate_self_labelled_gradients(pruned, images)
    pruner.step()
    pruned.zero_grad(set_to_none=True)
    if finetune is not None:
        finetune(pruned)
    return pruned.eval()


def _accumulate_self_labelled_gradients(model: nn.Module, images: Tensor) -> None:
    """Gradients of the cross-entropy between `model` and its own predicted classes on `images`."""
    model.zero_grad(set_to_none=True)
    for batch in images.split(IMPORTANCE_BATCH):
        logits = model(batch)
        loss = nn.functional.cross_entropy(logits, logits.argmax(dim=1).detach(), reduction="sum") / len(images)
        loss.backward()

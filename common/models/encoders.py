"""The encoder registry: every backbone a classifier or autoencoder can be built on.

An `Encoder` turns single-channel images in [0, 1] (float32, [N, 1, S, S]) into features.
It normalises its input itself, with a mean and standard deviation kept as buffers in
its state_dict, so training, serving and export all feed raw [0, 1] pixels and never
need to know which statistics a backbone was trained with.

torchvision backbones keep torchvision's own parameter names under ``trunk.``, so an
official ImageNet state_dict maps onto them key for key (see `common.models.transfer`).
Their first convolution is rebuilt with one input channel.

``norm="group"`` is the variant DP-SGD can train: BatchNorm mixes the samples of a batch,
so per-sample gradients (and with them Opacus) are impossible; Opacus' own
`ModuleValidator.fix` swaps every BatchNorm for a GroupNorm with gcd(32, C) groups, and
in-place operations, which Opacus' gradient hooks cannot follow, are taken out.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Literal

import torch
import torch.fx
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torchvision import models

from common.errors import ModelError
from common.models.scattering import ScatteringFeatures

Norm = Literal["batch", "group"]
NORMS: tuple[str, ...] = ("batch", "group")


@dataclass(frozen=True)
class Trunk:
    """A backbone cut before its pooling, as an architecture builder hands it over.

    `layers` runs [N, 1, S, S] -> [N, out_features, S/reduction, S/reduction]. `input_conv`
    and `blocks` are dotted module names inside `layers`: the first convolution, and the
    groups of modules that form the freeze schedule's blocks, ordered input -> output.
    """

    layers: nn.Module
    input_conv: str | None  # None: the trunk has no learned first convolution
    blocks: tuple[tuple[str, ...], ...]
    out_features: int
    reduction: int
    pooled: bool = False  # True: `layers` already returns [N, out_features]
    input_mean: float = 0.5  # what a fresh encoder normalises its [0, 1] input with
    input_std: float = 0.25


class Encoder(nn.Module):
    """A registry backbone: [N, 1, S, S] in [0, 1] -> pooled features [N, out_features].

    `reduction` is the total stride of `forward_features`; `input_conv` the dotted name of
    the first convolution within this module (where RGB weights need adapting). In the
    group-norm variant `trunk` is a torch.fx GraphModule: parameter and module names are
    torchvision's, but reach modules by dotted name (`get_submodule`), not by index.
    """

    def __init__(self, name: str, norm: Norm, trunk: Trunk) -> None:
        super().__init__()
        self.name = name
        self.norm = norm
        self.trunk = trunk.layers
        self.out_features = trunk.out_features
        self.reduction = trunk.reduction
        self.pooled = trunk.pooled
        self.input_conv = None if trunk.input_conv is None else f"trunk.{trunk.input_conv}"
        self._block_names = trunk.blocks
        self.register_buffer("input_mean", torch.tensor(trunk.input_mean))
        self.register_buffer("input_std", torch.tensor(trunk.input_std))

    def set_input_statistics(self, mean: float, std: float) -> None:
        """Normalise inputs with the statistics the weights were trained under."""
        self.input_mean.fill_(mean)
        self.input_std.fill_(std)

    def forward_features(self, images: Tensor) -> Tensor:
        """The feature map [N, out_features, h, w] before pooling (h = S / reduction, rounded up);
        for a `pooled` trunk the features [N, out_features] themselves."""
        return self.trunk((images - self.input_mean) / self.input_std)

    @property
    def trainable(self) -> bool:
        """Whether the encoder has any parameter at all (the scattering encoder has none)."""
        return any(True for _ in self.parameters())

    def forward(self, images: Tensor) -> Tensor:
        features = self.forward_features(images)
        return features if self.pooled else features.mean(dim=(2, 3))

    def blocks(self) -> list[nn.Module]:
        """The encoder's stages, input -> output; together they hold every parameter.

        Looked up by name on each call, so they stay correct after modules are swapped.
        """
        return [
            nn.ModuleList(self.get_submodule(f"trunk.{name}") for name in group)
            for group in self._block_names
        ]


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def _small_cnn() -> Trunk:
    """Our CPU-sized encoder (~290k parameters): a strided stem, then three stages that
    each halve the resolution and double the channels (16 -> 128, total stride 16)."""
    widths = (16, 32, 64, 128)
    stages = [("stem", _conv_block(1, widths[0], stride=2))]
    for index, (width_in, width_out) in enumerate(zip(widths, widths[1:]), start=1):
        stage = nn.Sequential(_conv_block(width_in, width_out, 2), _conv_block(width_out, width_out, 1))
        stages.append((f"stage{index}", stage))
    return Trunk(
        layers=nn.Sequential(OrderedDict(stages)),
        input_conv="stem.0",
        blocks=tuple((name,) for name, _ in stages),
        out_features=widths[-1],
        reduction=16,
    )


def _resnet(constructor: Callable[..., models.ResNet]) -> Trunk:
    net = constructor(weights=None)
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return Trunk(
        layers=nn.Sequential(OrderedDict((name, getattr(net, name)) for name in names)),
        input_conv="conv1",
        blocks=(("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)),
        out_features=net.fc.in_features,
        reduction=32,
    )


def _staged_features(constructor: Callable[..., nn.Module]) -> Trunk:
    """MobileNetV3 and EfficientNet: `features` is already a list of stages."""
    net = constructor(weights=None)
    head = next(module for module in net.classifier if isinstance(module, nn.Linear))
    return Trunk(
        layers=nn.Sequential(OrderedDict(features=net.features)),
        input_conv="features.0.0",
        blocks=tuple((f"features.{index}",) for index in range(len(net.features))),
        out_features=head.in_features,
        reduction=32,
    )


def _densenet(constructor: Callable[..., models.DenseNet]) -> Trunk:
    net = constructor(weights=None)
    stem = ("features.conv0", "features.norm0")
    dense_stages = tuple((f"features.denseblock{i}", f"features.transition{i}") for i in (1, 2, 3))
    last = ("features.denseblock4", "features.norm5")
    return Trunk(
        # torchvision applies this ReLU functionally between `features` and the pooling.
        layers=nn.Sequential(OrderedDict(features=net.features, relu=nn.ReLU())),
        input_conv="features.conv0",
        blocks=(stem, *dense_stages, last),
        out_features=net.classifier.in_features,
        reduction=32,
    )


def _scattering() -> Trunk:
    """Wavelet scattering statistics (`common.models.scattering`): fixed filters, no parameter."""
    features = ScatteringFeatures()
    # Scattering sees raw [0, 1] pixels: its log and maximum are not shift-invariant.
    return Trunk(layers=features, input_conv=None, blocks=(), out_features=features.out_features,
                 reduction=4, pooled=True, input_mean=0.0, input_std=1.0)


_ARCHITECTURES: dict[str, Callable[[], Trunk]] = {
    "smallcnn": _small_cnn,
    "scattering": _scattering,
    "resnet18": partial(_resnet, models.resnet18),
    "resnet34": partial(_resnet, models.resnet34),
    "resnet50": partial(_resnet, models.resnet50),
    "mobilenet_v3_small": partial(_staged_features, models.mobilenet_v3_small),
    "mobilenet_v3_large": partial(_staged_features, models.mobilenet_v3_large),
    "efficientnet_b0": partial(_staged_features, models.efficientnet_b0),
    "densenet121": partial(_densenet, models.densenet121),
}
ENCODER_NAMES: tuple[str, ...] = tuple(_ARCHITECTURES)


def _use_single_channel_input(trunk: Trunk) -> None:
    """Swap the RGB first convolution for a one-channel one, in place.

    Its initial weights are channel 0 of the architecture's own initialisation, which
    keeps that scheme's scale (torchvision initialises these convs by fan-out).
    """
    rgb_conv = trunk.layers.get_submodule(trunk.input_conv)
    grey_conv = nn.Conv2d(
        1,
        rgb_conv.out_channels,
        rgb_conv.kernel_size,
        stride=rgb_conv.stride,
        padding=rgb_conv.padding,
        dilation=rgb_conv.dilation,
        bias=rgb_conv.bias is not None,
    )
    with torch.no_grad():
        grey_conv.weight.copy_(rgb_conv.weight[:, :1])
        if rgb_conv.bias is not None:
            grey_conv.bias.copy_(rgb_conv.bias)
    trunk.layers.set_submodule(trunk.input_conv, grey_conv)


def _without_inplace_ops(layers: nn.Sequential) -> nn.Module:
    """The same layers (same parameter names) with no in-place operation left.

    Opacus computes per-sample gradients through full backward hooks on every trainable
    module, and autograd forbids modifying a hooked module's output in place: torchvision's
    ``ReLU(inplace=True)`` and residual ``out += identity`` would fail on the first DP-SGD
    backward. In-place activations are switched off by flag; symbolic tracing with torch.fx
    records ``+=`` on a traced value as an ordinary, out-of-place addition.
    """
    for module in layers.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return torch.fx.symbolic_trace(layers)


def build_encoder(name: str, *, norm: Norm = "batch") -> Encoder:
    """A freshly initialised encoder from the registry (never downloads weights)."""
    if name not in _ARCHITECTURES:
        raise ModelError(f"unknown encoder {name!r}; valid encoders: {', '.join(ENCODER_NAMES)}")
    if norm not in NORMS:
        raise ModelError(f"unknown norm {norm!r} for encoder {name!r}; valid norms: {', '.join(NORMS)}")
    trunk = _ARCHITECTURES[name]()
    if trunk.input_conv is not None and trunk.layers.get_submodule(trunk.input_conv).in_channels != 1:
        _use_single_channel_input(trunk)
    if norm == "group" and trunk.blocks:
        with _quiet_opacus_fixer():
            trunk = replace(trunk, layers=_without_inplace_ops(ModuleValidator.fix(trunk.layers)))
    return Encoder(name, norm, trunk)


@contextmanager
def _quiet_opacus_fixer() -> Iterator[None]:
    """`ModuleValidator.fix` logs a line at INFO for every BatchNorm it swaps (a ResNet-18: 20), and
    a site builds its model for every message: the swap is this module's documented design, not
    news. The fixer's warnings and errors still get through."""
    quieted = [logging.getLogger(name) for name in ("opacus.validators.module_validator",
                                                     "opacus.validators.batch_norm")]
    levels = [logger.level for logger in quieted]
    for logger in quieted:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(quieted, levels):
            logger.setLevel(level)

"""A wavelet scattering encoder: features that are fixed before any image is seen.

Tramer & Boneh (2021, "Differentially private learning needs better features (or much more
data)") showed that a linear model on handcrafted ScatterNet features beats end-to-end
DP-SGD at every privacy level they measured: the features cost no privacy (no parameter is
learned from anyone's images), and DP-SGD then trains a few hundred weights instead of a
network, so its noise is spread over few dimensions.

This is the second-order scattering transform of Mallat (2012) with J = 2 scales and L = 8
orientations, the setting Tramer & Boneh found best: 1 + J L + L^2 J(J-1)/2 = 81 channels on
a grid 2^J times coarser than the image. Its Morlet filters are kymatio's (`morlet_2d`,
`gabor_2d`, with kymatio's sigma, xi and slant), built in the spatial domain and applied as
ordinary convolutions with reflection padding, rather than with kymatio's FFT frontend: a
convolution exports to ONNX and quantises with the rest of the model, and kymatio's
``kymatio.torch`` entry point no longer imports with SciPy >= 1.15 (its 3-D module needs the
removed ``scipy.special.sph_harm``).

The encoder's pooled output is, per channel, the mean, maximum and standard deviation of
log(1 + c S) over the grid (the maximum keeps a small lesion that averaging would wash out),
standardised with per-feature statistics measured on public images (`FeatureStandardiser`,
set by ``mammofl pretrain``): 243 features, no trainable parameter.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from kymatio.scattering2d.filter_bank import gabor_2d, morlet_2d
from torch import Tensor, nn

SCALES = 2
ORIENTATIONS = 8
# Spatial support of every filter: +-10 pixels covers 3 sigma of the widest one (the j = 1
# wavelet is 0.8 * 2 / slant = 3.2 pixels wide across its orientation).
KERNEL_SIZE = 21
# log(1 + LOG_GAIN * S): scattering coefficients of [0, 1] images span several decades.
LOG_GAIN = 100.0
POOLED_STATISTICS = ("mean", "max", "std")


def _morlet(sigma: float, theta: float, xi: float, size: int = KERNEL_SIZE) -> np.ndarray:
    # kymatio's filters live on a grid starting at `offset`: centre it on the kernel.
    return morlet_2d(size, size, sigma, theta, xi, slant=4.0 / ORIENTATIONS, offset=-(size // 2))


def _gaussian(sigma: float, size: int) -> np.ndarray:
    return np.real(gabor_2d(size, size, sigma, 0.0, 0.0, offset=-(size // 2)))


def _complex_as_real(filters: list[np.ndarray]) -> Tensor:
    """Complex filters [F] (each K x K) as real conv weights [2F, 1, K, K]: real, imaginary, ..."""
    parts = [part for kernel in filters for part in (np.real(kernel), np.imag(kernel))]
    return torch.tensor(np.stack(parts), dtype=torch.float32).unsqueeze(1)


def _wavelets(j: int) -> list[np.ndarray]:
    return [
        _morlet(0.8 * 2**j, (int(ORIENTATIONS - ORIENTATIONS / 2 - 1) - theta) * math.pi / ORIENTATIONS,
                3.0 / 4.0 * math.pi / 2**j)
        for theta in range(ORIENTATIONS)
    ]


def _modulus(pairs: Tensor) -> Tensor:
    """|z| of channels stored as (real, imaginary) pairs: [N, 2F, H, W] -> [N, F, H, W]."""
    n, channels, height, width = pairs.shape
    z = pairs.reshape(n, channels // 2, 2, height, width)
    return torch.sqrt(z.square().sum(dim=2) + 1e-12)


def _conv(images: Tensor, weight: Tensor, *, stride: int = 1, groups: int = 1) -> Tensor:
    pad = weight.shape[-1] // 2
    return F.conv2d(F.pad(images, (pad, pad, pad, pad), mode="reflect"), weight, stride=stride, groups=groups)


class Scattering2D(nn.Module):
    """[N, 1, S, S] -> second-order scattering coefficients [N, 81, S/4, S/4] (J = 2, L = 8).

    Order 0 is the image low-passed; order 1 |x * psi_j1| low-passed; order 2
    ||x * psi_0| * psi_1| low-passed (only j2 > j1 carries energy). As in kymatio, each
    modulus is computed at the resolution its scale allows (2^j coarser) and every path is
    low-passed by phi_J and subsampled to the 2^J-coarser grid. The filters are
    non-persistent buffers: nothing here trains, and they are a function of the code, so
    they are neither stored in checkpoints nor sent to or from the sites.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("psi0", _complex_as_real(_wavelets(0)), persistent=False)
        self.register_buffer("psi1", _complex_as_real(_wavelets(1)), persistent=False)
        # phi_J at full resolution, and the same filter on the half-resolution grid.
        self.register_buffer("phi_full", torch.tensor(_gaussian(0.8 * 2 ** (SCALES - 1), KERNEL_SIZE),
                                                      dtype=torch.float32)[None, None], persistent=False)
        self.register_buffer("phi_half", torch.tensor(_gaussian(0.8 * 2 ** (SCALES - 2), KERNEL_SIZE // 2 + 1),
                                                      dtype=torch.float32)[None, None], persistent=False)

    @property
    def channels(self) -> int:
        return 1 + SCALES * ORIENTATIONS + ORIENTATIONS * ORIENTATIONS

    def _lowpass(self, maps: Tensor, phi: Tensor, stride: int) -> Tensor:
        channels = maps.shape[1]
        return _conv(maps, phi.expand(channels, 1, -1, -1), stride=stride, groups=channels)

    def forward(self, images: Tensor) -> Tensor:
        u1_fine = _modulus(_conv(images, self.psi0))  # j1 = 0, full resolution: [N, L, S, S]
        u1_coarse = _modulus(_conv(images, self.psi1, stride=2))  # j1 = 1, every 2nd pixel
        # Order 2: each j1 = 0 map against the 8 wavelets at j2 = 1 (kymatio's subsampling by 2^(j2 - j1)).
        u2 = _modulus(_conv(u1_fine, self.psi1.repeat(ORIENTATIONS, 1, 1, 1), stride=2, groups=ORIENTATIONS))
        return torch.cat([
            self._lowpass(images, self.phi_full, 4),
            self._lowpass(u1_fine, self.phi_full, 4),
            self._lowpass(u1_coarse, self.phi_half, 2),
            self._lowpass(u2, self.phi_half, 2),
        ], dim=1)


class PooledStatistics(nn.Module):
    """[N, C, h, w] -> [N, 3C]: per channel the mean, maximum and standard deviation over the grid."""

    def forward(self, maps: Tensor) -> Tensor:
        flat = maps.flatten(2)
        return torch.cat([flat.mean(dim=2), flat.amax(dim=2), flat.std(dim=2)], dim=1)


class FeatureStandardiser(nn.Module):
    """(features - mean) / std with per-feature statistics kept as buffers.

    The statistics must come from images that belong to no site (``mammofl pretrain`` measures
    them on the public set): measured on a site's images they would be a release of those
    images outside DP-SGD. Until set they are 0 and 1 (the identity).
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))

    def set_statistics(self, mean: Tensor, std: Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-6))

    def forward(self, features: Tensor) -> Tensor:
        return (features - self.mean) / self.std


class ScatteringFeatures(nn.Module):
    """Images [N, 1, S, S] -> standardised scattering statistics [N, 243] (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.scattering = Scattering2D()
        self.pool = PooledStatistics()
        # A plain attribute, like a Linear layer's: model files record and restore it.
        self.out_features = len(POOLED_STATISTICS) * self.scattering.channels
        self.standardise = FeatureStandardiser(self.out_features)

    def raw(self, images: Tensor) -> Tensor:
        """The pooled statistics before standardisation."""
        return self.pool(torch.log1p(LOG_GAIN * self.scattering(images)))

    def forward(self, images: Tensor) -> Tensor:
        return self.standardise(self.raw(images))

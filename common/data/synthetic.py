"""Synthetic mammograms: breast anatomy, lesions and per-site scanner physics (numpy/scipy only).

Why this exists: the federated pipeline (non-IID sites, DICOM decoding, de-identification,
a learnable but not trivial label) must run end to end without one real patient image.

Contract:
- Three image-level classes (`records.CLASS_NAMES`): normal = tissue only; benign =
  circumscribed round/oval/lobulated masses or coarse, popcorn, rod-like or round calcifications;
  malignant = irregular/spiculated masses, architectural distortion, or fine pleomorphic /
  linear-branching microcalcifications. Contrast follows the CBIS-DDSM subtlety (1 subtle - 5
  obvious) and dense tissue hides masses, so some lesions are barely visible.
- Geometry is physical: the image is `FIELD_HEIGHT_MM` tall whatever its `size`, so a lesion
  has the same size in mm at every resolution and fine calcifications fade when downsampled,
  as they do in real mammograms.
- Sites are non-IID twice over: each has a `ScannerProfile` (response curve, noise, blur, bit
  depth, photometric interpretation) and its own class priors (`site_class_priors`).
- Everything is a pure function of its seed: no clock, no global random state.

Images are drawn in a canonical orientation (chest wall on the left, nipple to the right) and
mirrored for right breasts, which is how CBIS-DDSM shows them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import expit

from common.data.records import BENIGN, MALIGNANT, NORMAL
from common.errors import DataError

FIELD_HEIGHT_MM = 240.0
COLUMN_RATIO = 0.8
VIEWS: tuple[str, ...] = ("CC", "MLO")
LATERALITIES: tuple[str, ...] = ("L", "R")
PATHOLOGIES: tuple[str, ...] = ("BENIGN", "BENIGN_WITHOUT_CALLBACK", "MALIGNANT")
LESION_KINDS: tuple[str, ...] = ("mass", "calcification")

# Smooth fields (outline, glandular texture) are computed on at most this many rows and then
# upsampled: they carry no detail finer than ~1 mm, and it keeps a 4000-row image in seconds.
_COARSE_ROWS = 320
# Calcifications and spicules are drawn at full resolution unless their box is larger than this.
_MAX_LESION_BOX = 384

# Attenuation units: background 0, fat ~0.3, glandular tissue ~0.55, calcifications up to ~1.5.
_FAT = 0.30
_GLAND = 0.26
_SKIN = 0.10
_MUSCLE = 0.55
_ATTENUATION_FULL_SCALE = 1.15
# How much of a mass's contrast dense glandular tissue takes away (masking).
_MASKING = 0.3
_DENSITY_PRIOR = (0.12, 0.40, 0.36, 0.12)  # BI-RADS a-d in a screening population
_GLAND_FRACTION_BY_DENSITY = {1: 0.10, 2: 0.28, 3: 0.52, 4: 0.78}
_MASS_CONTRAST_BY_SUBTLETY = {1: 0.17, 2: 0.25, 3: 0.35, 4: 0.45, 5: 0.56}
_CALC_CONTRAST_BY_SUBTLETY = {1: 0.80, 2: 1.05, 3: 1.30, 4: 1.55, 5: 1.80}
# Mass edge sharpness (in units of the mass radius) by margin, and outline harmonics by shape.
_MASS_EDGE_WIDTH = {"CIRCUMSCRIBED": 0.04, "OBSCURED": 0.08, "MICROLOBULATED": 0.06,
                    "ILL_DEFINED": 0.22, "SPICULATED": 0.10}
_MASS_HARMONICS: dict[str, tuple[int, ...]] = {
    "ROUND": (), "OVAL": (), "LOBULATED": (3, 4, 5), "IRREGULAR": tuple(range(2, 10)),
    "ARCHITECTURAL_DISTORTION": (2, 3)}
_MICROLOBULES = (10, 12, 14)
_PECTORAL_EDGE = 0.012  # softness of the muscle border, as a fraction of the muscle size


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's detector and image processing turn tissue into stored pixel values.

    The pixel fields make sites look different to a model; `manufacturer`, `model` and
    `software_version` identify the device in DICOM; `rle_lossless` and `rescale` describe
    how its export writes the file.
    """

    manufacturer: str
    model: str
    software_version: str
    bits_stored: int
    photometric: str  # "MONOCHROME2", or "MONOCHROME1": inverted, high stored value = dark
    response: str  # presentation curve: "gamma" or "log"
    response_param: float  # gamma exponent, or strength of the log curve
    noise: float  # quantum noise std as a fraction of the attenuation full scale
    blur_px: float  # detector unsharpness as a gaussian sigma in pixels
    background: float  # stored level of air as a fraction of full scale (before inversion)
    rle_lossless: bool
    rescale: bool  # writes an identity RescaleSlope/Intercept as some vendors do
    kvp_range: tuple[float, float]

    @property
    def max_value(self) -> int:
        return (1 << self.bits_stored) - 1


SCANNER_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile("Aurora Medical Imaging", "Lumina DR 3000", "LDR 4.2.1", 12, "MONOCHROME2",
                   "gamma", 0.85, 0.010, 0.5, 0.02, False, False, (26.0, 31.0)),
    ScannerProfile("Borealis Healthcare", "Senovista 2", "SV2-1.9.0", 14, "MONOCHROME1",
                   "log", 5.0, 0.016, 0.8, 0.04, False, True, (28.0, 34.0)),
    ScannerProfile("Cygnus X-Ray", "MammoVue 14", "MV 7.0.3", 12, "MONOCHROME2",
                   "gamma", 1.30, 0.007, 0.35, 0.00, True, True, (25.0, 30.0)),
    ScannerProfile("Delphi Diagnostics", "DRX Mammo", "2.11", 14, "MONOCHROME2",
                   "gamma", 1.00, 0.020, 1.0, 0.06, False, False, (27.0, 33.0)),
)

# Image-level share of (normal, benign, malignant) per site, cycled over sites: label skew.
SITE_CLASS_PRIORS: tuple[tuple[float, float, float], ...] = (
    (0.45, 0.35, 0.20),
    (0.30, 0.20, 0.50),
    (0.40, 0.50, 0.10),
    (0.55, 0.15, 0.30),
)


def scanner_for_site(site_index: int) -> ScannerProfile:
    """The scanner of the site at 0-based `site_index`; profiles repeat after four sites."""
    return SCANNER_PROFILES[site_index % len(SCANNER_PROFILES)]


def site_class_priors(site_index: int) -> tuple[float, float, float]:
    """Image-level (normal, benign, malignant) shares of a site: label skew between sites."""
    return SITE_CLASS_PRIORS[site_index % len(SITE_CLASS_PRIORS)]


def image_shape(size: int) -> tuple[int, int]:
    """(rows, columns) of an image with `size` rows: portrait, columns = round(0.8 * rows)."""
    return size, round(COLUMN_RATIO * size)


def pixel_spacing_mm(size: int) -> float:
    """Millimetres per pixel (square pixels) of an image with `size` rows."""
    return FIELD_HEIGHT_MM / size


@dataclass(frozen=True)
class Breast:
    """One breast of one patient: what its CC and MLO views have in common."""

    laterality: str  # "L" or "R"
    density: int  # BI-RADS 1-4 (a fatty ... d extremely dense)
    extent: float  # 0-1: size of the compressed breast within the detector
    seed: int


@dataclass(frozen=True)
class Lesion:
    """One abnormality, described in CBIS-DDSM's vocabulary; drawn in every view of its breast.

    For a mass `shape`/`margins` are the mass shape and margins; for a calcification they are
    the calc type and calc distribution. The position is 3-D so the two views agree: `depth`
    (0 chest wall - 1 nipple) is shared, CC shows `lateral`, MLO shows `vertical` (both -1..1).
    """

    kind: str  # one of LESION_KINDS
    pathology: str  # one of PATHOLOGIES
    shape: str
    margins: str
    subtlety: int  # 1 (subtle) - 5 (obvious); sets the rendered contrast
    assessment: int  # BI-RADS 0-5 given by the reader
    size_mm: float  # mass diameter or calcification cluster extent
    depth: float
    lateral: float
    vertical: float
    seed: int

    @property
    def label(self) -> int:
        return MALIGNANT if self.pathology == "MALIGNANT" else BENIGN


@dataclass(frozen=True)
class ImageSpec:
    """Everything that decides one image's pixels, given a scanner and a size."""

    breast: Breast
    view: str  # "CC" or "MLO"
    lesions: tuple[Lesion, ...]
    seed: int

    @property
    def label(self) -> int:
        """Most severe pathology over the lesions (normal when there are none)."""
        return max((lesion.label for lesion in self.lesions), default=NORMAL)


@dataclass(frozen=True)
class SyntheticImage:
    """Rendered pixels and ground truth of one image.

    `pixels` are stored values as the scanner writes them (its bit depth and photometric
    interpretation, already mirrored for laterality). `window` is the (center, width) VOI
    window in stored units. `lesion_masks` has one boolean mask per lesion of the spec.
    """

    pixels: np.ndarray
    window: tuple[float, float]
    lesion_masks: tuple[np.ndarray, ...]
    breast_mask: np.ndarray
    pectoral_mask: np.ndarray


@dataclass(frozen=True)
class PatientExam:
    """One patient's screening exam: 1-4 images of one or both breasts."""

    patient_number: int
    split: str  # "train" or "test"
    images: tuple[ImageSpec, ...]


# ---------------------------------------------------------------------------------------------
# Sampling what to draw
# ---------------------------------------------------------------------------------------------


def sample_breast(laterality: str, rng: np.random.Generator, density: int | None = None) -> Breast:
    """A breast with a realistic density mix (mostly b and c) unless `density` is given."""
    if density is None:
        density = int(rng.choice([1, 2, 3, 4], p=_DENSITY_PRIOR))
    return Breast(laterality, density, float(rng.uniform(0.15, 0.95)), int(rng.integers(2**62)))


def sample_lesion(pathology: str, kind: str, rng: np.random.Generator) -> Lesion:
    """A lesion whose morphology, size and reader assessment fit its pathology."""
    if pathology not in PATHOLOGIES:
        raise DataError(f"pathology {pathology!r} is not one of {PATHOLOGIES}")
    if kind not in LESION_KINDS:
        raise DataError(f"lesion kind {kind!r} is not one of {LESION_KINDS}")
    malignant = pathology == "MALIGNANT"
    if kind == "mass":
        shape, margins = _sample_mass_morphology(malignant, rng)
        size_mm = float(np.clip(rng.lognormal(math.log(18.0 if malignant else 14.0), 0.35), 6, 45))
    else:
        shape, margins = _sample_calc_morphology(malignant, rng)
        size_mm = float(np.clip(rng.lognormal(math.log(12.0), 0.35), 5, 35))
        if margins in ("SEGMENTAL", "REGIONAL", "DIFFUSELY_SCATTERED"):
            size_mm *= 1.8
    return Lesion(
        kind=kind,
        pathology=pathology,
        shape=shape,
        margins=margins,
        subtlety=int(rng.choice([1, 2, 3, 4, 5], p=[0.08, 0.17, 0.25, 0.25, 0.25])),
        assessment=_sample_assessment(pathology, rng),
        size_mm=size_mm,
        depth=float(rng.uniform(0.25, 0.75)),
        lateral=float(rng.uniform(-0.65, 0.65)),
        vertical=float(rng.uniform(-0.55, 0.65)),
        seed=int(rng.integers(2**62)),
    )


def _sample_mass_morphology(malignant: bool, rng: np.random.Generator) -> tuple[str, str]:
    if malignant:
        shape = str(rng.choice(["IRREGULAR", "ARCHITECTURAL_DISTORTION", "LOBULATED"], p=[0.7, 0.15, 0.15]))
        margins = str(rng.choice(["SPICULATED", "ILL_DEFINED", "MICROLOBULATED"], p=[0.55, 0.35, 0.10]))
        return shape, "SPICULATED" if shape == "ARCHITECTURAL_DISTORTION" else margins
    shape = str(rng.choice(["OVAL", "ROUND", "LOBULATED"], p=[0.45, 0.35, 0.20]))
    return shape, str(rng.choice(["CIRCUMSCRIBED", "OBSCURED"], p=[0.75, 0.25]))


def _sample_calc_morphology(malignant: bool, rng: np.random.Generator) -> tuple[str, str]:
    if malignant:
        calc_type = str(rng.choice(["PLEOMORPHIC", "FINE_LINEAR_BRANCHING", "AMORPHOUS"], p=[0.6, 0.25, 0.15]))
        return calc_type, str(rng.choice(["CLUSTERED", "LINEAR", "SEGMENTAL"], p=[0.65, 0.2, 0.15]))
    calc_type = str(rng.choice(["COARSE", "LARGE_RODLIKE", "ROUND_AND_REGULAR", "PUNCTATE"], p=[0.35, 0.2, 0.3, 0.15]))
    return calc_type, str(rng.choice(["CLUSTERED", "REGIONAL", "DIFFUSELY_SCATTERED"], p=[0.5, 0.3, 0.2]))


def _sample_assessment(pathology: str, rng: np.random.Generator) -> int:
    """BI-RADS assessment consistent with the pathology (0 = needs more imaging, any pathology)."""
    if pathology == "MALIGNANT":
        return int(rng.choice([0, 4, 5], p=[0.05, 0.55, 0.40]))
    if pathology == "BENIGN":
        return int(rng.choice([0, 2, 3, 4], p=[0.05, 0.2, 0.3, 0.45]))
    return int(rng.choice([2, 3], p=[0.6, 0.4]))


def _sample_benign_pathology(kind: str, rng: np.random.Generator) -> str:
    callback_free = 0.35 if kind == "calcification" else 0.1
    return "BENIGN_WITHOUT_CALLBACK" if rng.random() < callback_free else "BENIGN"


def sample_lesions(label: int, rng: np.random.Generator) -> tuple[Lesion, ...]:
    """The lesions of an abnormal breast of class `label`: one, sometimes two of the same kind.

    Two abnormalities on one image share their kind (both masses or both calcifications), so
    the image has a single CBIS-DDSM folder with abnormality ids 1 and 2.
    """
    if label == NORMAL:
        return ()
    kind = "mass" if rng.random() < 0.55 else "calcification"
    first = "MALIGNANT" if label == MALIGNANT else _sample_benign_pathology(kind, rng)
    lesions = [sample_lesion(first, kind, rng)]
    if rng.random() < 0.15:
        second = "MALIGNANT" if label == MALIGNANT and rng.random() < 0.5 else _sample_benign_pathology(kind, rng)
        lesions.append(sample_lesion(second, kind, rng))
    return tuple(lesions)


def plan_site(site_index: int, n_images: int, *, seed: int, test_fraction: float,
              first_patient_number: int = 1) -> tuple[PatientExam, ...]:
    """The exams of one site: `n_images` images in total, patients numbered from `first_patient_number`.

    Image-level class counts follow the site's priors exactly (largest remainder), so even a
    tiny site is skewed the way its priors say. An abnormal patient has the lesions in one or
    both views of the affected breast, and sometimes the other, normal, breast imaged too;
    normal patients have 1-4 images. Test patients are `round(test_fraction * n_patients)`
    patients chosen at random: the split is by patient.
    """
    rng = np.random.default_rng([seed, site_index, 0x51A7])
    remaining = dict(zip((NORMAL, BENIGN, MALIGNANT), _class_counts(site_class_priors(site_index), n_images),
                         strict=True))
    exams = []
    while remaining[BENIGN] + remaining[MALIGNANT] > 0:
        finding = BENIGN if rng.random() < remaining[BENIGN] / (remaining[BENIGN] + remaining[MALIGNANT]) else MALIGNANT
        n_affected = min(2, remaining[finding])
        n_other = min(2, remaining[NORMAL]) if rng.random() < 0.3 else 0
        remaining[finding] -= n_affected
        remaining[NORMAL] -= n_other
        exams.append(_sample_exam(finding, n_affected, n_other, rng))
    while remaining[NORMAL] > 0:
        n_images_exam = min(remaining[NORMAL], int(rng.choice([2, 3, 4], p=[0.3, 0.1, 0.6])))
        remaining[NORMAL] -= n_images_exam
        exams.append(_sample_exam(NORMAL, min(2, n_images_exam), max(0, n_images_exam - 2), rng))
    order = rng.permutation(len(exams))
    test = set(rng.choice(len(exams), size=round(test_fraction * len(exams)), replace=False).tolist())
    return tuple(PatientExam(first_patient_number + position, "test" if position in test else "train",
                             exams[index])
                 for position, index in enumerate(order.tolist()))


def _class_counts(priors: tuple[float, ...], total: int) -> list[int]:
    """Split `total` in proportion to `priors`, rounding by largest remainder."""
    shares = np.asarray(priors) * total
    counts = np.floor(shares).astype(int)
    for index in np.argsort(-(shares - counts), kind="stable")[:total - counts.sum()]:
        counts[index] += 1
    return counts.tolist()


def _sample_exam(finding: int, n_affected: int, n_other: int, rng: np.random.Generator) -> tuple[ImageSpec, ...]:
    """`n_affected` views (1-2) of the breast with the finding and `n_other` views (0-2) of the
    other, normal, breast, in hanging-protocol order (R CC, L CC, R MLO, L MLO)."""
    affected = str(rng.choice(LATERALITIES))
    other = "R" if affected == "L" else "L"
    density = int(rng.choice([1, 2, 3, 4], p=_DENSITY_PRIOR))  # both breasts of a patient alike
    breasts = {side: sample_breast(side, rng, density) for side in LATERALITIES}
    lesions = {affected: sample_lesions(finding, rng), other: ()}
    views = [(affected, view) for view in _views(n_affected, rng)] + [(other, view) for view in _views(n_other, rng)]
    views.sort(key=lambda side_view: (VIEWS.index(side_view[1]), side_view[0] != "R"))
    return tuple(ImageSpec(breasts[side], view, lesions[side], int(rng.integers(2**62))) for side, view in views)


def _views(count: int, rng: np.random.Generator) -> list[str]:
    return list(VIEWS) if count == 2 else [str(rng.choice(VIEWS))] * count


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outline:
    """Breast outline of one view in canonical orientation, in full-resolution pixels."""

    depth: float  # chest wall to nipple
    half_height: float
    center_row: float
    nipple_radius: float
    pectoral: tuple[float, float] | None  # (width along top edge, height along chest wall), MLO


@dataclass(frozen=True)
class _Anatomy:
    """Smooth lesion-free fields on the coarse grid (see `_coarse_axes`).

    `radius` < 1 inside the breast and `pectoral_edge` > 0 inside the muscle: both are smooth,
    so thresholding them after upsampling gives sharp outlines. `tissue` is the attenuation
    of fat, gland and muscle before the skin line; `gland` is the fibroglandular fraction.
    """

    radius: np.ndarray
    pectoral_edge: np.ndarray | None
    tissue: np.ndarray
    gland: np.ndarray


def render_image(spec: ImageSpec, scanner: ScannerProfile, size: int, *, lesion_contrast: float = 1.0
                 ) -> SyntheticImage:
    """Draw one mammogram of `size` rows as `scanner` would store it.

    `lesion_contrast` scales every lesion's contrast (1 = the calibrated default): the
    difficulty knob for experiments that need an easier or harder task.
    Deterministic: the same spec, scanner, size and contrast give identical pixels.
    """
    if spec.view not in VIEWS:
        raise DataError(f"view {spec.view!r} is not one of {VIEWS}")
    if spec.breast.laterality not in LATERALITIES:
        raise DataError(f"laterality {spec.breast.laterality!r} is not one of {LATERALITIES}")
    shape = image_shape(size)
    spacing = pixel_spacing_mm(size)
    rng = np.random.default_rng([spec.seed, 0xB0D1])
    outline = _view_outline(spec.breast, spec.view, shape, rng)
    anatomy = _anatomy(spec.breast, spec.view, outline, shape)
    attenuation, breast_mask, pectoral_mask = _tissue_attenuation(anatomy, outline, shape, spacing)
    masks = tuple(_paint_lesion(attenuation, anatomy.gland, lesion, spec.view, outline, spacing, lesion_contrast)
                  for lesion in spec.lesions)
    pixels, window = _acquire(attenuation, breast_mask, scanner, rng)
    orient = np.fliplr if spec.breast.laterality == "R" else np.asarray
    return SyntheticImage(
        pixels=np.ascontiguousarray(orient(pixels)),
        window=window,
        lesion_masks=tuple(np.ascontiguousarray(orient(mask)) for mask in masks),
        breast_mask=np.ascontiguousarray(orient(breast_mask)),
        pectoral_mask=np.ascontiguousarray(orient(pectoral_mask)),
    )


def synthesize_image(label: int, *, size: int = 256, view: str = "CC", laterality: str = "L",
                     density: int | None = None, site_index: int = 0, seed: int = 0
                     ) -> tuple[ImageSpec, SyntheticImage]:
    """One image of class `label` (0 normal, 1 benign, 2 malignant) without writing any file.

    For tests and for code that wants pixels and lesion masks directly; the pixels are those
    of site `site_index`'s scanner.
    """
    if label not in (NORMAL, BENIGN, MALIGNANT):
        raise DataError(f"label {label!r} is not one of 0 (normal), 1 (benign), 2 (malignant)")
    if density is not None and density not in _GLAND_FRACTION_BY_DENSITY:
        raise DataError(f"density {density!r} is not a BI-RADS density 1-4")
    rng = np.random.default_rng([seed, label, 0x1A6E])
    spec = ImageSpec(sample_breast(laterality, rng, density), view, sample_lesions(label, rng),
                     int(rng.integers(2**62)))
    return spec, render_image(spec, scanner_for_site(site_index), size)


def _view_outline(breast: Breast, view: str, shape: tuple[int, int], rng: np.random.Generator) -> _Outline:
    """Outline sizes; kept clear of the upper anterior corner, where burned-in text goes."""
    rows, cols = shape
    depth = cols * min(0.82, (0.56 + 0.26 * breast.extent) * rng.uniform(0.95, 1.03))
    if view == "CC":
        return _Outline(depth, rows * (0.33 + 0.11 * breast.extent), rows * rng.uniform(0.48, 0.52),
                        rows * 0.025, None)
    pectoral = (cols * rng.uniform(0.22, 0.40), rows * rng.uniform(0.38, 0.65))
    return _Outline(depth, rows * (0.44 + 0.10 * breast.extent), rows * rng.uniform(0.55, 0.58),
                    rows * 0.025, pectoral)


def _coarse_axes(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates (full-resolution pixels) of the coarse grid."""
    rows, cols = shape
    coarse_rows = min(rows, _COARSE_ROWS)
    coarse_cols = min(cols, round(coarse_rows * cols / rows))
    return (np.linspace(0, rows - 1, coarse_rows, dtype=np.float32)[:, None],
            np.linspace(0, cols - 1, coarse_cols, dtype=np.float32)[None, :])


def _interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation from `n_in` to `n_out` samples, end points aligned, as a matrix."""
    position = np.linspace(0, n_in - 1, n_out)
    lower = np.minimum(np.floor(position).astype(np.intp), n_in - 2)
    fraction = (position - lower).astype(np.float32)
    matrix = np.zeros((n_out, n_in), dtype=np.float32)
    matrix[np.arange(n_out), lower] = 1 - fraction
    matrix[np.arange(n_out), lower + 1] += fraction
    return matrix


def _upsample(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with corners aligned (matching `np.linspace` sampling of coarse grids).

    Two small matrix products: several times faster than `ndimage.zoom` on 4000-row images.
    """
    if field.shape == shape:
        return field
    return _interpolation_matrix(shape[0], field.shape[0]) @ field @ _interpolation_matrix(shape[1], field.shape[1]).T


def _anatomy(breast: Breast, view: str, outline: _Outline, shape: tuple[int, int]) -> _Anatomy:
    """The lesion-free breast of one view on the coarse grid."""
    rng = np.random.default_rng([breast.seed, VIEWS.index(view)])
    y, x = _coarse_axes(shape)
    radius = _outline_radius(y, x, outline, rng)
    coarse_spacing_mm = FIELD_HEIGHT_MM / y.shape[0]
    gland = _gland_fraction(x, radius, breast.density, outline, coarse_spacing_mm, rng)
    thickness = np.clip((1.0 - radius) / 0.12, 0.0, 1.0) ** 0.6  # compression rolls off at the edge
    tissue = thickness * (_FAT + _GLAND * gland)
    if outline.pectoral is None:
        return _Anatomy(radius, None, tissue, gland)
    pectoral_edge = _pectoral_edge(y, x, outline)
    muscle = expit(pectoral_edge / _PECTORAL_EDGE)
    return _Anatomy(radius, pectoral_edge, tissue * (1 - muscle) + _MUSCLE * muscle, gland * (1 - muscle))


def _outline_radius(y: np.ndarray, x: np.ndarray, outline: _Outline, rng: np.random.Generator) -> np.ndarray:
    """Normalised elliptical radius with a gently irregular outline and a nipple bump."""
    dy = (y - outline.center_row) / outline.half_height
    dx = x / outline.depth
    angle = np.arctan2(dy, dx)
    wobble = sum(rng.uniform(0.0, 0.025) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    radius = np.sqrt(dx**2 + dy**2) / (1.0 + wobble)
    # The nipple pushes the outline out by `nipple_radius` but stays thin (radius >= 0.97).
    nipple = 0.97 + 0.03 * np.hypot(y - outline.center_row, x - outline.depth) / outline.nipple_radius
    return np.minimum(radius, nipple).astype(np.float32)


def _pectoral_edge(y: np.ndarray, x: np.ndarray, outline: _Outline) -> np.ndarray:
    """Signed field, > 0 inside the pectoral muscle: a slightly convex triangle in the upper
    chest-wall corner, in units of the muscle's size."""
    width, height = outline.pectoral
    return (1.0 - ((x / width) ** 1.4 + (y / height) ** 1.4) ** (1 / 1.4)).astype(np.float32)


def _gland_fraction(x: np.ndarray, radius: np.ndarray, density: int, outline: _Outline,
                    coarse_spacing_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Fibroglandular fraction: power-law texture streaked toward the nipple, thresholded so
    that its mean matches the BI-RADS density, fading into subcutaneous and retroglandular fat."""
    texture = np.zeros(radius.shape, dtype=np.float32)
    for scale_mm, weight in ((1.0, 0.45), (3.0, 0.7), (8.0, 1.0)):
        noise = rng.standard_normal(radius.shape, dtype=np.float32)
        sigma = (scale_mm / coarse_spacing_mm * 0.6, scale_mm / coarse_spacing_mm * 1.6)
        layer = ndimage.gaussian_filter(noise, sigma, mode="reflect")
        texture += weight * layer / (layer.std() + 1e-6)
    subcutaneous = np.clip((0.93 - radius) / 0.35, 0.0, 1.0)
    retroglandular = np.clip(x / (0.25 * outline.depth), 0.0, 1.0)
    envelope = subcutaneous * retroglandular**2 * (3 - 2 * retroglandular)
    inside = envelope > 0.5
    threshold = np.quantile(texture[inside], 1.0 - _GLAND_FRACTION_BY_DENSITY[density]) if inside.any() else 0.0
    spread = texture.std() * 0.45 + 1e-6
    return (envelope * expit((texture - threshold) / spread)).astype(np.float32)


def _tissue_attenuation(anatomy: _Anatomy, outline: _Outline, shape: tuple[int, int], spacing: float
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(attenuation, breast mask, pectoral mask) at full resolution, adding a ~2 mm skin line."""
    radius = _upsample(anatomy.radius, shape)
    if anatomy.pectoral_edge is None:
        pectoral_mask = np.zeros(shape, dtype=bool)
    else:
        pectoral_mask = _upsample(anatomy.pectoral_edge, shape) > 0
    breast_mask = (radius < 1.0) | pectoral_mask
    skin_width = 2.0 / (outline.depth * spacing)  # in radius units
    skin = np.clip(1.0 - np.abs(1.0 - radius) / skin_width, 0.0, 1.0)
    skin[pectoral_mask] = 0.0  # the outline's ellipse runs on under the muscle: no skin there
    attenuation = _upsample(anatomy.tissue, shape) + _SKIN * skin
    attenuation *= breast_mask
    return attenuation, breast_mask, pectoral_mask


def _lesion_center(lesion: Lesion, view: str, outline: _Outline, rng: np.random.Generator) -> tuple[float, float]:
    """Row and column of a lesion in canonical orientation, below the pectoral muscle."""
    col = outline.depth * lesion.depth
    reach = outline.half_height * math.sqrt(max(1.0 - lesion.depth**2, 0.05)) * 0.75
    offset = lesion.lateral if view == "CC" else lesion.vertical
    row = outline.center_row + reach * (offset + rng.uniform(-0.05, 0.05))
    if outline.pectoral is not None:
        width, height = outline.pectoral
        below_muscle = height * max(0.0, 1.0 - col / width) + 0.06 * outline.half_height
        row = max(row, below_muscle)
    return row, col


def _lesion_box(center: tuple[float, float], half_extent: float, shape: tuple[int, int]
                ) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Slices of the image around a lesion and the row/column offsets (pixels) from its center."""
    r0, r1 = max(0, int(center[0] - half_extent)), min(shape[0], int(center[0] + half_extent) + 2)
    c0, c1 = max(0, int(center[1] - half_extent)), min(shape[1], int(center[1] + half_extent) + 2)
    dy = np.arange(r0, r1, dtype=np.float32)[:, None] - np.float32(center[0])
    dx = np.arange(c0, c1, dtype=np.float32)[None, :] - np.float32(center[1])
    return slice(r0, r1), slice(c0, c1), dy, dx


def _paint_lesion(attenuation: np.ndarray, gland: np.ndarray, lesion: Lesion, view: str,
                  outline: _Outline, spacing: float, contrast_scale: float) -> np.ndarray:
    """Add one lesion to `attenuation` in place; return its ROI mask.

    The mask always holds at least the pixel at the lesion's center: on thumbnails a lesion
    smaller than a pixel still has a non-empty ROI.
    """
    rng = np.random.default_rng([lesion.seed, VIEWS.index(view)])
    center = _lesion_center(lesion, view, outline, rng)
    if lesion.kind == "mass":
        mask = _paint_mass(attenuation, gland, lesion, center, spacing, rng, contrast_scale)
    else:
        mask = _paint_calcifications(attenuation, lesion, center, spacing, rng, contrast_scale)
    mask[min(round(center[0]), mask.shape[0] - 1), min(round(center[1]), mask.shape[1] - 1)] = True
    return mask


def _paint_mass(attenuation: np.ndarray, gland: np.ndarray, lesion: Lesion, center: tuple[float, float],
                spacing: float, rng: np.random.Generator, contrast_scale: float) -> np.ndarray:
    """A mass: warped ellipse with a margin-dependent edge, plus spicules when spiculated."""
    radius_mm = lesion.size_mm / 2
    spiculated = lesion.margins == "SPICULATED"
    reach_mm = radius_mm * (2.8 if spiculated else 1.3) + 2 * spacing
    rows, cols, dy, dx = _lesion_box(center, reach_mm / spacing, attenuation.shape)
    view_angle = rng.uniform(0, np.pi)
    contrast = _MASS_CONTRAST_BY_SUBTLETY[lesion.subtlety] * rng.uniform(0.85, 1.15) * contrast_scale
    distance, spicules = _coarse_then_full(
        lambda u, v, step: _mass_fields(u * spacing, v * spacing, step * spacing, lesion, radius_mm, view_angle),
        dy, dx)
    edge_width = _MASS_EDGE_WIDTH[lesion.margins]
    body = expit((1.0 - distance) / edge_width) * (0.75 + 0.25 * np.sqrt(np.clip(1 - distance**2, 0, 1)))
    core = 0.35 if lesion.shape == "ARCHITECTURAL_DISTORTION" else 1.0
    visible = 1.0 - _MASKING * _coarse_at(gland, attenuation.shape, rows, cols)
    attenuation[rows, cols] += contrast * visible * (core * body + spicules)
    mask = np.zeros(attenuation.shape, dtype=bool)
    mask[rows, cols] = distance < 1.0
    return mask


def _coarse_at(coarse: np.ndarray, shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    """Values of a coarse-grid field over the full-resolution box (rows, cols), bilinear."""
    row_scale = (coarse.shape[0] - 1) / max(shape[0] - 1, 1)
    col_scale = (coarse.shape[1] - 1) / max(shape[1] - 1, 1)
    coarse_rows = np.arange(rows.start, rows.stop) * row_scale
    coarse_cols = np.arange(cols.start, cols.stop) * col_scale
    grid = np.meshgrid(coarse_rows, coarse_cols, indexing="ij")
    return ndimage.map_coordinates(coarse, grid, order=1, mode="nearest").astype(np.float32)


def _mass_fields(u: np.ndarray, v: np.ndarray, sample_mm: float, lesion: Lesion, radius_mm: float,
                 view_angle: float) -> tuple[np.ndarray, np.ndarray]:
    """(distance, spicules) on mm offsets (u rows, v columns) sampled every `sample_mm`:
    distance < 1 inside the outline.

    The outline is seeded by the lesion alone, so both views show the same mass, rotated.
    """
    rng = np.random.default_rng([lesion.seed, 0x3A55])
    aspect = {"ROUND": 1.0, "OVAL": rng.uniform(1.3, 1.8)}.get(lesion.shape, rng.uniform(1.0, 1.4))
    harmonics = _MASS_HARMONICS[lesion.shape] + (_MICROLOBULES if lesion.margins == "MICROLOBULATED" else ())
    cos, sin = math.cos(view_angle), math.sin(view_angle)
    along, across = u * cos + v * sin, -u * sin + v * cos
    semi_major, semi_minor = radius_mm * math.sqrt(aspect), radius_mm / math.sqrt(aspect)
    angle = np.arctan2(across / semi_minor, along / semi_major)
    bumps = sum(rng.uniform(0.04, 0.10 if k < 6 else 0.05) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
                for k in harmonics)
    distance = np.hypot(along / semi_major, across / semi_minor) / (1.0 + bumps)
    if lesion.margins != "SPICULATED":
        return distance.astype(np.float32), np.zeros_like(distance, dtype=np.float32)
    return distance.astype(np.float32), _spicules(u, v, sample_mm, radius_mm, rng)


def _spicules(u: np.ndarray, v: np.ndarray, sample_mm: float, radius_mm: float, rng: np.random.Generator
              ) -> np.ndarray:
    """Thin tapering lines radiating from the mass center, max-combined. A line thinner than
    half a sample is widened to it and dimmed by the square root of the ratio (as calcifications
    are), so spicules fade at low resolution instead of aliasing into dots."""
    field = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=np.float32)
    for direction in rng.uniform(0, 2 * np.pi, size=int(rng.integers(8, 20))):
        length = radius_mm * rng.uniform(1.6, 2.7)
        true_width = rng.uniform(0.3, 0.7)
        width = max(true_width, 0.5 * sample_mm)
        along = u * math.sin(direction) + v * math.cos(direction)
        across = -u * math.cos(direction) + v * math.sin(direction)
        line = np.exp(-0.5 * (across / width) ** 2) * np.clip(1.0 - along / length, 0.0, 1.0) * (along > 0)
        np.maximum(field, math.sqrt(true_width / width) * line, out=field)
    return field


def _coarse_then_full(fields_of, dy: np.ndarray, dx: np.ndarray) -> tuple[np.ndarray, ...]:
    """Evaluate smooth fields `fields_of(dy, dx, step)` on pixel offsets (dy, dx), sampled every
    `step` pixels: 1 for small boxes, coarser (then upsampled) for large ones."""
    rows, cols = dy.shape[0], dx.shape[1]
    if max(rows, cols) <= _MAX_LESION_BOX:
        return fields_of(dy, dx, 1.0)
    step = max(rows, cols) / _MAX_LESION_BOX
    coarse_dy = np.linspace(dy[0, 0], dy[-1, 0], max(2, round(rows / step)), dtype=np.float32)[:, None]
    coarse_dx = np.linspace(dx[0, 0], dx[0, -1], max(2, round(cols / step)), dtype=np.float32)[None, :]
    return tuple(_upsample(field, (rows, cols)) for field in fields_of(coarse_dy, coarse_dx, step))


@dataclass(frozen=True)
class _Speck:
    """One calcification particle: offset from the cluster center, gaussian sigmas and angle (mm/rad)."""

    row_mm: float
    col_mm: float
    sigma_long_mm: float
    sigma_short_mm: float
    angle: float
    weight: float


def _paint_calcifications(attenuation: np.ndarray, lesion: Lesion, center: tuple[float, float], spacing: float,
                          rng: np.random.Generator, contrast_scale: float) -> np.ndarray:
    """A group of calcification particles; the ROI mask is the union of discs around them."""
    specks = _calc_specks(lesion, rng)
    contrast = _CALC_CONTRAST_BY_SUBTLETY[lesion.subtlety] * rng.uniform(0.85, 1.15) * contrast_scale
    mask = np.zeros(attenuation.shape, dtype=bool)
    mask_radius_mm = max(1.5, 0.12 * lesion.size_mm)
    for speck in specks:
        speck_center = (center[0] + speck.row_mm / spacing, center[1] + speck.col_mm / spacing)
        _add_speck(attenuation, speck, speck_center, contrast, spacing)
        rows, cols, dy, dx = _lesion_box(speck_center, mask_radius_mm / spacing + 1, attenuation.shape)
        mask[rows, cols] |= (dy**2 + dx**2) <= (mask_radius_mm / spacing) ** 2
    return mask


def _add_speck(attenuation: np.ndarray, speck: _Speck, center: tuple[float, float], contrast: float,
               spacing: float) -> None:
    """Add an anisotropic gaussian particle. A particle smaller than a pixel is widened to the
    pixel and dimmed by the square root of the area ratio: fine calcifications fade at low
    resolution, as in real downsampled mammograms, but (being very dense) not entirely."""
    sigma_long = max(speck.sigma_long_mm / spacing, 0.5)
    sigma_short = max(speck.sigma_short_mm / spacing, 0.5)
    preserved = (speck.sigma_long_mm * speck.sigma_short_mm) / (sigma_long * sigma_short * spacing**2)
    rows, cols, dy, dx = _lesion_box(center, 3 * sigma_long + 1, attenuation.shape)
    along = dy * math.sin(speck.angle) + dx * math.cos(speck.angle)
    across = -dy * math.cos(speck.angle) + dx * math.sin(speck.angle)
    blob = np.exp(-0.5 * ((along / sigma_long) ** 2 + (across / sigma_short) ** 2))
    attenuation[rows, cols] += contrast * speck.weight * min(preserved, 1.0) ** 0.5 * blob


def _calc_specks(lesion: Lesion, rng: np.random.Generator) -> list[_Speck]:
    """Particles of a calcification group, by calc type (size/shape) and distribution (layout)."""
    count, size_mm, elongation = {
        "PLEOMORPHIC": (rng.integers(10, 30), (0.12, 0.35), (1.0, 2.5)),
        "FINE_LINEAR_BRANCHING": (rng.integers(10, 25), (0.10, 0.25), (2.0, 4.0)),
        "AMORPHOUS": (rng.integers(12, 35), (0.10, 0.22), (1.0, 1.5)),
        "PUNCTATE": (rng.integers(4, 10), (0.15, 0.30), (1.0, 1.2)),
        "ROUND_AND_REGULAR": (rng.integers(3, 9), (0.40, 0.90), (1.0, 1.15)),
        "LARGE_RODLIKE": (rng.integers(2, 6), (0.40, 0.70), (4.0, 7.0)),
        "COARSE": (rng.integers(1, 4), (0.90, 1.80), (1.0, 1.6)),
    }[lesion.shape]
    positions = _calc_layout(lesion.margins, int(count), lesion.size_mm / 2, rng)
    specks = []
    for row_mm, col_mm in positions:
        sigma = rng.uniform(*size_mm)
        angle = rng.uniform(-0.4, 0.4) if lesion.shape == "LARGE_RODLIKE" else rng.uniform(0, np.pi)
        weight = rng.uniform(0.6, 1.0)
        specks.append(_Speck(row_mm, col_mm, sigma * rng.uniform(*elongation), sigma, angle, weight))
        if lesion.shape == "COARSE":  # popcorn: a clump of lobes around each coarse particle
            specks.extend(_Speck(row_mm + rng.normal(0, sigma), col_mm + rng.normal(0, sigma),
                                 sigma * 0.7, sigma * 0.5, rng.uniform(0, np.pi), weight)
                          for _ in range(int(rng.integers(3, 7))))
    return specks


def _calc_layout(distribution: str, count: int, radius_mm: float, rng: np.random.Generator) -> np.ndarray:
    """(count, 2) particle offsets in mm: a tight cluster, a line, a branching segment or a spread."""
    if distribution in ("LINEAR", "SEGMENTAL"):
        branches = 1 if distribution == "LINEAR" else 3
        direction = rng.uniform(-0.5, 0.5) + rng.uniform(-0.5, 0.5, size=branches)
        branch = rng.integers(0, branches, size=count)
        position = rng.uniform(-1.0, 1.0, size=count) * radius_mm
        jitter = rng.normal(0, 0.06 * radius_mm, size=(count, 2))
        return np.stack([position * np.sin(direction[branch]), position * np.cos(direction[branch])], axis=1) + jitter
    spread = {"CLUSTERED": 0.45, "REGIONAL": 0.7, "DIFFUSELY_SCATTERED": 1.0}[distribution]
    angle = rng.uniform(0, 2 * np.pi, size=count)
    distance = radius_mm * spread * np.sqrt(rng.uniform(0, 1, size=count))
    return np.stack([distance * np.sin(angle), distance * np.cos(angle)], axis=1)


def _acquire(attenuation: np.ndarray, breast_mask: np.ndarray, scanner: ScannerProfile,
             rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, float]]:
    """Detector blur, quantum noise and the vendor's presentation curve -> stored values + window.

    Works in place on full-resolution float32 buffers: this is most of a large image's cost.
    """
    signal = ndimage.gaussian_filter(attenuation, scanner.blur_px, mode="nearest", truncate=3.0)
    noise = rng.standard_normal(signal.shape, dtype=np.float32)
    noise_scale = np.maximum(signal, 0.03)  # quantum noise grows with the square root of the signal
    np.sqrt(noise_scale, out=noise_scale)
    noise *= noise_scale
    noise *= scanner.noise / math.sqrt(0.5)
    signal += noise
    signal *= 1.0 / _ATTENUATION_FULL_SCALE
    np.clip(signal, 0.0, 1.0, out=signal)
    if scanner.response == "gamma":
        np.power(signal, scanner.response_param, out=signal)
    else:
        signal *= scanner.response_param
        np.log1p(signal, out=signal)
        signal *= 1.0 / math.log1p(scanner.response_param)
    span = 0.94 - scanner.background  # headroom: only burned-in text reaches full scale
    signal *= span * scanner.max_value
    signal += scanner.background * scanner.max_value
    stored = np.rint(signal, out=signal).astype(np.uint16)
    window = _auto_window(stored, breast_mask)
    if scanner.photometric == "MONOCHROME1":
        stored = np.uint16(scanner.max_value) - stored
        window = (scanner.max_value - window[0], window[1])
    return stored, window


def _auto_window(stored: np.ndarray, breast_mask: np.ndarray) -> tuple[float, float]:
    """VOI window spanning the breast's stored values, as vendor auto-windowing does."""
    step = max(1, stored.shape[0] // 512)
    sample = stored[::step, ::step][breast_mask[::step, ::step]]
    if sample.size == 0:
        sample = stored[::step, ::step].ravel()
    low, high = np.percentile(sample, [0.5, 99.8])
    width = max(float(high - low), 2.0)
    return float(round((low + high) / 2)), float(round(width))

"""The record that every data source produces and every consumer reads.

Real CBIS-DDSM trees, our synthetic generator's output and the site folders of a
deployment all become lists of `ImageRecord`; nothing downstream knows which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

CLASS_NAMES: tuple[str, ...] = ("normal", "benign", "malignant")
NORMAL, BENIGN, MALIGNANT = 0, 1, 2


@dataclass(frozen=True)
class ImageRecord:
    """One full-field mammogram and its image-level label.

    `label` is the most severe pathology over all abnormalities of the image
    (malignant > benign > normal). `roi_mask_paths` holds one mask file per
    abnormality when the source has them (used by ROI-crop mode). `split` is the
    source's own train/test split ("train" or "test"), kept as published.
    """

    image_path: Path
    label: int
    split: str
    patient_id: str
    laterality: str | None = None  # "L" or "R"
    view: str | None = None  # "CC" or "MLO"
    abnormality_types: tuple[str, ...] = ()  # subset of ("mass", "calcification")
    roi_mask_paths: tuple[Path, ...] = ()
    breast_density: int | None = None  # BI-RADS 1-4 (a-d)
    site_id: str | None = None
    scanner: str | None = None  # manufacturer model, used by scanner-skew partitioning
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def label_name(self) -> str:
        return CLASS_NAMES[self.label]

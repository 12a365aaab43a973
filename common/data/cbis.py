"""CBIS-DDSM case descriptions turned into `ImageRecord`s, whichever way the images were fetched.

The case-description CSVs (`csv/{mass,calc}_case_description_{train,test}_set.csv`,
plus our `csv/normal_case_description_{train,test}_set.csv` extension with the mass
columns and pathology NORMAL) hold one row per abnormality. Their path cells
(`<Folder>/<StudyUID>/<SeriesUID>/000000.dcm`) are literal paths only in the
"direct" layout; the other two downloads store the same series elsewhere:

- "direct": the cell is a path under `<root>/CBIS-DDSM/` (or `<root>/`).
- "tcia": the NBIA Data Retriever tree
  `CBIS-DDSM/<Folder>/<date>-DDSM-[NA-]<n>/<k>.000000-<SeriesDescription>-<n>/1-1.dcm`,
  indexed by `<root>/metadata.csv` ("Series UID" -> "File Location") when present.
- "kaggle": the awsaf49 JPEG export, `csv/dicom_info.csv` mapping SeriesInstanceUID
  to `image_path` (`CBIS-DDSM/jpeg/<SeriesInstanceUID>/1-<n>.jpg`).

One image can carry several abnormalities (rows); its label is the most severe.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import NamedTuple, Protocol

from common.data.images import read_dicom_header
from common.data.records import BENIGN, MALIGNANT, NORMAL, ImageRecord
from common.errors import DataError

logger = logging.getLogger(__name__)

LAYOUTS = ("auto", "direct", "tcia", "kaggle")
TREE_FOLDER = "CBIS-DDSM"
FULL_MAMMOGRAM = "full mammogram images"
ROI_MASK = "ROI mask images"
PATHOLOGY_LABELS = {
    "BENIGN": BENIGN,
    "BENIGN_WITHOUT_CALLBACK": BENIGN,
    "MALIGNANT": MALIGNANT,
    "NORMAL": NORMAL,
}
LATERALITIES = {"LEFT": "L", "RIGHT": "R"}
VIEWS = {"CC": "CC", "MLO": "MLO"}
ABNORMALITY_TYPES = ("mass", "calcification")

# Column names after `_column_key`: CBIS spells the density column `breast_density`
# in the mass CSVs and `breast density` in the calc CSVs.
PATIENT_COLUMN = "patient id"
DENSITY_COLUMN = "breast density"
SIDE_COLUMN = "left or right breast"
VIEW_COLUMN = "image view"
PATHOLOGY_COLUMN = "pathology"
IMAGE_COLUMN = "image file path"
MASK_COLUMN = "roi mask file path"
REQUIRED_COLUMNS = (PATIENT_COLUMN, SIDE_COLUMN, VIEW_COLUMN, PATHOLOGY_COLUMN, IMAGE_COLUMN)


class CaseTable(NamedTuple):
    """One case-description CSV: its file name, what it describes and its split."""

    file_name: str
    abnormality_type: str | None
    split: str


CASE_TABLES = tuple(
    CaseTable(f"{prefix}_case_description_{split}_set.csv", abnormality_type, split)
    for prefix, abnormality_type in (("mass", "mass"), ("calc", "calcification"), ("normal", None))
    for split in ("train", "test")
)


@dataclass(frozen=True)
class CsvPath:
    """A path cell of a case CSV: `<Folder>/<StudyUID>/<SeriesUID>/<file>`."""

    text: str

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.text.replace("\\", "/").split("/"))

    @property
    def folder(self) -> str:
        return self.parts[0]

    @property
    def series_uid(self) -> str | None:
        return self.parts[-2] if len(self.parts) >= 3 else None


@dataclass(frozen=True)
class CaseRow:
    """One abnormality (or one normal image) as a case CSV describes it."""

    source: str  # "<csv path> data row <n>", for error messages
    split: str
    patient_id: str
    laterality: str | None
    view: str | None
    abnormality_type: str | None
    label: int
    breast_density: int | None
    image: CsvPath
    mask: CsvPath | None


class SeriesResolver(Protocol):
    """Finds the file a CSV path cell stands for in one on-disk layout."""

    def resolve(self, path: CsvPath, description: str) -> Path | None:
        """The file for `path`, whose series is described as `description`; None if absent."""


def load_cbis_ddsm(
    root: Path | str, layout: str = "auto", *, skip_missing: bool = False
) -> list[ImageRecord]:
    """Read a CBIS-DDSM tree (`root/csv/...` plus images) into one record per image.

    `layout` is one of LAYOUTS; "auto" detects it. A CSV row whose image (or ROI
    mask) is not on disk raises DataError naming the CSV, row and path, unless
    `skip_missing`: then the image (or just the mask) is dropped and the count logged.
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise DataError(f"unknown CBIS-DDSM layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    rows = read_case_rows(root)
    if layout == "auto":
        layout = detect_layout(root, [row.image for row in rows])
    resolver = RESOLVERS[layout](root)
    return _build_records(rows, resolver, f"{layout} layout under {root}", skip_missing)


def load_site_folders(
    root: Path | str, layout: str = "auto", *, skip_missing: bool = False
) -> dict[str, list[ImageRecord]]:
    """Read every site of a deployment: children `site-*/` or any holding a `csv/` folder.

    Each site folder is a CBIS-DDSM tree; its name becomes the records' `site_id`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: site root is not a directory")
    site_dirs = [
        child
        for child in sorted(root.iterdir())
        if child.is_dir() and (child.name.startswith("site-") or (child / "csv").is_dir())
    ]
    if not site_dirs:
        raise DataError(
            f"{root}: holds no site folders; expected subfolders named site-* "
            "or holding a csv/ folder"
        )
    return {
        site.name: [
            replace(record, site_id=site.name)
            for record in load_cbis_ddsm(site, layout, skip_missing=skip_missing)
        ]
        for site in site_dirs
    }


# How many CSV image cells `detect_layout` tries: one file missing (quarantined by
# de-identification, say) must not make a direct tree look like another layout.
_LAYOUT_PROBES = 32


def detect_layout(root: Path, probes: list[CsvPath]) -> str:
    """Which layout `root` is in, judged by its marker files and the first CSV path cells."""
    if (root / "csv" / "dicom_info.csv").is_file() and (root / "jpeg").is_dir():
        return "kaggle"
    direct = DirectResolver(root)
    if any(direct.resolve(probe, FULL_MAMMOGRAM) is not None for probe in probes[:_LAYOUT_PROBES]):
        return "direct"
    if (root / TREE_FOLDER).is_dir():
        return "tcia"
    raise DataError(
        f"{root}: cannot tell the CBIS-DDSM layout; expected csv/dicom_info.csv with jpeg/ "
        f"(kaggle), or a {TREE_FOLDER}/ folder holding the CSV paths (direct) or the "
        f"NBIA download tree (tcia)"
    )


def read_case_rows(root: Path) -> list[CaseRow]:
    """Every row of every case CSV present under `root/csv`, in file order."""
    tables = [(root / "csv" / table.file_name, table) for table in CASE_TABLES]
    present = [(path, table) for path, table in tables if path.is_file()]
    if not present:
        raise DataError(
            f"{root / 'csv'}: no case-description CSV found; expected any of "
            f"{', '.join(table.file_name for table in CASE_TABLES)}"
        )
    rows = [row for path, table in present for row in _read_case_csv(path, table)]
    if not rows:
        raise DataError(f"{root / 'csv'}: the case-description CSVs hold no rows")
    return rows


def _read_case_csv(path: Path, table: CaseTable) -> Iterator[CaseRow]:
    # utf-8-sig: some re-saved copies of the CBIS CSVs start with a byte-order mark.
    with path.open(newline="", encoding="utf-8-sig") as stream:
        reader = csv.reader(stream)
        header = [_column_key(name) for name in next(reader, [])]
        missing = [column for column in REQUIRED_COLUMNS if column not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
        for number, cells in enumerate(reader, start=1):
            if any(cell.strip() for cell in cells):
                yield _parse_row(dict(zip(header, cells)), table, f"{path} data row {number}")


def _column_key(name: str) -> str:
    """Header spelling made uniform: `breast_density` and ` Breast  density` read alike."""
    return " ".join(name.replace("_", " ").split()).lower()


def _parse_row(cells: dict[str, str], table: CaseTable, source: str) -> CaseRow:
    # Path cells in the published CSVs sometimes end in a newline; strip() clears it.
    patient_id = cells.get(PATIENT_COLUMN, "").strip()
    image_text = cells.get(IMAGE_COLUMN, "").strip()
    if not patient_id or not image_text:
        raise DataError(f"{source}: columns '{PATIENT_COLUMN}' and '{IMAGE_COLUMN}' must not be empty")
    mask_text = cells.get(MASK_COLUMN, "").strip()
    return CaseRow(
        source=source,
        split=table.split,
        patient_id=patient_id,
        laterality=_parse_choice(cells.get(SIDE_COLUMN, ""), LATERALITIES, SIDE_COLUMN, source),
        view=_parse_choice(cells.get(VIEW_COLUMN, ""), VIEWS, VIEW_COLUMN, source),
        abnormality_type=table.abnormality_type,
        label=_parse_label(cells.get(PATHOLOGY_COLUMN, ""), source),
        breast_density=_parse_density(cells.get(DENSITY_COLUMN, "")),
        image=CsvPath(image_text),
        mask=CsvPath(mask_text) if mask_text else None,
    )


def _parse_label(cell: str, source: str) -> int:
    pathology = cell.strip().upper()
    if pathology not in PATHOLOGY_LABELS:
        raise DataError(
            f"{source}: column '{PATHOLOGY_COLUMN}' is {pathology!r}; "
            f"valid: {', '.join(PATHOLOGY_LABELS)}"
        )
    return PATHOLOGY_LABELS[pathology]


def _parse_choice(cell: str, choices: dict[str, str], column: str, source: str) -> str | None:
    """A coded cell mapped through `choices`; blank is None (unknown), anything else an error."""
    value = cell.strip().upper()
    if not value:
        return None
    if value not in choices:
        raise DataError(f"{source}: column '{column}' is {value!r}; valid: {', '.join(choices)}")
    return choices[value]


def _parse_density(cell: str) -> int | None:
    """BI-RADS density 1-4; the published calc CSVs also hold 0 and blanks, read as unknown."""
    try:
        density = int(float(cell))
    except (ValueError, OverflowError):
        return None
    return density if 1 <= density <= 4 else None


def _build_records(
    rows: list[CaseRow], resolver: SeriesResolver, where: str, skip_missing: bool
) -> list[ImageRecord]:
    """Resolve every row's files and merge the rows of one image into one record."""
    abnormalities: dict[Path, list[tuple[CaseRow, Path | None]]] = {}
    skipped_images = skipped_masks = 0
    for row in rows:
        image = resolver.resolve(row.image, FULL_MAMMOGRAM)
        if image is None:
            _raise_missing(row, IMAGE_COLUMN, row.image, where, skip_missing)
            skipped_images += 1
            continue
        mask = resolver.resolve(row.mask, ROI_MASK) if row.mask else None
        if row.mask and mask is None:
            _raise_missing(row, MASK_COLUMN, row.mask, where, skip_missing)
            skipped_masks += 1
        abnormalities.setdefault(image, []).append((row, mask))
    if (skipped_images or skipped_masks) and _first_time((where, skipped_images, len(rows), skipped_masks)):
        logger.warning(
            "CBIS-DDSM %s: skipped %d of %d rows whose image is missing and %d ROI masks "
            "that are missing",
            where, skipped_images, len(rows), skipped_masks,
        )
    return [_image_record(image, entries) for image, entries in abnormalities.items()]


_REPORTED: set[tuple] = set()


def _first_time(report: tuple) -> bool:
    """Whether this process has not said `report` yet: a tree read three times warns once."""
    if report in _REPORTED:
        return False
    _REPORTED.add(report)
    return True


def _raise_missing(row: CaseRow, column: str, path: CsvPath, where: str, skip_missing: bool) -> None:
    if not skip_missing:
        raise DataError(
            f"{row.source}: column '{column}' names {path.text!r}, which is not found in the "
            f"{where}; pass skip_missing=True to leave such files out"
        )


def _image_record(image: Path, entries: list[tuple[CaseRow, Path | None]]) -> ImageRecord:
    rows = [row for row, _ in entries]
    first = rows[0]
    return ImageRecord(
        image_path=image,
        label=max(row.label for row in rows),
        split=first.split,
        patient_id=first.patient_id,
        laterality=first.laterality,
        view=first.view,
        abnormality_types=tuple(
            kind for kind in ABNORMALITY_TYPES if any(row.abnormality_type == kind for row in rows)
        ),
        roi_mask_paths=tuple(dict.fromkeys(mask for _, mask in entries if mask is not None)),
        breast_density=next((row.breast_density for row in rows if row.breast_density), None),
    )


class DirectResolver:
    """Path cells are literal paths under `root/CBIS-DDSM/` or `root/`."""

    def __init__(self, root: Path) -> None:
        self.bases = (root / TREE_FOLDER, root)

    def resolve(self, path: CsvPath, description: str) -> Path | None:
        for base in self.bases:
            candidate = base / path.text
            if candidate.is_file():
                return candidate
        return None


class TciaResolver:
    """The NBIA download tree, found by series UID through metadata.csv or the DICOM headers."""

    def __init__(self, root: Path) -> None:
        self.tree = root / TREE_FOLDER
        self.indexed = _read_nbia_metadata(root / "metadata.csv")
        self.walked: dict[str, dict[str, Path]] = {}

    def resolve(self, path: CsvPath, description: str) -> Path | None:
        series_dir = self.indexed.get(path.series_uid or "") or self._find_series_dir(path, description)
        return _largest_dicom(series_dir) if series_dir else None

    def _find_series_dir(self, path: CsvPath, description: str) -> Path | None:
        """Match the series UID in the folder's DICOM headers, else its one series so described."""
        series_dirs = sorted(d for d in (self.tree / path.folder).glob("*/*") if d.is_dir())
        if path.folder not in self.walked:
            self.walked[path.folder] = _series_uids(series_dirs)
        found = self.walked[path.folder].get(path.series_uid or "")
        if found:
            return found
        described = [d for d in series_dirs if _series_description(d.name) == description]
        return described[0] if len(described) == 1 else None


class KaggleResolver:
    """The awsaf49 JPEG export: `csv/dicom_info.csv` maps series UIDs to `jpeg/` files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.series = _read_dicom_info(root / "csv" / "dicom_info.csv")

    def resolve(self, path: CsvPath, description: str) -> Path | None:
        instances = self.series.get(path.series_uid or "", [])
        # Some rows lack SeriesDescription; then any instance of the series may serve.
        candidates = [i for i in instances if i.description == description] or instances
        if not candidates:
            return None
        image = self.root / _strip_tree_folder(max(candidates, key=lambda i: i.pixel_count).image_path)
        return image if image.is_file() else None


RESOLVERS: dict[str, Callable[[Path], SeriesResolver]] = {
    "direct": DirectResolver,
    "tcia": TciaResolver,
    "kaggle": KaggleResolver,
}


class JpegInstance(NamedTuple):
    """One row of the Kaggle export's dicom_info.csv."""

    image_path: str
    description: str
    pixel_count: int


def _read_dicom_info(path: Path) -> dict[str, list[JpegInstance]]:
    """Series UID -> the JPEG instances of that series, from dicom_info.csv."""
    required = ("image_path", "SeriesInstanceUID", "SeriesDescription")
    series: dict[str, list[JpegInstance]] = {}
    for cells in _read_index_csv(path, required):
        series.setdefault(cells["SeriesInstanceUID"].strip(), []).append(
            JpegInstance(
                image_path=cells["image_path"].strip(),
                description=cells["SeriesDescription"].strip(),
                pixel_count=_int_or_zero(cells.get("Rows")) * _int_or_zero(cells.get("Columns")),
            )
        )
    return series


def _read_nbia_metadata(path: Path) -> dict[str, Path]:
    """Series UID -> series folder, from the NBIA Data Retriever's metadata.csv (if any)."""
    if not path.is_file():
        return {}
    return {
        # "File Location" is relative to metadata.csv, "./CBIS-DDSM/..." (or ".\\" on Windows).
        cells["Series UID"].strip(): path.parent / cells["File Location"].strip().replace("\\", "/")
        for cells in _read_index_csv(path, ("Series UID", "File Location"))
    }


def _read_index_csv(path: Path, required: tuple[str, ...]) -> Iterator[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream)
        missing = [column for column in required if column not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
        yield from reader


def _int_or_zero(cell: str | None) -> int:
    try:
        return int(float(cell or ""))
    except (ValueError, OverflowError):
        return 0


def _strip_tree_folder(image_path: str) -> PurePosixPath:
    """`CBIS-DDSM/jpeg/<uid>/1-1.jpg` -> `jpeg/<uid>/1-1.jpg`, relative to the export's root."""
    relative = PurePosixPath(image_path.replace("\\", "/"))
    return relative.relative_to(TREE_FOLDER) if relative.parts[:1] == (TREE_FOLDER,) else relative


def _series_uids(series_dirs: list[Path]) -> dict[str, Path]:
    """SeriesInstanceUID (read from the first DICOM header) -> series folder."""
    found: dict[str, Path] = {}
    for series_dir in series_dirs:
        first = next(iter(sorted(series_dir.glob("*.dcm"))), None)
        if first is not None:
            uid = read_dicom_header(first, ["SeriesInstanceUID"]).get("SeriesInstanceUID")
            if uid:
                found[str(uid)] = series_dir
    return found


def _series_description(folder_name: str) -> str:
    """`1.000000-full mammogram images-24515` -> `full mammogram images` (NBIA folder naming)."""
    _, _, rest = folder_name.partition("-")
    return rest.rpartition("-")[0]


def _largest_dicom(series_dir: Path) -> Path | None:
    """The series' image with the most pixels.

    CBIS-DDSM keeps an abnormality's ROI mask and its cropped patch in one series,
    numbered inconsistently (1-1/1-2 against the CSV's 000000/000001); the mask has
    the full mammogram's size, the patch is small, so the largest image is the mask.
    A full-mammogram series holds a single image.
    """
    files = sorted(series_dir.glob("*.dcm"))
    if len(files) <= 1:
        return files[0] if files else None
    return max(files, key=_pixel_count)


def _pixel_count(path: Path) -> int:
    header = read_dicom_header(path, ["Rows", "Columns"])
    return int(header.get("Rows") or 0) * int(header.get("Columns") or 0)

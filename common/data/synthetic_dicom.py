"""Write a synthetic multi-site mammography data set as real DICOM files in the CBIS-DDSM layout.

Why: the CBIS-DDSM loader, the de-identifier and the federated sites must be exercised on files
that look like a hospital export (identifying metadata, private tags, burned-in text, an
inverted and a compressed scanner) without any real patient.

Layout under `out_dir` (paths inside the CSVs are relative to `site-XX/CBIS-DDSM/`, "/"-separated)::

    manifest.json
    site-01/csv/{mass,calc,normal}_case_description_{train,test}_set.csv
    site-01/CBIS-DDSM/<Mass|Calc|Normal>-<Training|Test>_P_00001_LEFT_CC/<study uid>/<series uid>/000000.dcm
    site-01/CBIS-DDSM/<same folder>_<abnormality id>/<study uid>/<series uid>/000000.dcm   ROI mask
    site-01/CBIS-DDSM/<same folder>_<abnormality id>/<study uid>/<series uid>/000001.dcm   lesion crop

Everything derives from `seed`: the same arguments give byte-identical files.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from tqdm import tqdm

from common.data.records import CLASS_NAMES
from common.data.synthetic import (
    ImageSpec,
    Lesion,
    PatientExam,
    ScannerProfile,
    SyntheticImage,
    image_shape,
    pixel_spacing_mm,
    plan_site,
    render_image,
    scanner_for_site,
    site_class_priors,
)
from common.errors import DataError

MASS_COLUMNS: tuple[str, ...] = (
    "patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
    "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
    "image file path", "cropped image file path", "ROI mask file path",
)
# The real CBIS-DDSM calc CSVs spell the density column with a space; kept for fidelity.
CALC_COLUMNS: tuple[str, ...] = (
    "patient_id", "breast density", "left or right breast", "image view", "abnormality id",
    "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
    "image file path", "cropped image file path", "ROI mask file path",
)
NORMAL_COLUMNS: tuple[str, ...] = MASS_COLUMNS
CSV_COLUMNS: dict[str, tuple[str, ...]] = {"mass": MASS_COLUMNS, "calc": CALC_COLUMNS, "normal": NORMAL_COLUMNS}
SPLIT_WORDS: dict[str, str] = {"train": "Training", "test": "Test"}
PRIVATE_CREATOR = "SYNTHMAMMO 1.0"
PRIVATE_GROUP = 0x0029

_FOLDER_PREFIX = {"mass": "Mass", "calc": "Calc", "normal": "Normal"}
_SIDE_WORDS = {"L": "LEFT", "R": "RIGHT"}
# SNOMED CT view codes (DICOM CID 4014).
_VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
# Patient Orientation of For Presentation mammograms (row direction \ column direction).
_PATIENT_ORIENTATION = {("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"],
                        ("L", "MLO"): ["A", "FR"], ("R", "MLO"): ["P", "FL"]}
_UID_NAMESPACE = uuid.UUID("6f1d3c52-8a51-4b8e-9d63-3f0c1e7a2b90")
_IMAGE_FILE = "000000.dcm"
_CROP_FILE = "000001.dcm"

_GIVEN_NAMES = ("MARIA", "ANNA", "ELENA", "SOFIA", "CLAIRE", "HELEN", "JUDITH", "MARTA", "INGRID",
                "ROSA", "LUCIA", "NORA", "GRACE", "IRENE", "TERESA", "AGNES", "LINDA", "PAULA",
                "HANNA", "ALICE", "BEATRIZ", "CARMEN", "DORA", "EVA", "FRIDA", "GLORIA")
_FAMILY_NAMES = ("HALVORSEN", "MORETTI", "KOWALSKA", "DUBOIS", "OKAFOR", "LINDQVIST", "GARCIA",
                 "NAKAMURA", "OBRIEN", "PETROVA", "SANTOS", "VARGA", "WEBER", "ZIELINSKA", "ABERNATHY",
                 "BRENNAN", "CASTILLO", "DELACROIX", "EKSTROM", "FONTAINE", "GALLAGHER", "HUSSAIN")
_INSTITUTIONS = (
    ("St. Brigid General Hospital", "14 Harbour Road, Port Elmsworth"),
    ("Riverside University Medical Center", "200 Mill Lane, Eastbrook"),
    ("Northgate Women's Health Clinic", "7 Cedar Avenue, Northgate"),
    ("Lakeview Regional Hospital", "3 Shore Drive, Lakeview"),
    ("Hollins Valley Cancer Centre", "88 Quarry Street, Hollins"),
    ("Marrow Bay Community Hospital", "51 Beacon Hill, Marrow Bay"),
)


@dataclass(frozen=True)
class SynthSummary:
    """What `synthesize_dataset` wrote.

    `counts[site_id][split][class_name]` is the number of full-field images (not CSV rows).
    """

    out_dir: Path
    sites: tuple[str, ...]
    counts: dict[str, dict[str, dict[str, int]]]
    manifest_path: Path

    @property
    def total_images(self) -> int:
        return sum(n for splits in self.counts.values() for classes in splits.values() for n in classes.values())


@dataclass(frozen=True)
class Institution:
    """The hospital a site's scanner belongs to: what its exports say about where they came from."""

    name: str
    address: str
    department: str
    station_name: str
    device_serial: str


@dataclass(frozen=True)
class FakePatient:
    """A fictitious patient. `name` is a DICOM person name ("FAMILY^GIVEN")."""

    name: str
    mrn: str
    other_id: str
    birth_date: dt.date


@dataclass(frozen=True)
class FakeStudy:
    """A fictitious screening study: the ordering and reading side of an exam."""

    started: dt.datetime
    accession_number: str
    study_id: str
    referring_physician: str
    performing_physician: str
    operator: str
    requested_procedure_id: str
    scheduled_step_id: str
    prior_study_uid: str


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def synthesize_dataset(out_dir: Path, *, sites: int = 3, per_site: int = 100, size: int = 256, seed: int = 0,
                       test_fraction: float = 0.2, burned_in_text: float = 0.3, lesion_contrast: float = 1.0,
                       progress: bool = False) -> SynthSummary:
    """Write `sites` sites of `per_site` mammograms each (`size` rows) under `out_dir`.

    `burned_in_text` is the probability that an image carries the patient's name, a date and a
    laterality marker in its pixels (then BurnedInAnnotation is YES). `lesion_contrast` scales
    every lesion's contrast (1 = calibrated default, in [0.25, 4]). `out_dir` must be new or
    empty, so no stale site can mix with this data set. Raises DataError on invalid arguments.
    """
    _validate_arguments(sites=sites, per_site=per_site, size=size, seed=seed,
                        test_fraction=test_fraction, burned_in_text=burned_in_text)
    if not 0.25 <= lesion_contrast <= 4.0:
        raise DataError(f"lesion_contrast={lesion_contrast!r} is invalid: must be a number in [0.25, 4]")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"out_dir {out_dir} exists and is not an empty directory; give a new or empty directory")
    site_ids = tuple(f"site-{index + 1:02d}" for index in range(sites))
    counts: dict[str, dict[str, dict[str, int]]] = {}
    site_manifests: dict[str, dict] = {}
    next_patient = 1
    with tqdm(total=sites * per_site, disable=not progress, desc="synthesizing", unit="image") as bar:
        for site_index, site_id in enumerate(site_ids):
            exams = plan_site(site_index, per_site, seed=seed, test_fraction=test_fraction,
                              first_patient_number=next_patient)
            next_patient += len(exams)
            writer = _SiteWriter(out_dir / site_id, site_index, seed=seed, size=size, per_site=per_site,
                                 burned_in_text=burned_in_text, lesion_contrast=lesion_contrast)
            counts[site_id] = writer.write(exams, bar)
            site_manifests[site_id] = _site_manifest(site_index, exams, counts[site_id])
    manifest_path = _write_manifest(out_dir, site_manifests, seed=seed, size=size, per_site=per_site,
                                    test_fraction=test_fraction, burned_in_text=burned_in_text,
                                    lesion_contrast=lesion_contrast)
    return SynthSummary(out_dir, site_ids, counts, manifest_path)


def _validate_arguments(*, sites: int, per_site: int, size: int, seed: int, test_fraction: float,
                        burned_in_text: float) -> None:
    """Raise DataError naming the first argument outside its valid range."""
    integer_ranges = {"sites": (sites, 1, None), "per_site": (per_site, 1, None),
                      "size": (size, 32, 6000), "seed": (seed, 0, None)}
    for name, (value, low, high) in integer_ranges.items():
        valid = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            raise DataError(f"{name}={value!r} is invalid: must be {valid}")
    for name, value in {"test_fraction": test_fraction, "burned_in_text": burned_in_text}.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise DataError(f"{name}={value!r} is invalid: must be a number in [0, 1]")


# ---------------------------------------------------------------------------------------------
# Fake identities (their own random streams: changing metadata never changes pixels)
# ---------------------------------------------------------------------------------------------


def site_institution(site_index: int, seed: int) -> Institution:
    """The fictitious hospital of a site."""
    rng = np.random.default_rng([seed, site_index, 0x1257])
    name, address = _INSTITUTIONS[site_index % len(_INSTITUTIONS)]
    return Institution(
        name=name,
        address=f"{address}, {int(rng.integers(1000, 9999))}",
        department="Breast Imaging",
        station_name=f"MAMMO{site_index + 1:02d}-{int(rng.integers(1, 9))}",
        device_serial=f"{int(rng.integers(10**7, 10**8))}",
    )


def sample_patient(rng: np.random.Generator, study_date: dt.date) -> FakePatient:
    """A fictitious patient aged 40-79 on `study_date`."""
    name = f"{rng.choice(_FAMILY_NAMES)}^{rng.choice(_GIVEN_NAMES)}"
    birth = study_date - dt.timedelta(days=int(rng.integers(40 * 365, 80 * 365)))
    return FakePatient(name=name, mrn=f"MRN{int(rng.integers(10**6, 10**7))}",
                       other_id=f"NHI-{int(rng.integers(10**8, 10**9))}", birth_date=birth)


def sample_study(rng: np.random.Generator, prior_study_uid: str) -> FakeStudy:
    """A fictitious screening study between 2014 and 2023, during opening hours."""
    day = dt.date(2014, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3650)))
    started = dt.datetime.combine(day, dt.time(int(rng.integers(7, 18)), int(rng.integers(0, 60)),
                                               int(rng.integers(0, 60))))
    return FakeStudy(
        started=started,
        accession_number=f"A{int(rng.integers(10**8, 10**9))}",
        study_id=f"{int(rng.integers(1000, 99999))}",
        referring_physician=_physician_name(rng),
        performing_physician=_physician_name(rng),
        operator=f"{rng.choice(_FAMILY_NAMES)}^{rng.choice(_GIVEN_NAMES)}",
        requested_procedure_id=f"RP{int(rng.integers(10**6, 10**7))}",
        scheduled_step_id=f"SPS{int(rng.integers(10**6, 10**7))}",
        prior_study_uid=prior_study_uid,
    )


def derived_uid(*parts: object) -> str:
    """A "2.25." UID (ISO/IEC 9834-8: the decimal value of a UUID) named by `parts`.

    Name-based (UUID v5), so the same parts always give the same UID; pydicom's
    `generate_uid(prefix=None)` ignores its entropy sources and is random, hence this.
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(map(str, parts))).int}"


def _physician_name(rng: np.random.Generator) -> str:
    return f"{rng.choice(_FAMILY_NAMES)}^{rng.choice(_GIVEN_NAMES)}^^Dr."


def identifying_metadata(patient: FakePatient, study: FakeStudy, institution: Institution) -> Dataset:
    """Every identifying attribute a hospital export carries for this patient and study.

    Kept in one place so de-identification tests can build it with planted canary values and
    check that nothing of it survives. Includes nested sequences and a private block whose
    innermost item (two sequence levels down) repeats the patient's name.
    """
    ds = Dataset()
    ds.PatientName = patient.name
    ds.PatientID = patient.mrn
    ds.IssuerOfPatientID = institution.name
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = "F"
    ds.PatientAge = f"{_age_years(patient.birth_date, study.started.date()):03d}Y"
    ds.OtherPatientIDsSequence = [_dataset(PatientID=patient.other_id, IssuerOfPatientID="National Health Index",
                                           TypeOfPatientID="TEXT")]
    ds.StudyDate = study.started.strftime("%Y%m%d")
    ds.StudyTime = study.started.strftime("%H%M%S")
    ds.AccessionNumber = study.accession_number
    ds.StudyID = study.study_id
    ds.StudyDescription = "MAMMOGRAPHY SCREENING BILATERAL"
    ds.InstitutionName = institution.name
    ds.InstitutionAddress = institution.address
    ds.InstitutionalDepartmentName = institution.department
    ds.StationName = institution.station_name
    ds.DeviceSerialNumber = institution.device_serial
    ds.ReferringPhysicianName = study.referring_physician
    ds.PerformingPhysicianName = study.performing_physician
    ds.OperatorsName = study.operator
    ds.RequestAttributesSequence = [_dataset(
        RequestedProcedureID=study.requested_procedure_id,
        ScheduledProcedureStepID=study.scheduled_step_id,
        RequestedProcedureDescription="Screening mammogram",
        AccessionNumber=study.accession_number,
    )]
    ds.ProcedureCodeSequence = [_dataset(CodeValue="77067", CodingSchemeDesignator="C4",
                                         CodeMeaning="Screening mammography, bilateral")]
    ds.ReferencedStudySequence = [_dataset(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",
                                           ReferencedSOPInstanceUID=study.prior_study_uid)]
    _add_private_block(ds, patient, institution)
    return ds


def _add_private_block(ds: Dataset, patient: FakePatient, institution: Institution) -> None:
    """A vendor private block: a flat identifying string and a two-level private sequence."""
    innermost = Dataset()
    innermost.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True).add_new(0x13, "PN", patient.name)
    middle = Dataset()
    middle.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True).add_new(0x12, "SQ", [innermost])
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", f"{patient.mrn} {patient.name.replace('^', ' ')} @ {institution.station_name}")
    block.add_new(0x11, "SQ", [middle])


def _dataset(**attributes: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _age_years(birth: dt.date, on: dt.date) -> int:
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


# ---------------------------------------------------------------------------------------------
# One site
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ImageContext:
    """Identity of one full-field image: who, which study, where it goes."""

    patient_number: int
    split: str
    patient: FakePatient
    study: FakeStudy
    study_uid: str
    image_index: int  # position within the exam

    @property
    def patient_id(self) -> str:
        """CBIS-DDSM style patient id, P_00001."""
        return f"P_{self.patient_number:05d}"


class _SiteWriter:
    """Writes the DICOM files and CSVs of one site."""

    def __init__(self, site_dir: Path, site_index: int, *, seed: int, size: int, per_site: int,
                 burned_in_text: float, lesion_contrast: float) -> None:
        self.site_dir = site_dir
        self.site_index = site_index
        self.seed = seed
        self.size = size
        self.per_site = per_site
        self.burned_in_text = burned_in_text
        self.lesion_contrast = lesion_contrast
        self.scanner = scanner_for_site(site_index)
        self.institution = site_institution(site_index, seed)

    def write(self, exams: Sequence[PatientExam], bar: tqdm) -> dict[str, dict[str, int]]:
        """Write every image of `exams` and the six CSVs; return image counts per split and class."""
        counts = {split: dict.fromkeys(CLASS_NAMES, 0) for split in SPLIT_WORDS}
        rows: dict[tuple[str, str], list[list[str]]] = {(kind, split): [] for kind in CSV_COLUMNS for split in SPLIT_WORDS}
        for exam in exams:
            for context, spec in self._image_contexts(exam):
                kind, image_rows = self._write_image(context, spec)
                rows[kind, context.split].extend(image_rows)
                counts[context.split][CLASS_NAMES[spec.label]] += 1
                bar.update(1)
        for (kind, split), kind_rows in rows.items():
            _write_csv(self.site_dir / "csv" / f"{kind}_case_description_{split}_set.csv", CSV_COLUMNS[kind], kind_rows)
        return counts

    def _uid(self, *parts: object) -> str:
        """A UID derived from the data set's arguments and `parts`: deterministic and unique."""
        return derived_uid(self.seed, self.size, self.per_site, self.site_index, *parts)

    def _image_contexts(self, exam: PatientExam) -> list[tuple[_ImageContext, ImageSpec]]:
        rng = np.random.default_rng([self.seed, self.site_index, exam.patient_number, 0x1D])
        study = sample_study(rng, self._uid(exam.patient_number, "prior-study"))
        patient = sample_patient(rng, study.started.date())
        study_uid = self._uid(exam.patient_number, "study")
        return [(_ImageContext(exam.patient_number, exam.split, patient, study, study_uid, index), spec)
                for index, spec in enumerate(exam.images)]

    def _write_image(self, context: _ImageContext, spec: ImageSpec) -> tuple[str, list[list[str]]]:
        """Write the mammogram and, per lesion, its ROI mask and crop; return its CSV kind and rows."""
        rng = np.random.default_rng([self.seed, self.site_index, context.patient_number, context.image_index, 0x1A])
        image = render_image(spec, self.scanner, self.size, lesion_contrast=self.lesion_contrast)
        burned = rng.random() < self.burned_in_text
        pixels = _burn_in(image.pixels, context, spec, self.scanner) if burned else image.pixels
        kind = _csv_kind(spec)
        series_uid = self._uid(context.patient_id, context.image_index, "series")
        sop_uid = self._uid(context.patient_id, context.image_index, "image")
        ds = self._mammogram(context, spec, image, pixels, burned, series_uid, sop_uid, rng)
        image_path = self._relative_path(context, spec, series_uid)
        _save(ds, self.site_dir / "CBIS-DDSM" / image_path)
        if not spec.lesions:
            return kind, [_normal_row(context.patient_id, spec, image_path)]
        return kind, [self._write_abnormality(context, spec, ds, pixels, number, lesion, mask)
                      for number, (lesion, mask) in enumerate(zip(spec.lesions, image.lesion_masks, strict=True),
                                                              start=1)]

    def _write_abnormality(self, context: _ImageContext, spec: ImageSpec, mammogram: Dataset, pixels: np.ndarray,
                           number: int, lesion: Lesion, mask: np.ndarray) -> list[str]:
        """Write abnormality `number`'s ROI mask (000000.dcm) and crop (000001.dcm) into the
        `<folder>_<number>` tree; return its CSV row."""
        image_path = self._relative_path(context, spec, mammogram.SeriesInstanceUID)
        roi_series = self._uid(context.patient_id, context.image_index, number, "roi-series")
        roi_dir = f"{image_path.split('/')[0]}_{number}/{context.study_uid}/{roi_series}"
        derived = partial(_derived_image, mammogram, context, spec, roi_series, institution=self.institution)
        roi_mask = derived(self._uid(context.patient_id, context.image_index, number, "mask"), 1)
        _set_pixels(roi_mask, mask.astype(np.uint8) * 255, 8, "MONOCHROME2", rle_lossless=False)
        roi_mask.SeriesDescription = "ROI mask images"
        crop = derived(self._uid(context.patient_id, context.image_index, number, "crop"), 2)
        _set_pixels(crop, pixels[_bounding_box(mask)], int(mammogram.BitsStored),
                    str(mammogram.PhotometricInterpretation), rle_lossless=False)
        crop.SeriesDescription = "cropped images"
        crop.WindowCenter, crop.WindowWidth = mammogram.WindowCenter, mammogram.WindowWidth
        _save(roi_mask, self.site_dir / "CBIS-DDSM" / roi_dir / _IMAGE_FILE)
        _save(crop, self.site_dir / "CBIS-DDSM" / roi_dir / _CROP_FILE)
        return _lesion_row(context.patient_id, spec, number, lesion, image_path,
                           f"{roi_dir}/{_CROP_FILE}", f"{roi_dir}/{_IMAGE_FILE}")

    def _relative_path(self, context: _ImageContext, spec: ImageSpec, series_uid: str) -> str:
        """`<folder>/<study uid>/<series uid>/000000.dcm`, relative to the site's CBIS-DDSM tree."""
        kind = _csv_kind(spec)
        folder = (f"{_FOLDER_PREFIX[kind]}-{SPLIT_WORDS[context.split]}_{context.patient_id}_"
                  f"{_SIDE_WORDS[spec.breast.laterality]}_{spec.view}")
        return f"{folder}/{context.study_uid}/{series_uid}/{_IMAGE_FILE}"

    def _mammogram(self, context: _ImageContext, spec: ImageSpec, image: SyntheticImage, pixels: np.ndarray,
                   burned: bool, series_uid: str, sop_uid: str, rng: np.random.Generator) -> Dataset:
        """The full-field For Presentation mammogram dataset, pixel data included."""
        ds = identifying_metadata(context.patient, context.study, self.institution)
        acquired = context.study.started + dt.timedelta(seconds=int(60 + 75 * context.image_index + rng.integers(0, 40)))
        _set_sop_and_series(ds, DigitalMammographyXRayImageStorageForPresentation, sop_uid, context.study_uid,
                            series_uid, series_number=context.image_index + 1, when=acquired)
        ds.FrameOfReferenceUID = self._uid(context.patient_id, spec.breast.laterality, "frame-of-reference")
        ds.PositionReferenceIndicator = ""
        ds.SeriesDescription = f"{spec.breast.laterality} {spec.view}"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.AcquisitionDateTime = acquired.strftime("%Y%m%d%H%M%S.%f")
        _set_equipment(ds, self.scanner)
        _set_breast_attributes(ds, spec)
        _set_exposure(ds, spec, self.scanner, rng)
        ds.PixelSpacing = ds.ImagerPixelSpacing = [f"{pixel_spacing_mm(self.size):.6g}"] * 2
        ds.BurnedInAnnotation = "YES" if burned else "NO"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = -1 if self.scanner.photometric == "MONOCHROME2" else 1
        ds.WindowCenter, ds.WindowWidth = f"{image.window[0]:g}", f"{image.window[1]:g}"
        ds.VOILUTFunction = "LINEAR"
        ds.WindowCenterWidthExplanation = "AUTO"
        if self.scanner.rescale:
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
        _set_pixels(ds, pixels, self.scanner.bits_stored, self.scanner.photometric, self.scanner.rle_lossless)
        return ds


def _derived_image(source: Dataset, context: _ImageContext, spec: ImageSpec, series_uid: str, sop_uid: str,
                   instance_number: int, *, institution: Institution) -> Dataset:
    """A Secondary Capture image derived from mammogram `source` (an ROI mask or a crop, as
    CBIS-DDSM ships them), without its pixel module."""
    ds = identifying_metadata(context.patient, context.study, institution)
    _set_sop_and_series(ds, SecondaryCaptureImageStorage, sop_uid, context.study_uid, series_uid,
                        series_number=100 + context.image_index, when=context.study.started,
                        instance_number=instance_number)
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"
    _set_breast_attributes(ds, spec)
    ds.PixelSpacing = source.PixelSpacing
    ds.SourceImageSequence = [_dataset(ReferencedSOPClassUID=source.SOPClassUID,
                                       ReferencedSOPInstanceUID=source.SOPInstanceUID)]
    return ds


def _csv_kind(spec: ImageSpec) -> str:
    """Which CSV (and folder prefix) an image belongs to; an image's lesions share one kind."""
    if not spec.lesions:
        return "normal"
    return "mass" if spec.lesions[0].kind == "mass" else "calc"


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice]:
    """Bounding box of a non-empty mask, grown by a quarter of its size (at least 4 pixels)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise DataError("a lesion mask is empty: the lesion fell outside the image")
    margin_r = max(4, (rows[-1] - rows[0]) // 4)
    margin_c = max(4, (cols[-1] - cols[0]) // 4)
    return (slice(max(0, rows[0] - margin_r), min(mask.shape[0], rows[-1] + margin_r + 1)),
            slice(max(0, cols[0] - margin_c), min(mask.shape[1], cols[-1] + margin_c + 1)))


# ---------------------------------------------------------------------------------------------
# DICOM modules
# ---------------------------------------------------------------------------------------------


def _set_sop_and_series(ds: Dataset, sop_class: str, sop_uid: str, study_uid: str, series_uid: str, *,
                        series_number: int, when: dt.datetime, instance_number: int = 1) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "MG"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = when.strftime("%H%M%S")


def _set_equipment(ds: Dataset, scanner: ScannerProfile) -> None:
    ds.Manufacturer = scanner.manufacturer
    ds.ManufacturerModelName = scanner.model
    ds.SoftwareVersions = scanner.software_version
    ds.DetectorType = "DIRECT"
    ds.PositionerType = "MAMMOGRAPHIC"


def _set_breast_attributes(ds: Dataset, spec: ImageSpec) -> None:
    """Laterality, view and body part, as the MG IOD wants them."""
    side, view = spec.breast.laterality, spec.view
    ds.ImageLaterality = ds.Laterality = side
    ds.ViewPosition = view
    code, meaning = _VIEW_CODES[view]
    ds.ViewCodeSequence = [_dataset(CodeValue=code, CodingSchemeDesignator="SCT", CodeMeaning=meaning,
                                    ViewModifierCodeSequence=[])]
    ds.BodyPartExamined = "BREAST"
    ds.AnatomicRegionSequence = [_dataset(CodeValue="76752008", CodingSchemeDesignator="SCT", CodeMeaning="Breast")]
    ds.PatientOrientation = _PATIENT_ORIENTATION[side, view]
    ds.BreastImplantPresent = "NO"


def _set_exposure(ds: Dataset, spec: ImageSpec, scanner: ScannerProfile, rng: np.random.Generator) -> None:
    """Plausible, self-consistent technique factors (MLO compresses a thicker breast)."""
    thickness_mm = rng.uniform(35, 65) + (8 if spec.view == "MLO" else 0) + 10 * spec.breast.extent
    milliampere_seconds = rng.uniform(40, 180)
    milliseconds = int(rng.integers(500, 2000))
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.KVP = f"{rng.uniform(*scanner.kvp_range):.0f}"
    ds.ExposureTime = milliseconds
    ds.XRayTubeCurrent = round(milliampere_seconds * 1000 / milliseconds)
    ds.Exposure = round(milliampere_seconds)
    ds.ExposureInuAs = round(milliampere_seconds * 1000)
    ds.CompressionForce = f"{rng.uniform(60, 150):.1f}"
    ds.BodyPartThickness = f"{thickness_mm:.0f}"
    ds.DistanceSourceToDetector = "660"
    ds.AnodeTargetMaterial = "TUNGSTEN"
    ds.FilterMaterial = "RHODIUM"
    ds.OrganExposed = "BREAST"


def _set_pixels(ds: Dataset, pixels: np.ndarray, bits_stored: int, photometric: str, rle_lossless: bool) -> None:
    """Image Pixel module and file meta; RLE Lossless when the scanner's export compresses.

    pydicom's own RLE encoder and pylibjpeg-rle produce identical bytes, so the plugin pydicom
    picks does not change the file.
    """
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if rle_lossless:
        # A fresh random SOP Instance UID (pydicom's default) would break determinism.
        ds.compress(RLELossless, np.ascontiguousarray(pixels), generate_instance_uid=False)
    else:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()


def _save(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


# ---------------------------------------------------------------------------------------------
# Burned-in text
# ---------------------------------------------------------------------------------------------


def _burn_in(pixels: np.ndarray, context: _ImageContext, spec: ImageSpec, scanner: ScannerProfile) -> np.ndarray:
    family, given = context.patient.name.split("^")[:2]
    lines = (f"{family}, {given}", context.study.started.strftime("%d.%m.%Y"),
             f"{spec.breast.laterality} {spec.view}")
    ink = scanner.max_value if scanner.photometric == "MONOCHROME2" else 0
    anterior = "right" if spec.breast.laterality == "L" else "left"
    return burn_in_text(pixels, lines, anterior_side=anterior, ink=ink)


def burn_in_text(pixels: np.ndarray, lines: Sequence[str], *, anterior_side: str, ink: int) -> np.ndarray:
    """A copy of `pixels` with `lines` written at value `ink` in the upper corner on
    `anterior_side` ("left" or "right"): the corner that the breast never reaches.

    The text block takes at most ~11 % of the rows and 38 % of the columns; on small images it
    is drawn larger and shrunk, so it is a legible label on big images and a smudge of text
    on thumbnails, as on real scanned films.
    """
    if anterior_side not in ("left", "right"):
        raise DataError(f"anterior_side {anterior_side!r} is not 'left' or 'right'")
    rows, cols = pixels.shape
    box_height, box_width = max(3, round(0.11 * rows)), max(8, round(0.38 * cols))
    text = text_mask(lines, font_px=max(10, round(box_height / len(lines) / 1.25)))
    scale = min(1.0, box_height / text.shape[0], box_width / text.shape[1])
    if scale < 1.0:
        shrunk = Image.fromarray(text).resize((max(1, round(text.shape[1] * scale)), max(1, round(text.shape[0] * scale))),
                                              Image.Resampling.BOX)
        text = np.asarray(shrunk)
    ink_mask = text >= 64
    top = max(1, round(0.015 * rows))
    margin = max(1, round(0.015 * cols))
    left = cols - margin - text.shape[1] if anterior_side == "right" else margin
    burned = pixels.copy()
    region = burned[top:top + text.shape[0], left:left + text.shape[1]]
    region[ink_mask[:region.shape[0], :region.shape[1]]] = ink
    return burned


def text_mask(lines: Sequence[str], font_px: int) -> np.ndarray:
    """8-bit coverage of `lines` set in Pillow's built-in font (no font files needed)."""
    font = ImageFont.load_default(size=font_px)
    line_height = round(font_px * 1.25)
    width = max(round(font.getlength(line)) for line in lines) + 2
    canvas = Image.new("L", (width, line_height * len(lines) + 2), 0)
    draw = ImageDraw.Draw(canvas)
    for number, line in enumerate(lines):
        draw.text((1, 1 + number * line_height), line, fill=255, font=font)
    return np.asarray(canvas)


# ---------------------------------------------------------------------------------------------
# CSVs and manifest
# ---------------------------------------------------------------------------------------------


def _lesion_row(patient_id: str, spec: ImageSpec, number: int, lesion: Lesion, image_path: str,
                crop_path: str, mask_path: str) -> list[str]:
    abnormality_type = "mass" if lesion.kind == "mass" else "calcification"
    return [patient_id, str(spec.breast.density), _SIDE_WORDS[spec.breast.laterality], spec.view, str(number),
            abnormality_type, lesion.shape, lesion.margins, str(lesion.assessment), lesion.pathology,
            str(lesion.subtlety), image_path, crop_path, mask_path]


def _normal_row(patient_id: str, spec: ImageSpec, image_path: str) -> list[str]:
    """Our extension: a normal image in the mass CSV's columns (BI-RADS 1, no ROI, no subtlety)."""
    return [patient_id, str(spec.breast.density), _SIDE_WORDS[spec.breast.laterality], spec.view, "0",
            "normal", "", "", "1", "NORMAL", "", image_path, "", ""]


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)


def _site_manifest(site_index: int, exams: Sequence[PatientExam], counts: dict[str, dict[str, int]]) -> dict:
    """What a site is, without any patient information: scanner, priors, sizes."""
    scanner = scanner_for_site(site_index)
    return {
        "scanner": {
            "manufacturer": scanner.manufacturer,
            "model": scanner.model,
            "bits_stored": scanner.bits_stored,
            "photometric_interpretation": scanner.photometric,
            "transfer_syntax": str(RLELossless if scanner.rle_lossless else ExplicitVRLittleEndian),
            "response": scanner.response,
            "response_param": scanner.response_param,
            "noise": scanner.noise,
            "blur_px": scanner.blur_px,
        },
        "class_priors": dict(zip(CLASS_NAMES, site_class_priors(site_index), strict=True)),
        "patients": {split: sum(exam.split == split for exam in exams) for split in SPLIT_WORDS},
        "counts": counts,
    }


def _write_manifest(out_dir: Path, sites: dict[str, dict], *, seed: int, size: int, per_site: int,
                    test_fraction: float, burned_in_text: float, lesion_contrast: float) -> Path:
    rows, cols = image_shape(size)
    manifest = {
        "generator": "mammofl synthetic mammography",
        "format": "CBIS-DDSM layout, one tree per site",
        "seed": seed,
        "size": size,
        "rows": rows,
        "columns": cols,
        "pixel_spacing_mm": pixel_spacing_mm(size),
        "per_site": per_site,
        "test_fraction": test_fraction,
        "burned_in_text": burned_in_text,
        "lesion_contrast": lesion_contrast,
        "classes": list(CLASS_NAMES),
        "sites": sites,
    }
    path = out_dir / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path

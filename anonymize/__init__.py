"""De-identification of DICOM files (PS3.15 Annex E) and rasters."""

from common import dicom_logging  # noqa: F401  (pydicom's logs quote header values: withheld)

"""The project's exceptions.

Every message names the offending file, key or field and says what would be valid;
none ever contains a value read from a patient record.
"""


class MammoflError(Exception):
    """Base class of every error mammofl raises on purpose."""


class ConfigError(MammoflError):
    """A configuration file or value is invalid."""


class DataError(MammoflError):
    """A data set, image file or CSV index cannot be used as given."""


class DicomReadError(DataError):
    """A DICOM file is not readable as an image (truncated, not DICOM, no pixel handler...)."""


class ModelError(MammoflError):
    """A model name, checkpoint or weight file cannot be used as given."""

"""Shifting DICOM DA and DT values by whole days, keeping their precision.

Only the date part moves: times of day, fractions and UTC offsets stay as they were, so intervals
between a patient's events are preserved to the second. A value that is not a DICOM date raises
DateValueError naming only the VR (the value may be a patient's date).
"""

from __future__ import annotations

import datetime as dt
from typing import Final

from common.errors import DataError

_DATE_DIGITS: Final = 8
_LEGACY_LENGTH: Final = 10


class DateValueError(DataError):
    """A DA or DT value does not follow PS3.5's date format."""


def shift_date(value: str, days: int) -> str:
    """A DA value ("YYYYMMDD", or a "YYYYMMDD-YYYYMMDD" range) moved by `days`; the retired
    ACR-NEMA form "YYYY.MM.DD" is read too and written back as "YYYYMMDD"."""
    if len(value.strip()) == _LEGACY_LENGTH and value[4:5] == value[7:8] == ".":
        value = value.replace(".", "")
    return "-".join(_shift_prefix(part, days, "DA") if part else part for part in value.split("-"))


def shift_datetime(value: str, days: int) -> str:
    """A DT value moved by `days`; a partial one ("YYYY", "YYYYMM") keeps its precision."""
    body, sign, offset = _split_offset(value)
    digits = body[:_DATE_DIGITS]
    shifted = _shift_prefix(digits, days, "DT") if len(digits) >= 4 else _invalid("DT")
    return shifted + body[len(digits):] + sign + offset


def _split_offset(value: str) -> tuple[str, str, str]:
    """DT "body+ZZXX" -> (body, "+", "ZZXX"); a DT may end with a UTC offset after + or -."""
    for sign in "+-":
        if sign in value[_DATE_DIGITS:]:
            body, _, offset = value.rpartition(sign)
            return body, sign, offset
    return value, "", ""


def _shift_prefix(digits: str, days: int, vr: str) -> str:
    """Shift "YYYY", "YYYYMM" or "YYYYMMDD" by `days`, formatted back to the same length."""
    digits = digits.strip()
    if len(digits) not in (4, 6, 8) or not digits.isdigit():
        _invalid(vr)
    try:
        date = dt.date(int(digits[:4]), int(digits[4:6] or 1), int(digits[6:8] or 1))
        shifted = date + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        _invalid(vr)
    return shifted.strftime("%Y%m%d")[: len(digits)]


def _invalid(vr: str) -> str:
    raise DateValueError(f"a {vr} value is not a valid DICOM {vr} (YYYYMMDD...); cannot shift it")

"""No patient data in logs from pydicom: the values it quotes are withheld.

pydicom reports an invalid header value by quoting it ("Invalid value for VR UI:
'1.2.SMITH'", "Invalid value for VR IS: 'JOHN'") on its ``pydicom`` logger, and a header
value can be anything a scanner or a person typed, patient names included. Importing this
module (every package of ours that reads DICOM does) installs a filter on that logger which
replaces every quoted value with a placeholder; the message still names the VR and the
problem. It also catches the same text when pydicom issues it as a warning routed to logging;
the warning itself, which Python prints to stderr with the value, is ignored (pydicom logs the same
message, withheld, on its logger).
"""

from __future__ import annotations

import logging
import re
import warnings

WITHHELD = "'<value withheld>'"
# A quoted value as pydicom writes it: single or double quotes, or a bytes literal.
_QUOTED = re.compile(r"b?'(?:[^'\\]|\\.)*'|b?\"(?:[^\"\\]|\\.)*\"")


class WithholdQuotedValues(logging.Filter):
    """Rewrites a record's message with its quoted values replaced by `WITHHELD`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        withheld = _QUOTED.sub(WITHHELD, message)
        if withheld != message:
            record.msg, record.args = withheld, None
        return True


_WATCHED = ("pydicom", "py.warnings")


def install() -> None:
    """Idempotent. A logger's filter does not see its children's records, so the record factory
    withholds values for every record of ``pydicom`` (and its children) and of routed warnings."""
    # pydicom's warn_and_log both logs (withheld above) and warns: the warning, printed to stderr by
    # Python's default handler, would quote the value.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    previous = logging.getLogRecordFactory()
    if getattr(previous, "withholds_values", False):
        return
    withhold = WithholdQuotedValues()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if record.name.split(".")[0] in _WATCHED:
            withhold.filter(record)
        return record

    factory.withholds_values = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


install()

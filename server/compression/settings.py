"""Validated changes to the ``compression`` config section (`common.config.CompressionConfig`)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from common.config import CompressionConfig
from common.errors import ConfigError


def settings_with(base: CompressionConfig, **changes: Any) -> CompressionConfig:
    """`base` with `changes` applied and validated again (``model_copy`` would skip validation).

    Raises ConfigError naming each offending key under ``compression``.
    """
    try:
        return CompressionConfig.model_validate({**base.model_dump(), **changes})
    except ValidationError as error:
        problems = [
            f"  - {'.'.join(('compression', *map(str, item['loc'])))}: {item['msg'].removeprefix('Value error, ')}"
            for item in error.errors()
        ]
        raise ConfigError("invalid compression settings:\n" + "\n".join(problems)) from None

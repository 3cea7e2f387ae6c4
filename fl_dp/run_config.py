"""Read and check a ``--run-config`` string in the launcher, before any runtime starts.

Flower reads ``--run-config "k=v k2='s'"`` as TOML values; a mistake (an unquoted string, a key
given twice, a misspelled name) would otherwise surface as Flower's generic format error or,
after the SuperLink and Ray have started, as a traceback in the ServerApp. Here the overrides
are read pair by pair with the same pattern Flower uses, fused with the app's defaults
(``[tool.flwr.app.config]`` in pyproject.toml) and checked by the same
:class:`common.config.RunConfig` the ServerApp builds, so the error is one line naming the key,
the value and what to write instead. The ServerApp keeps its own check for plain ``flwr run``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

from common.config import ConfigError, RunConfig

APP_DIR = Path(__file__).resolve().parent.parent
# Flower's own pattern (flwr.common.config.parse_config_args): key=value, value quoted or not.
PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")
QUOTES = "'\""


class RunConfigError(ValueError):
    """A --run-config string or value the app cannot use."""


def parse_overrides(text: str) -> dict[str, Any]:
    """``"k=v k2='s'"`` -> ``{"k": v, "k2": "s"}``, refusing what Flower would reject or drop."""
    values: dict[str, Any] = {}
    position = 0
    for match in PAIR.finditer(text):
        _check_gap(text[position:match.start()])
        key, raw = match.groups()
        try:
            value = tomllib.loads(f"value = {raw}")["value"]
        except tomllib.TOMLDecodeError:
            raise RunConfigError(
                f"{key}={raw} is not a valid value: strings need quotes, write {key}='{raw.strip(QUOTES)}'"
            ) from None
        if key in values:
            raise RunConfigError(f"{key} is given twice in --run-config ({values[key]!r} and {value!r}); keep one")
        values[key] = value
        position = match.end()
    _check_gap(text[position:])
    return values


def _check_gap(gap: str) -> None:
    if gap.strip():
        raise RunConfigError(
            f"cannot read {gap.strip()!r} in --run-config: write space-separated key=value pairs, "
            "e.g. \"num-server-rounds=3 strategy='fedprox'\""
        )


def app_defaults(app_dir: Path = APP_DIR) -> dict[str, Any]:
    with open(app_dir / "pyproject.toml", "rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def validate(overrides: dict[str, Any], app_dir: Path = APP_DIR) -> RunConfig:
    """The run config the ServerApp would build from these overrides (raises RunConfigError)."""
    try:
        return RunConfig.from_run_config(app_defaults(app_dir) | overrides)
    except ConfigError as error:
        raise RunConfigError(str(error)) from None


def to_flwr(values: dict[str, Any]) -> str:
    """Back to the ``--run-config`` string `flwr run` reads (TOML values, strings quoted)."""
    return " ".join(f"{key}={_toml(value)}" for key, value in values.items())


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if "'" not in value:
            return f"'{value}'"
        if '"' not in value and "\\" not in value:
            return f'"{value}"'
        raise RunConfigError(f"the value {value!r} holds both quote characters; Flower cannot pass it")
    return repr(value)

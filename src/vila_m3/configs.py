"""Where the product's configuration files live, and how to read one.

The configs are the repository's ``configs/`` folder (found from this file, so it works from a
source checkout or an editable install). Set the environment variable ``VILA_M3_CONFIG_DIR`` to use
another folder, e.g. for a non-editable install or a site-specific copy; it is read at every call.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR_ENV = "VILA_M3_CONFIG_DIR"
DEFAULT_CONFIG_DIR: Path = Path(__file__).resolve().parents[2] / "configs"
CONFIG_DIR: Path = Path(os.environ.get(CONFIG_DIR_ENV) or DEFAULT_CONFIG_DIR)
"""The configs folder as seen when this module was imported; ``config_dir()`` re-reads the environment."""


def config_dir() -> Path:
    """The configs folder now: ``$VILA_M3_CONFIG_DIR`` if set and non-empty, else the repository's ``configs/``."""
    return Path(os.environ.get(CONFIG_DIR_ENV) or DEFAULT_CONFIG_DIR)


def config_path(name: str | os.PathLike[str]) -> Path:
    """The path of config ``name`` (a file name in the configs folder, or an absolute path)."""
    path = Path(name)
    return path if path.is_absolute() else config_dir() / path


def load_config(name: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``.yaml``/``.yml`` or ``.json`` config file into a dict.

    Args:
        name: file name inside the configs folder (``"experts.yaml"``) or an absolute path.

    Raises:
        FileNotFoundError: the file does not exist (the message names the folder and the env variable).
        ValueError: unknown extension, a parse error, or a top level that is not a mapping.
    """
    path = config_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"config file {path} not found (configs folder: {path.parent}; set {CONFIG_DIR_ENV} to use another folder)"
        )
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(
                f"config file {path}: unsupported extension {path.suffix!r} (use .yaml, .yml or .json)"
            )
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ValueError(f"config file {path} cannot be parsed: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: the top level must be a mapping, got {type(data).__name__}")
    return data

"""The configuration files the package reads, shipped inside it as package data (``spinepath/configs/``).

They are found through :mod:`importlib.resources`, never through paths relative to the repository, so an
installed wheel works from any folder.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: Folder of the shipped configuration files (series selection, split, label map, training, parameters).
CONFIG_DIR = Path(str(files("spinepath").joinpath("configs")))


def config_file(name: str) -> Path:
    """Path of a shipped configuration file, e.g. ``config_file("split.json")``."""
    return CONFIG_DIR / name

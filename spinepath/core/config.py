"""The configuration files the package reads, shipped inside it as package data (``spinepath/configs/``).

They are found through :mod:`importlib.resources`, never through paths relative to the repository, so an
installed wheel works from any folder.
"""

from __future__ import annotations

from dataclasses import fields
from importlib.resources import files
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

#: Folder of the shipped configuration files (series selection, split, label map, training, parameters).
CONFIG_DIR = Path(str(files("spinepath").joinpath("configs")))


def config_file(name: str) -> Path:
    """Path of a shipped configuration file, e.g. ``config_file("split.json")``."""
    return CONFIG_DIR / name


def dataclass_from_dict(cls: type[T], d: dict, tuples: tuple[str, ...] = ()) -> T:
    """An instance of the dataclass ``cls`` from a (JSON) dict.

    Args:
        cls: The dataclass.
        d: Its fields by name; keys that are not fields (an older or newer version's) are ignored.
        tuples: Fields stored as JSON lists that the dataclass holds as tuples.

    """
    names = {f.name for f in fields(cls)}
    return cls(**{k: (tuple(v) if k in tuples else v) for k, v in d.items() if k in names})

"""Vertebral level names and ordering (top-down)."""

from __future__ import annotations

#: Vertebral levels the product names, from the top down.
VERTEBRA_LEVELS: tuple[str, ...] = (*(f"T{i}" for i in range(1, 13)), "L1", "L2", "L3", "L4", "L5", "S1")
#: Intervertebral discs between neighbouring levels, from the top down.
DISC_LEVELS: tuple[str, ...] = tuple(f"{a}-{b}" for a, b in zip(VERTEBRA_LEVELS[:-1], VERTEBRA_LEVELS[1:]))


def disc_index_from_bottom(level: str) -> int:
    """SPIDER's ``index_from_bottom`` of a disc level name (``"L5-S1"`` -> 1, ``"L4-L5"`` -> 2, ...).

    Raises:
        ValueError: If the name is not a known disc level.

    """
    if level not in DISC_LEVELS:
        raise ValueError(f"unknown disc level {level!r}")
    return DISC_LEVELS.index("L5-S1") - DISC_LEVELS.index(level) + 1


def disc_level_from_bottom(index_from_bottom: int) -> str:
    """Disc level name of an ``index_from_bottom`` (1 -> ``"L5-S1"``); the inverse of :func:`disc_index_from_bottom`.

    Raises:
        ValueError: If no disc of :data:`DISC_LEVELS` has that index.

    """
    i = DISC_LEVELS.index("L5-S1") - (index_from_bottom - 1)
    if not 0 <= i < len(DISC_LEVELS):
        raise ValueError(f"no disc level at index_from_bottom {index_from_bottom}")
    return DISC_LEVELS[i]


def structure_rank(name: str) -> float:
    """Top-down order of bodies (level names) and discs (``"L3-L4"``, just below their upper body).

    Other structures (the canal) come after them.
    """
    up = name.split("-")[0]
    if up not in VERTEBRA_LEVELS:
        return float(len(VERTEBRA_LEVELS))
    return VERTEBRA_LEVELS.index(up) + (0.5 if "-" in name else 0.0)


def level_index(name: str) -> int:
    """Return the top-down index of a vertebral level name.

    Args:
        name: Level name such as ``"L3"``.

    Raises:
        ValueError: If the name is not a known vertebral level.

    """
    try:
        return VERTEBRA_LEVELS.index(name)
    except ValueError as exc:
        raise ValueError(f"unknown vertebral level {name!r}; expected one of {VERTEBRA_LEVELS}") from exc


def names_from_bottom(n: int, bottom: str) -> list[str]:
    """Name ``n`` vertebrae ordered top-down, given the name of the lowest one.

    Levels above the top of the known list get ``"?"``.
    """
    b = level_index(bottom)
    return [VERTEBRA_LEVELS[b - (n - 1 - i)] if b - (n - 1 - i) >= 0 else "?" for i in range(n)]


VERTEBRA_GRADES = ("v1", "v2")


DISC_GRADES = ("v1", "v2", "v3", "v4", "v5")


DISC_GRADE_NAMES = ("normal", "bulge", "protrusion", "extrusion", "Schmorl's node")


"""The error a refused input raises, shared by every reader."""

from __future__ import annotations


class StudyError(ValueError):
    """The input study cannot be processed; the message names the reason (safe to log: no identifiers)."""


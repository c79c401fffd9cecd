"""Argument checks shared by the mta dataclasses (MethodSpec, Schedule): one message format."""
from __future__ import annotations

from typing import Callable


def check_choice(cls: str, name: str, v, allowed: tuple) -> None:
    if not isinstance(v, str):
        raise TypeError(f"{cls}.{name}: expected one of {allowed}, got {type(v).__name__} ({v!r})")
    if v not in allowed:
        raise ValueError(f"{cls}.{name}: expected one of {allowed}, got {v!r}")


def check_number(cls: str, name: str, v, expected: str, ok: Callable[[float], bool]) -> None:
    """An int or float (not a bool) for which ``ok`` holds (NaN never does)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{cls}.{name}: expected {expected}, got {type(v).__name__} ({v!r})")
    if not ok(float(v)):
        raise ValueError(f"{cls}.{name}: expected {expected}, got {v}")

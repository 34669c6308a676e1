"""Cells of the benchmarks' markdown tables."""

from __future__ import annotations


def ms(seconds: float | None, digits: int = 0) -> str:
    """Seconds as milliseconds with ``digits`` decimals; "-" when there is no value."""
    return "-" if seconds is None else f"{1000 * seconds:.{digits}f}"

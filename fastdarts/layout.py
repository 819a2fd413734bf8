"""Macro structure: which cells of the network are reduction cells."""
from __future__ import annotations

from .errors import FastDartsError

_TOKENS = {"n": False, "normal": False, "r": True, "reduce": True, "reduction": True}


def reduction_layout(layers: int | None = None, layout: str | None = None) -> tuple[bool, ...]:
    """One flag per cell, True for a reduction cell.

    ``layers=L`` puts reductions at L//3 and 2L//3 as DARTS does; ``layout`` is
    an explicit comma-separated string such as ``"N,R,N"``. Give one of them.
    """
    if layout is not None and layers is not None:
        raise FastDartsError("give either layers or a layout, not both")
    if layout is not None:
        tokens = [t.strip().lower() for t in str(layout).split(",")]
        bad = [t for t in tokens if t not in _TOKENS]
        if bad or not tokens:
            raise FastDartsError(
                f"malformed layout {layout!r}: each comma-separated entry must be N (normal) or R (reduction),"
                f" e.g. 'N,R,N'")
        return tuple(_TOKENS[t] for t in tokens)
    if layers is None:
        raise FastDartsError("give the number of layers or a layout")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers <= 0:
        raise FastDartsError(f"layers must be a positive integer, got {layers!r}")
    return tuple(i in (layers // 3, 2 * layers // 3) for i in range(layers))


def layout_string(reductions: tuple[bool, ...]) -> str:
    return ",".join("R" if r else "N" for r in reductions)

"""What the benchmark scripts share for reporting: markdown table cells and tables, and an optional matplotlib.
Standard library only, so any benchmark can import it (`run.py` and `low_data.py` both do; neither imports the
other's module at import time)."""

from __future__ import annotations

import math
import numbers


def fmt(x, digits=3):
    """A table cell: None as "-", non-integer reals (numpy's included) to ``digits`` significant figures."""
    if x is None:
        return "-"
    if isinstance(x, numbers.Real) and not isinstance(x, numbers.Integral):
        x = float(x)
        if math.isnan(x):
            return "nan"
        return f"{x:.0f}" if abs(x) >= 10 ** digits else f"{x:.{digits}g}"
    return str(x)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend, or None where matplotlib is not installed (every
    benchmark's plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt

"""The median and range of a repeated measurement, as every side-by-side benchmark here reports it."""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def spread(values: Iterable[float]) -> dict[str, float]:
  """{"median", "min", "max"} of `values`."""
  values = list(values)
  return {"median": statistics.median(values), "min": min(values), "max": max(values)}

"""What every tokenised encoder split shares: ragged rows of token ids."""

from __future__ import annotations

import functools

import numpy as np


class TokenRows:
  """Mixin of the encoder splits (classification, QA features, tagged words): row i is input_ids[i], ragged."""
  input_ids: list[np.ndarray]

  def __len__(self) -> int:
    return len(self.input_ids)

  @functools.cached_property  # collate reads it for every batch
  def lengths(self) -> np.ndarray:
    return np.fromiter((len(x) for x in self.input_ids), np.int32, len(self.input_ids))

  @functools.cached_property  # a cached split (data/cache.py) seeds it rather than reading every row
  def max_token_id(self) -> int:
    return max((int(x.max()) for x in self.input_ids if len(x)), default=0)

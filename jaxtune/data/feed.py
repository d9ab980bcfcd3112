"""The train split as a sequence of step batches: rows of an in-memory split, or batches of a stream.

Either feed yields (data, rows) per step, where `collate(data, rows, ...)` builds the batch, and gives
the data position after a step: saved with each checkpoint, it is checked (split) or continued from
(stream) on --resume, so a resumed run trains on exactly the batches it would have without a stop.
A multi-process run's split (`HostFeed`) has the same order, each process tokenising only its rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from jaxtune.data import batching, hostrows, stream
from jaxtune.errors import UserError


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
  """Full batches of a split; the remainder of an epoch is dropped."""
  if num_rows < batch_size:
    raise UserError(f"the train split has {num_rows} rows, fewer than train.batch_size={batch_size}; lower the "
                    "batch size.")
  return num_rows // batch_size


class SplitFeed:
  """An in-memory split: each epoch's seeded order (`batching.step_batches`), entered mid-epoch on resume."""

  def __init__(self, data: Any, batch_size: int, seed: int, group_by_length: bool):
    self.data, self.batch_size, self.seed, self.group_by_length = data, batch_size, seed, group_by_length
    self.per_epoch = steps_per_epoch(len(data), batch_size)

  def batches(self, start: int, stop: int) -> Iterator[tuple[Any, np.ndarray]]:
    for rows in batching.step_batches(self.data.lengths, self.batch_size, self.seed, self.group_by_length,
                                      self.per_epoch, start, stop):
      yield self.data, rows

  def position(self, step: int) -> dict[str, int]:
    """Where the data order stands after `step` steps."""
    return {"epoch": step // self.per_epoch, "batch_in_epoch": step % self.per_epoch, "train_rows": len(self.data)}

  def epoch(self, step: int) -> float:
    return step / self.per_epoch

  @property
  def tokenized(self) -> list[int] | None:
    """Train rows tokenised by each process (every process encodes the whole split)."""
    return [len(self.data)] * jax.process_count()

  def resume(self, saved: dict[str, Any] | None, step: int) -> None:
    """The restored step's saved position must be where this data's order puts that step."""
    want = self.position(step)
    if saved is not None and saved != {k: v for k, v in want.items() if k in saved}:
      raise UserError(f"--resume: the checkpoint at step {step} was taken at data position {saved}, but the data now "
                      f"puts that step at {want} (the training split changed); resume with the same data or start a "
                      "new --run-dir.")


class HostFeed(SplitFeed):
  """A multi-process run's split (`hostrows.Rows`), in SplitFeed's order: this process tokenises only the rows
  at positions `part` of the batches of steps 0 .. steps-1 (those its devices hold, `batching.local_rows`) and
  learns the lengths of the others' rows by `Rows.exchange`. With group_by_length the order itself depends on
  every row's length, so each process first tokenises an equal block of the split, and the lengths are
  exchanged before the order is drawn (its own rows outside that block are tokenised after). On --resume it
  still tokenises from step 0: the step restored is known only once the state is read, after the data."""

  def __init__(self, data: hostrows.Rows, batch_size: int, seed: int, group_by_length: bool, part: slice,
               steps: int):
    super().__init__(data, batch_size, seed, group_by_length)
    if group_by_length:
      data.fetch(np.array_split(np.arange(len(data)), jax.process_count())[jax.process_index()])
      data.exchange()
    mine = [rows[part] for _, rows in self.batches(0, steps)]  # train batches are full: `part` is in range
    data.fetch(np.concatenate(mine) if mine else np.zeros(0, np.int64))
    data.exchange()

  @property
  def tokenized(self) -> list[int] | None:
    return self.data.tokenized


class StreamFeed:
  """A streamed split (`stream.LMStream`): one batch per step, continued from the saved position on resume."""
  per_epoch = None  # unknown: a stream's length is not read ahead
  tokenized = None  # each process reads and encodes the whole stream

  def __init__(self, source: stream.LMStream):
    self.source = source
    self.start: stream.Position | None = None  # where step `start` of `batches` begins
    self.last: stream.Position | None = None  # the position after the latest batch handed out

  def batches(self, start: int, stop: int) -> Iterator[tuple[Any, np.ndarray]]:
    for data, self.last in itertools.islice(self.source.batches(self.start), stop - start):
      yield data, np.arange(len(data))

  def position(self, step: int) -> dict[str, Any]:
    """After step `step`: that of the latest batch handed out, so ask before taking the next batch."""
    del step
    return {"stream": self.last}

  def epoch(self, step: int) -> float:
    del step
    return float(self.last["epoch"]) if self.last else 0.0

  def resume(self, saved: dict[str, Any] | None, step: int) -> None:
    if not saved or "stream" not in saved:
      raise UserError(f"--resume: the checkpoint at step {step} holds no stream position (it was not taken by a "
                      "streaming run); resume with the run's own config or start a new --run-dir.")
    self.start = saved["stream"]

  @property
  def max_token_id(self) -> int:
    """The largest token id of the first batch (reading it again costs one window)."""
    first, _ = next(self.source.batches(self.start))
    return first.max_token_id

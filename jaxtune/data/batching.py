"""Fixed-shape batches: seeded per-epoch order, padding to a few bucket lengths, device placement."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxtune.data.classification import Encoded


def pad_length(longest: int, buckets: Sequence[int], max_len: int) -> int:
  """The smallest bucket that fits `longest`; max_len without buckets (one compiled shape)."""
  return next((b for b in buckets if b >= longest), max_len)


def train_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                  group_by_length: bool) -> list[np.ndarray]:
  """Row indices of each full batch of one epoch, a pure function of (seed, epoch)."""
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(lengths))
  if group_by_length:  # sort within windows of 50 batches, then shuffle the batches (as HF does)
    window = 50 * batch_size
    order = np.concatenate([w[np.argsort(-lengths[w], kind="stable")]
                            for w in np.split(order, range(window, len(order), window))])
  n = len(order) // batch_size
  batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(n)]
  if group_by_length:
    batches = [batches[i] for i in rng.permutation(n)]
  return batches


def step_batches(lengths: np.ndarray, batch_size: int, seed: int, group_by_length: bool, per_epoch: int,
                 start: int, stop: int) -> Iterator[np.ndarray]:
  """Row indices of the batches of steps start .. stop-1: each epoch's seeded order, entered mid-epoch on resume."""
  step = start
  while step < stop:
    epoch, offset = divmod(step, per_epoch)
    for rows in train_batches(lengths, batch_size, seed, epoch, group_by_length)[offset:offset + stop - step]:
      yield rows
      step += 1


def eval_batches(n: int, batch_size: int) -> list[np.ndarray]:
  """Every row once, in order; the last batch may be short (collate pads it with weight-0 rows)."""
  return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def encoder_batch(data: Any, rows: np.ndarray, batch_size: int, buckets: Sequence[int], max_len: int,
                  part: slice = slice(None)) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """(padded input_ids, attention_mask, token_type_ids (B x L) and weights (B); the data rows in it) of a batch.

  `data` has ragged input_ids and token_type_ids. L comes from the lengths of every row of the global batch;
  only rows `part` of it are built (a process's share, the only rows read); positions past the real rows are
  padding with weight 0.
  """
  length = pad_length(int(data.lengths[rows].max()), buckets, max_len)
  mine = np.arange(batch_size)[part]  # positions in the global batch; those >= len(rows) are padding
  real = rows[mine[mine < len(rows)]]
  batch = {k: np.zeros((len(mine), length), np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
  for i, r in enumerate(real):
    n = len(data.input_ids[r])
    batch["input_ids"][i, :n] = data.input_ids[r]
    batch["token_type_ids"][i, :n] = data.token_type_ids[r]
    batch["attention_mask"][i, :n] = 1
  batch["weights"] = (np.arange(len(mine)) < len(real)).astype(np.float32)
  return batch, real


def per_row(values: np.ndarray, real: np.ndarray, n: int) -> np.ndarray:
  """values[real] in the first rows of an n-row int32 column, 0 after them (padding rows)."""
  out = np.zeros(n, np.int32)
  out[:len(real)] = values[real]
  return out


def collate(data: Encoded, rows: np.ndarray, batch_size: int, buckets: Sequence[int], max_len: int,
            part: slice = slice(None)) -> dict[str, np.ndarray]:
  """Classification batch: `encoder_batch`'s arrays and labels (B)."""
  batch, real = encoder_batch(data, rows, batch_size, buckets, max_len, part)
  batch["labels"] = per_row(data.labels, real, len(batch["weights"]))
  return batch


@functools.cache  # called for every batch; the answer depends only on the sharding and the batch size
def local_rows(sharding: NamedSharding, batch_size: int) -> slice:
  """The block of a global batch's rows that this process's devices hold."""
  spans = {(s.start or 0, batch_size if s.stop is None else s.stop)
           for s, *_ in sharding.addressable_devices_indices_map((batch_size,)).values()}
  lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
  if sum(b - a for a, b in spans) != hi - lo:
    raise ValueError(f"this process holds batch rows {sorted(spans)}, not one block; order the mesh so that "
                     "each process's devices are adjacent on the batch axes.")
  return slice(lo, hi)


def to_device(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Global arrays from this process's rows of a batch (all of them when there is one process)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

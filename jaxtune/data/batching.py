"""Fixed-shape batches: seeded per-epoch order, padding to a few bucket lengths, device placement."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

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


def collate(data: Encoded, rows: np.ndarray, batch_size: int, buckets: Sequence[int], max_len: int,
            part: slice = slice(None)) -> dict[str, np.ndarray]:
  """Padded numpy batch: input_ids, attention_mask, token_type_ids (B x L), labels, weights (B).

  L comes from every row of the global batch; only rows `part` of it are built (a process's share).
  """
  length = pad_length(max(len(data.input_ids[r]) for r in rows), buckets, max_len)
  mine = np.arange(batch_size)[part]  # positions in the global batch; those >= len(rows) are padding
  real = rows[mine[mine < len(rows)]]
  batch = {k: np.zeros((len(mine), length), np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
  for i, r in enumerate(real):
    n = len(data.input_ids[r])
    batch["input_ids"][i, :n] = data.input_ids[r]
    batch["token_type_ids"][i, :n] = data.token_type_ids[r]
    batch["attention_mask"][i, :n] = 1
  batch["labels"] = np.zeros(len(mine), np.int32)
  batch["labels"][:len(real)] = data.labels[real]
  batch["weights"] = (np.arange(len(mine)) < len(real)).astype(np.float32)
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

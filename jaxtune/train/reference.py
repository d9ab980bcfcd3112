"""DPO's reference log-probabilities (task preference), precomputed once from the starting weights.

Each pair row's summed response log-probability under the reference policy is computed before the first step (no
dropout, the eval batch size) and kept beside the rows (data/preference.Pairs.ref_logps), so the step runs one
forward pass, not two, and holds no second model; the values go to the run dir (reference_logps.npz), so a
resumed run reads them instead of the pretrained weights it no longer loads. As TRL's precompute_ref_log_probs.
"""

from __future__ import annotations

import io
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxtune import sharding, storage
from jaxtune.config import Config
from jaxtune.data import preference
from jaxtune.errors import UserError
from jaxtune.models.model import Model
from jaxtune.params import Params
from jaxtune.train import steps

FILE = "reference_logps.npz"


def fill(model: Model, task: Any, params: Params, data: preference.Pairs, cfg: Config,
         batch_sharding: jax.sharding.NamedSharding) -> None:
  """Computes every row's reference log-probability under `params` into data.ref_logps (in place)."""
  shards = sharding.batch_shards(batch_sharding.mesh, model.rules)
  dtype = jnp.dtype(cfg.model.compute_dtype)

  def step(params: Params, batch: dict[str, jax.Array]) -> jax.Array:
    head = steps.head_for(model, task, cfg.train.loss_vocab_block, batch, shards)
    return task.row_logps(model.apply(params, batch, dtype=dtype, **head)["logits"], batch)

  jitted = jax.jit(step, in_shardings=(model.held[1], batch_sharding),
                   out_shardings=sharding.replicated(batch_sharding.mesh))
  size = cfg.train.eval_batch_size
  order = np.argsort(data.lengths, kind="stable")  # similar lengths together: fewer pad tokens per batch
  for start in range(0, len(data), size):
    pairs = order[start:start + size]
    out = np.asarray(jax.device_get(jitted(params, steps.device_batch(task, data, pairs, size, cfg, batch_sharding))))
    rows = np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)
    data.ref_logps[rows] = out[:len(rows)]


def precompute(model: Model, task: Any, params: Params, splits: dict[str, Any], cfg: Config,
               batch_sharding: jax.sharding.NamedSharding) -> None:
  """fill() for every split of the run."""
  for data in splits.values():
    fill(model, task, params, data, cfg, batch_sharding)


def save(run_dir: epath.Path, splits: dict[str, Any]) -> None:
  """Writes the splits' reference log-probabilities to the run dir (atomically; process 0)."""
  if jax.process_index() != 0:
    return
  buf = io.BytesIO()
  np.savez(buf, **{name: data.ref_logps for name, data in splits.items()})
  storage.write_bytes(run_dir / FILE, buf.getvalue())


def restore(run_dir: epath.Path, splits: dict[str, Any]) -> None:
  """Reads the run's reference log-probabilities back into its splits (--resume)."""
  path = run_dir / FILE
  if not path.exists():
    raise UserError(f"--resume: {path} is missing, and the DPO reference log-probabilities of the starting weights "
                    "cannot be recomputed from a checkpoint; restore the file or start the run again.")
  with np.load(io.BytesIO(path.read_bytes())) as saved:
    for name, data in splits.items():
      if name not in saved or saved[name].shape != data.ref_logps.shape:
        raise UserError(f"--resume: {path} does not hold the {len(data.ref_logps)} reference log-probabilities of "
                        f"split {name} (the data changed since the run started); resume with the run's data.")
      data.ref_logps[:] = saved[name]

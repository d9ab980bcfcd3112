"""One AdamW step of each causal LM checkpoint on a mesh:
python tests/family_step.py DATA FSDP TENSOR MODEL_DIR OUT.npz [MODEL_DIR OUT.npz ...]

Writes each step's loss, gradient norm (and an MoE's aux_loss), every param before and after (gathered) and, per
param, whether its array is split over the devices and its PartitionSpec. tests/test_family_meshes.py runs it once for
all its checkpoints (one process start and jax import) with 8 simulated devices and compares with 1."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import params as params_lib
from jaxtune import sharding
from jaxtune.config import MeshConfig, ModelConfig, OptimConfig
from jaxtune.data import batching
from jaxtune.tasks import TASKS
from jaxtune.train import optim, steps
from jaxtune.weights import pretrained

OPT = OptimConfig(lr=1e-2, schedule="constant")


def step_once(model_dir: str, data: int, fsdp: int, tensor: int) -> dict[str, np.ndarray]:
  mesh = sharding.make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
  model_cfg = ModelConfig(path=model_dir, new_params=())
  hf_config, reader = pretrained.open_checkpoint(model_cfg)
  model = pretrained.from_config(hf_config, model_cfg, 0, mesh, head="causal_lm")
  tx = optim.make(OPT, 10)
  shardings = steps.state_shardings(model, tx)
  state = steps.init_state(model, pretrained.load_params(model, model_cfg, reader, 0), tx, 0, shardings)
  train_step = steps.make_train_step(model, TASKS["causal_lm"], tx, optim.schedule(OPT, 10), jnp.float32, shardings,
                                     sharding.batch_sharding(mesh))
  batch = lm_batch()
  before = {f"before/{p}": np.asarray(jax.device_get(x)) for p, x in params_lib.flatten(state.params).items()}
  state, metrics = train_step(state, batching.to_device(batch, sharding.batch_sharding(mesh)))
  flat = params_lib.flatten(state.params)
  out = {**before, **{f"param/{p}": np.asarray(jax.device_get(x)) for p, x in flat.items()}}
  out.update({f"split/{p}": np.asarray(not x.sharding.is_fully_replicated) for p, x in flat.items()})
  out.update({f"spec/{p}": np.asarray(str(x.sharding.spec)) for p, x in flat.items()})
  out.update({k: np.asarray(v) for k, v in metrics.items() if k in ("loss", "grad_norm", "aux_loss")})
  return out


def lm_batch() -> dict[str, np.ndarray]:
  """8 right-padded rows of 6 to 16 tokens, each predicting its next token."""
  rng = np.random.default_rng(0)
  segment_ids = (np.arange(16) < rng.integers(6, 17, 8)[:, None]).astype(np.int32)
  tokens = rng.integers(1, 99, (8, 16)).astype(np.int32) * segment_ids
  end = np.zeros((8, 1), np.int32)
  return {"input_ids": tokens, "targets": np.concatenate([tokens[:, 1:], end], 1), "segment_ids": segment_ids,
          "positions": (np.arange(16) * segment_ids).astype(np.int32),
          "loss_mask": np.concatenate([segment_ids[:, 1:], end], 1).astype(np.float32)}


if __name__ == "__main__":
  data, fsdp, tensor, *pairs = sys.argv[1:]
  for model_dir, out in zip(pairs[::2], pairs[1::2], strict=True):
    np.savez(out, **step_once(model_dir, int(data), int(fsdp), int(tensor)))

"""Where a causal-LM run's float32 numbers stand against float64: the loss and whole gradient of jaxtune and of
float32 PyTorch (transformers, torch_ref's model holding the same weights) on given training batches, each
against float64 PyTorch, at a run's saved params or the pretrained ones; and the run's params scored by both
scorers. `jaxtune grad-precision` runs it (docs/fidelity.md, the SmolLM2 seeds study)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxtune import params as params_lib
from jaxtune import sharding
from jaxtune.config import Config, MeshConfig
from jaxtune.data import batching
from jaxtune.tasks import TASKS
from jaxtune.tools import torch_ref
from jaxtune.train import restore, setup, steps
from jaxtune.weights import export, pretrained


def _relative(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
  return float(np.sqrt(sum(np.sum((got[k] - want[k]) ** 2) for k in want) / sum(np.sum(want[k] ** 2) for k in want)))


def _torch_grads(module: torch.nn.Module, batch: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
  module.zero_grad()
  per_token, weight, _ = torch_ref.per_target_loss(module, "causal_lm", batch)
  loss = (per_token * weight).sum() / weight.sum()
  loss.backward()
  return float(loss.detach()), {n: p.grad.double().numpy() for n, p in module.named_parameters()}


def measure(cfg: Config, run_dir: str | None, batch_indices: Sequence[int],
            score_limit: int | None = None) -> dict[str, Any]:
  """Per batch: the three losses and each float32 gradient's relative error against float64's; with `run_dir`,
  also its params' test score (`score_limit` rows) by jaxtune's scorer and by the reference's."""
  mesh = sharding.make_mesh(MeshConfig())
  task = TASKS["causal_lm"]
  tokenizer = pretrained.load_tokenizer(cfg.model)
  data = task.load(cfg, tokenizer, ["train"])[1]["train"]
  per_epoch, total = setup.total_steps(cfg, len(data))
  batches = list(batching.step_batches(data.lengths, cfg.train.batch_size, cfg.train.seed, cfg.data.group_by_length,
                                       per_epoch, 0, total))
  if run_dir:
    _, model, params, _, step = restore.restore(run_dir, "latest", mesh)
  else:
    model, params = pretrained.from_pretrained(cfg.model, 0, mesh, cfg.train.seed, "causal_lm")
    step = 0
  flat = {k: np.asarray(v) for k, v in params_lib.flatten(params).items()}
  t32 = torch_ref.build(model, flat, None)[0]
  t64 = torch_ref.build(model, flat, None)[0].double()
  grad = jax.jit(jax.value_and_grad(lambda p, b: steps.loss_fn(model, task, p, b, jnp.float32, None)[0]))
  rows = []
  for i in batch_indices:
    batch = task.collate(data, batches[i], cfg.train.batch_size, cfg)
    loss, g = grad(params, jax.tree.map(jnp.asarray, batch))
    ours = export.hf_tensors(model, {k: np.asarray(v, np.float64) for k, v in params_lib.flatten(g).items()})
    loss32, g32 = _torch_grads(t32, batch)
    loss64, g64 = _torch_grads(t64, batch)
    rows.append({"batch": i, "loss": {"jaxtune": float(loss), "torch_float32": loss32, "torch_float64": loss64},
                 "gradient_error_vs_float64": {"jaxtune": _relative(ours, g64), "torch_float32": _relative(g32, g64)}})
  out: dict[str, Any] = {"params": f"{run_dir} step {step}" if run_dir else "pretrained", "batches": rows}
  if run_dir:  # the same params, scored by jaxtune's eval step (as evaluate.py) and by the reference's scorer
    test = task.load(cfg, tokenizer, ["test"], limit=score_limit)[1]["test"]
    batch_sharding = sharding.batch_sharding(mesh)
    eval_step = steps.make_eval_step(model, task, jnp.float32, batch_sharding)
    out["test_loss"] = {"jaxtune": steps.evaluate(eval_step, params, test, cfg, batch_sharding, task, None)["loss"],
                        "torch_float32": torch_ref.score(t32, "causal_lm", test, cfg, None)["loss"],
                        "torch_float64": torch_ref.score(t64, "causal_lm", test, cfg, None)["loss"]}
  return out

"""AdamW with warmup + decay, global-norm clipping and weight decay only on matrices."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxtune.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to lr over warmup_steps, then linear/cosine decay to 0 or constant."""
  warmup = min(cfg.warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  after = {
      "linear": optax.linear_schedule(cfg.lr, 0.0, decay_steps),
      "cosine": optax.cosine_decay_schedule(cfg.lr, decay_steps),
      "constant": optax.constant_schedule(cfg.lr),
  }[cfg.schedule]
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


# Leaf names HF Trainer does not decay: biases and norm scales, and T5's relative-position bias table (the
# Trainer skips every parameter whose name contains "bias": relative_attention_bias.weight).
NO_DECAY = ("bias", "scale", "position_bias")


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: every param whose leaf name is not in NO_DECAY."""
  return jax.tree_util.tree_map_with_path(lambda path, _: str(path[-1].key) not in NO_DECAY, params)


def make(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  chain.append(optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*chain)

"""AdamW with warmup + decay, global-norm clipping and weight decay only on matrices."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtune.config import OptimConfig


def hyperparams(cfg: OptimConfig, total_steps: int) -> np.ndarray:
  """[peak lr, warmup steps, decay steps, weight decay] as float32: what `AdamW.transform` reads at run time, so
  that a run differing only in these (train.max_steps, epochs, optim.lr, warmup_steps, weight_decay) compiles
  the very same train step and finds it in the persistent compile cache."""
  warmup = min(cfg.warmup_steps, total_steps)
  return np.asarray([cfg.lr, warmup, max(total_steps - warmup, 1), cfg.weight_decay], np.float32)


def schedule_of(kind: str, hyper: Any) -> optax.Schedule:
  """Linear warmup from 0 to lr over warmup steps, then linear/cosine decay to 0 or constant, from `hyper` (a
  concrete or traced `hyperparams`): optax's linear_schedule, cosine_decay_schedule and join_schedules written
  with array ops only, so their lengths need not be Python numbers."""
  lr, warmup, decay = hyper[0], hyper[1], hyper[2]

  def at(count: Any) -> jax.Array:
    count = jnp.asarray(count, jnp.float32)
    ramp = lr * jnp.clip(count, 0, warmup) / jnp.maximum(warmup, 1.0)  # optax.linear_schedule(0, lr, warmup)
    after = jnp.clip(count - warmup, 0, decay)
    tail = {"linear": lambda: lr * (1 - after / decay),
            "cosine": lambda: lr * 0.5 * (1 + jnp.cos(jnp.pi * after / decay)),
            "constant": lambda: lr + 0 * after}[kind]()
    return jnp.where((warmup > 0) & (count < warmup), ramp, tail)

  return at


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """The learning rate at each step (see schedule_of) of a run of `total_steps`."""
  return schedule_of(cfg.schedule, hyperparams(cfg, total_steps))


# Leaf names HF Trainer does not decay: biases and norm scales, and T5's relative-position bias table (the
# Trainer skips every parameter whose name contains "bias": relative_attention_bias.weight).
NO_DECAY = ("bias", "scale", "position_bias")


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: every param whose leaf name is not in NO_DECAY."""
  return jax.tree_util.tree_map_with_path(lambda path, _: str(path[-1].key) not in NO_DECAY, params)


@dataclasses.dataclass(frozen=True, eq=False)
class AdamW:
  """AdamW with clipping, the schedule and the decay mask, as an optax transformation (`init`, `update`) of
  `hyper`; `transform(traced)` builds the same chain inside a jitted step from a traced copy of it (the
  train step takes it as an argument: steps.make_train_step)."""
  cfg: OptimConfig
  hyper: np.ndarray

  def transform(self, hyper: Any) -> optax.GradientTransformation:
    clip = [optax.clip_by_global_norm(self.cfg.clip_norm)] if self.cfg.clip_norm > 0 else []
    return optax.chain(*clip, self.adamw(hyper))

  def adamw(self, hyper: Any) -> optax.GradientTransformation:
    """The chain's AdamW, after the clipping: the schedule, the moments and the masked weight decay."""
    cfg = self.cfg
    return optax.adamw(schedule_of(cfg.schedule, hyper), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=hyper[3],
                       mask=decay_mask)

  @property
  def init(self) -> Any:
    return self.transform(self.hyper).init

  @property
  def update(self) -> Any:
    return self.transform(self.hyper).update


def make(cfg: OptimConfig, total_steps: int) -> AdamW:
  return AdamW(cfg, hyperparams(cfg, total_steps))

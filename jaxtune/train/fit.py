"""Fit before start: the train step compiled for the run's own devices, before any weight is read, against what
those devices hold; a run that cannot fit is refused with its need, the capacity and the cheapest change that fits.

The check compiles the very step the run then takes (same function, avals, shardings and donation), so jit finds
that executable again at the first step of the largest batch shape: it costs no second compile. Memory is XLA's
own buffer assignment for one device (`memory_analysis`); capacity is the accelerator's `bytes_limit`, or on a CPU
the host's available RAM shared by its local devices. `jaxtune plan` (tools/plan.py) uses the same pieces for
devices that are not there.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from jaxtune.config import Config
from jaxtune.errors import UserError
from jaxtune.train import estimate, steps

GiB = estimate.GiB


def batch_structs(cfg: Config, batch_sharding: jax.sharding.NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
  """A full train batch of train.batch_size x data.max_len as the task's collate lays it out (keys, dtypes)."""
  b, length = cfg.train.batch_size, cfg.data.max_len
  i32, f32 = jnp.int32, jnp.float32
  encoder = {"input_ids": ((b, length), i32), "attention_mask": ((b, length), i32),
             "token_type_ids": ((b, length), i32), "weights": ((b,), f32)}
  shapes = {
      "causal_lm": {**{k: ((b, length), i32) for k in ("input_ids", "targets", "segment_ids", "positions")},
                    "loss_mask": ((b, length), f32)},
      "seq2seq": {"input_ids": ((b, length), i32), "attention_mask": ((b, length), i32),
                  "labels": ((b, cfg.data.max_target_len), i32), "label_mask": ((b, cfg.data.max_target_len), f32)},
      "classification": {**encoder, "labels": ((b,), i32)},
      "question_answering": {**encoder, "start_positions": ((b,), i32), "end_positions": ((b,), i32)},
      "token_classification": {**encoder, "labels": ((b, length), i32)},
      # a chosen and a rejected row per pair, and their reference log-probs
      "preference": {**{k: ((2 * b, length), i32) for k in ("input_ids", "targets", "segment_ids", "positions")},
                     "loss_mask": ((2 * b, length), f32), "ref_logps": ((2 * b,), f32)},
  }[cfg.task]
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding) for k, (shape, dtype) in shapes.items()}




def per_device(tree: Any) -> float:
  """Bytes one device holds of a tree of placed ShapeDtypeStructs (its largest shard: shards are even here)."""
  return float(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def compiled_memory(state: steps.TrainState, compiled: Any) -> dict[str, float]:
  """Per-device memory of a compiled step: the state's parts from their shardings, the rest from XLA's buffer
  assignment (memory_analysis: arguments, outputs, aliases and temporaries of one device's program)."""
  m = compiled.memory_analysis()
  parts = {"params": per_device(state.params), "frozen_params": per_device(state.frozen),
           "optimizer": per_device(state.opt_state)}
  parts["other_arguments"] = m.argument_size_in_bytes - sum(parts.values())
  parts["temporaries"] = float(m.temp_size_in_bytes)
  parts["unaliased_outputs"] = float(m.output_size_in_bytes - m.alias_size_in_bytes)
  return {**parts, "total": sum(parts.values())}


UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}  # XLA's HumanReadableNumBytes: binary units


def out_of_memory(state: steps.TrainState, error: str) -> dict[str, float] | None:
  """Per-device memory as the TPU compiler's RESOURCE_EXHAUSTED error states it: either the temporaries alone
  ("the total memory required for HLO temporaries (36.12G) exceeds available HBM") or everything ("Used 20.5G of
  15.75G hbm"); the state's parts come from their shardings. None for another error."""
  size = r"([\d.]+)([KMGT]?)(?:i?B)?"
  temps = re.search(rf"HLO temporaries \({size}\)", error)
  used = re.search(rf"Used {size} of {size} hbm", error)
  if "RESOURCE_EXHAUSTED" not in error or not (temps or used):
    return None
  parts = {"params": per_device(state.params), "frozen_params": per_device(state.frozen),
           "optimizer": per_device(state.opt_state), "other_arguments": 0.0}
  if temps:
    parts["temporaries"] = float(temps.group(1)) * UNITS[temps.group(2)]
  else:
    parts["temporaries"] = max(float(used.group(1)) * UNITS[used.group(2)] - sum(parts.values()), 0.0)
  parts["unaliased_outputs"] = 0.0
  return {**parts, "total": sum(parts.values())}


def capacity_per_device(mesh: jax.sharding.Mesh) -> tuple[float | None, str]:
  """(bytes one device may use, what that is): an accelerator's allocator limit, or on a CPU the host's available
  RAM (MemAvailable) over its local devices; None where neither is known."""
  device = mesh.devices.flat[0]
  if device.platform != "cpu":
    limit = (device.memory_stats() or {}).get("bytes_limit")
    return (float(limit), f"{device.device_kind} memory") if limit else (None, "")
  try:
    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines())
  except OSError:
    return None, ""
  local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
  available = float(meminfo["MemAvailable"].split()[0]) * 1024
  return available / local, f"available RAM{f' / {local} devices' if local > 1 else ''}"


def check(cfg: Config, state: steps.TrainState, train_step: Any, batch_sharding: jax.sharding.NamedSharding,
          build: Any) -> dict[str, float] | None:
  """Compiles `train_step` on the abstract `state` and a full batch; raises UserError when one device's share
  exceeds its capacity. `build(cfg) -> (model, mesh shape)` describes a changed config for the suggestion."""
  capacity, what = capacity_per_device(batch_sharding.mesh)
  try:
    memory = compiled_memory(state, train_step.lower(state, batch_structs(cfg, batch_sharding)).compile())
  except Exception as e:  # noqa: BLE001 -- XLA:TPU refuses a program that cannot fit, saying what it needs
    memory = out_of_memory(state, str(e))
    if memory is None:
      raise
  if capacity is None or memory["total"] <= capacity:
    return memory
  parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in memory.items() if k != "total" and v > 0)
  scale = memory["total"] / max(estimate.estimate(cfg, *build(cfg))["total"], 1.0)
  fix = estimate.suggest(cfg, build, capacity, scale)
  if fix:
    change = (f"the cheapest change that fits: {' '.join(fix['overrides'])} (estimated "
              f"{fix['estimated_total_bytes'] / GiB:.2f} GiB: {fix['why']})")
  else:
    change = "no config change found that fits; use more devices or a smaller model"
  raise UserError(f"this run does not fit: its train step needs {memory['total'] / GiB:.2f} GiB per device ({parts} "
                  f"GiB) and a device has {capacity / GiB:.2f} GiB ({what}); {change}.")

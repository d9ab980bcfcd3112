"""`jaxtune plan` (scripts/plan.py): whether a config's training step fits a TPU slice or a GPU node, and how fast it
could run there, found before any accelerator is rented.

On a TPU topology the real train step (steps.make_train_step, wired as train/setup.py wires a run) is compiled for
compile-only devices of a topology description, which libtpu provides on any host: the model is described
abstractly, state and batch are ShapeDtypeStructs in their shardings, no weight is read. XLA's buffer assignment
then says what one device holds. GPUs have no deviceless compile, so there memory is train/estimate.py's analytic model.
FLOPs always come from the model's shape: XLA's cost analysis counts a scanned layer's body once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxtune import sharding
from jaxtune.config import Config, MeshConfig
from jaxtune.errors import UserError
from jaxtune.models.model import Model
from jaxtune.tasks import task_for
from jaxtune.train import estimate as estimate_lib
from jaxtune.train import fit, optim, perf, setup, steps
from jaxtune.train.estimate import GiB
from jaxtune.weights import pretrained


@dataclasses.dataclass(frozen=True)
class Chip:
  kind: str  # jax's device_kind (perf.VENDOR_BF16_PEAKS matches its bf16 peak)
  hbm_bytes: float  # per chip, from the vendor's datasheet


# TPU chips by their topology-name prefix, GPUs by --gpu. HBM per chip: Cloud TPU system architecture pages
# (v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB); NVIDIA datasheets (H100 SXM 80 GB, H200 141 GB).
CHIPS = {"v4": Chip("TPU v4", 32 * GiB), "v5e": Chip("TPU v5 lite", 16 * GiB), "v5p": Chip("TPU v5", 95 * GiB),
         "v6e": Chip("TPU v6 lite", 32 * GiB), "h100": Chip("NVIDIA H100", 80e9), "h200": Chip("NVIDIA H200", 141e9)}
GPUS = ("h100", "h200")
TIGHT = 0.9  # above this share of HBM the plan warns: allocator fragmentation and runtime buffers need some room


@dataclasses.dataclass(frozen=True)
class Target:
  """What the plan is for: `count` devices of `chip`; `devices` are compile-only TPU devices (None for GPUs)."""
  name: str
  chip: Chip
  count: int
  devices: tuple[Any, ...] | None
  hbm_per_device: float
  peak_per_device: float


def tpu_target(topology: str, hbm_gib: float | None = None) -> Target:
  """The compile-only devices of a TPU topology such as v5e:2x4 or v5p:4x4x4 (libtpu must be installed)."""
  chip = CHIPS.get(topology.split(":")[0])
  if chip is None or topology.split(":")[0] in GPUS or ":" not in topology:
    raise UserError(f"--topology {topology}: give a TPU generation and chip grid, e.g. v5e:2x4 or v5p:4x4x4 "
                    f"(generations: {', '.join(k for k in CHIPS if k not in GPUS)}).")
  from jax.experimental import topologies

  try:
    devices = tuple(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as e:  # noqa: BLE001 -- libtpu missing, or a grid the generation does not have
    raise UserError(f"--topology {topology}: no TPU topology description ({str(e).splitlines()[0][:200]}); "
                    "install jaxtune[tpu-compile] and give a grid the generation has.") from None
  chips = math.prod(int(n) for n in topology.split(":")[1].split("x"))
  per_chip = chips / len(devices)  # v4 without megacore: 2 devices share a chip
  return Target(topology, chip, len(devices), devices, hbm_gib * GiB if hbm_gib else chip.hbm_bytes * per_chip,
                (perf.vendor_peak_flops(chip.kind) or 0.0) * per_chip)


def gpu_target(gpu: str, count: int, hbm_gib: float | None = None) -> Target:
  chip = CHIPS[gpu]
  return Target(f"{count} x {gpu.upper()}", chip, count, None, hbm_gib * GiB if hbm_gib else chip.hbm_bytes,
                perf.vendor_peak_flops(chip.kind) or 0.0)


def describe_model(cfg: Config, hf_config: dict[str, Any], mesh: jax.sharding.Mesh, num_labels: int = 2) -> Model:
  """The model of `cfg` on `mesh`, abstract (as setup.prepare builds it, without reading a weight)."""
  labels = num_labels if cfg.task in ("classification", "token_classification") else 0
  model = pretrained.from_config(hf_config, cfg.model, labels, mesh, cfg.train.seed, cfg.task,
                                 sharding.rules_with(cfg.mesh.rules))
  setup.check_fits_model(cfg, model, {})
  return model


def lower_train_step(cfg: Config, hf_config: dict[str, Any], mesh: jax.sharding.Mesh,
                     num_labels: int = 2) -> tuple[Model, steps.TrainState, Any]:
  """(model, abstract train state, lowered train step) of `cfg` on `mesh`: the step a run would compile."""
  rules = sharding.rules_with(cfg.mesh.rules)
  sharding.check_batch_sizes(cfg.train, mesh, rules, ("batch_size",))
  model = describe_model(cfg, hf_config, mesh, num_labels)
  total = cfg.train.max_steps or 1000  # only the learning-rate schedule's constants depend on it
  tx = optim.make(cfg.optim, total)
  shardings = steps.state_shardings(model, tx)
  state = steps.abstract_state(model, tx, shardings)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  step = steps.make_train_step(model, task_for(cfg), tx, optim.schedule(cfg.optim, total),
                               jnp.dtype(cfg.model.compute_dtype), shardings, batch_sharding, cfg.train.grad_accum,
                               cfg.model.remat, cfg.train.nonfinite == "skip", cfg.train.loss_vocab_block)
  return model, state, step.lower(state, fit.batch_structs(cfg, batch_sharding))


def analytic_build(hf_config: dict[str, Any], count: int, num_labels: int):
  """cfg -> (model described on one host device, mesh shape over `count` devices): what train/estimate.py needs."""
  host = sharding.make_mesh(MeshConfig(data=1), jax.devices("cpu")[:1])

  def build(cfg: Config) -> tuple[Model, dict[str, int]]:
    return (describe_model(cfg, hf_config, host, num_labels),
            dict(zip(sharding.MESH_AXES, sharding.mesh_sizes(cfg.mesh, count), strict=True)))

  return build


def plan(cfg: Config, hf_config: dict[str, Any], target: Target, mfu: float = 0.4, num_labels: int = 2,
         config_name: str = "") -> dict[str, Any]:
  """Memory per device, FLOPs, roofline speed and a verdict (with a change that fits, when it does not)."""
  build = analytic_build(hf_config, target.count, num_labels)
  analytic_model, mesh_shape = build(cfg)
  analytic = estimate_lib.estimate(cfg, analytic_model, mesh_shape)
  out: dict[str, Any] = {"config": config_name, "target": target.name, "chip": target.chip.kind,
                         "devices": target.count, "hbm_per_device_bytes": target.hbm_per_device,
                         "peak_flops_per_device": target.peak_per_device, "mesh": mesh_shape}
  if target.devices is not None:
    mesh = sharding.make_mesh(cfg.mesh, target.devices)
    model, state, lowered = lower_train_step(cfg, hf_config, mesh, num_labels)
    tick = time.perf_counter()
    try:
      compiled = lowered.compile()
      memory = fit.compiled_memory(state, compiled)
      out["memory_source"] = "XLA buffer assignment of the compiled train step (memory_analysis), per device"
      out["splash_kernel_calls"] = sum("tpu_custom_call" in line and "splash" in line.lower()
                                       for line in compiled.as_text().splitlines())
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program that cannot fit
      memory = fit.out_of_memory(state, str(e))
      if memory is None:
        raise
      out["memory_source"] = "the TPU compiler's out-of-memory error (it does not finish a program that cannot fit)"
      out["compile_error"] = str(e).splitlines()[0][:300]
    out["compile_s"] = round(time.perf_counter() - tick, 1)
    out["devices_used"] = sharding.device_facts(mesh)
    out["analytic_total_bytes"] = analytic["total"]
  else:
    model, memory = analytic_model, analytic
    out["memory_source"] = ("ESTIMATE: analytic model (params, gradients and AdamW moments by their sharding, "
                            "activations from the shapes and model.remat); no deviceless GPU compile exists")
  out["memory_per_device_bytes"] = memory
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(model.abstract))
  trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(model.split(model.abstract)[0]))
  out["model"] = {"family": model.family, "params": params, "trainable_params": trainable,
                  "compute_dtype": cfg.model.compute_dtype, "remat": cfg.model.remat,
                  "scan_layers": cfg.model.scan_layers, "attention": cfg.model.attention, "lora": cfg.model.lora.on}
  tokens = cfg.train.batch_size * cfg.data.max_len
  flops, how = estimate_lib.flops_per_step(cfg, model)
  step_s = flops / (target.count * target.peak_per_device * mfu) if target.peak_per_device else None
  out["batch"] = {"batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
                  "max_len": cfg.data.max_len, "tokens_per_step": tokens}
  out["compute"] = {"flops_per_step": flops, "counted_as": how, "mfu": mfu, "step_s": step_s,
                    "tokens_per_s": tokens / step_s if step_s else None}
  share = memory["total"] / target.hbm_per_device
  out["fits"] = share <= 1.0
  out["hbm_share"] = share
  out["suggestion"] = None
  if not out["fits"]:
    scale = memory["total"] / analytic["total"] if target.devices is not None else 1.0
    out["suggestion"] = estimate_lib.suggest(cfg, build, target.hbm_per_device, scale)
  out["verdict"] = verdict(out)
  return out


def _shell_word(override: str) -> str:
  """An override as typed after scripts/plan.py (ours hold no $, backslash or double quote)."""
  return f'"{override}"' if re.search(r"[^\w.=,/:+-]", override) else override


def verdict(out: dict[str, Any]) -> str:
  share = out["hbm_share"]
  if out["fits"]:
    return f"fits: {100 * share:.1f}% of HBM per device" + (" (tight: little room for runtime buffers)"
                                                              if share > TIGHT else "")
  line = f"does not fit: {100 * share:.1f}% of HBM per device"
  s = out["suggestion"]
  if s is None:
    return line + ("; no change tried (fsdp over every device, remat full, microbatches, LoRA, a bfloat16 or NF4 "
                   "base) fits: use more devices")
  changes = " ".join(map(_shell_word, s["overrides"]))
  return (line + f"; would fit with {changes} (estimated {s['estimated_total_bytes'] / GiB:.2f} GiB per device; "
          "plan again with these overrides to confirm)")


def _count(n: float) -> str:
  return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def table(out: dict[str, Any]) -> str:
  """`plan`'s result as text: the target, model and mesh, the memory per device, speed and the verdict."""
  m, model, batch, compute = out["memory_per_device_bytes"], out["model"], out["batch"], out["compute"]
  unit, size = ("GiB", GiB) if max(m["total"], out["hbm_per_device_bytes"] / 16) >= GiB else ("MiB", 2**20)
  num = lambda x: f"{x / size:10.3f}"
  mesh = " x ".join(f"{k} {v}" for k, v in out["mesh"].items())
  lines = [f"plan: {out['config']} on {out['target']} ({out['devices']} x {out['chip']}, "
           f"{out['hbm_per_device_bytes'] / GiB:.1f} GiB HBM per device)",
           f"model: {model['family']}, {_count(model['params'])} params ({_count(model['trainable_params'])} that "
           f"train), compute {model['compute_dtype']}, remat {model['remat']}, scan_layers "
           f"{str(model['scan_layers']).lower()}, attention {model['attention']}",
           f"mesh: {mesh}; batch {batch['batch_size']} x {batch['max_len']} tokens, grad_accum {batch['grad_accum']}",
           f"memory per device in {unit}: {out['memory_source']}"
           + (f" (compiled in {out['compile_s']} s)" if "compile_s" in out else "")]
  names = {"params": "params that train (float32)", "frozen_params": "frozen params",
           "optimizer": "optimizer state (AdamW moments)", "other_arguments": "batch, step, key, layout padding",
           "temporaries": "temporaries (activations, gradients)", "unaliased_outputs": "outputs not aliased to inputs",
           "activations": "activations and logits (estimate)", "gradients": "gradients (float32, estimate)",
           "gathered_weights": "FSDP-gathered layer weights (estimate)"}
  lines += [f"  {names[k]:<40}{num(v)}" for k, v in m.items() if k != "total"]
  lines.append(f"  {'total':<40}{num(m['total'])}  of {num(out['hbm_per_device_bytes']).strip()} HBM "
               f"({100 * out['hbm_share']:.1f}%)")
  if "analytic_total_bytes" in out:
    lines.append(f"  {'(the analytic estimate of the total)':<40}{num(out['analytic_total_bytes'])}")
  if "splash_kernel_calls" in out:
    lines.append(f"attention: {out['splash_kernel_calls']} splash attention kernel calls in the compiled step"
                 + ("" if out["splash_kernel_calls"] else " (attention runs as XLA ops)"))
  lines.append(f"compute: {compute['flops_per_step']:.4g} FLOPs per step; {compute['counted_as']}")
  if compute["step_s"]:
    lines.append(f"roofline at {100 * compute['mfu']:.0f}% MFU of {out['devices']} x "
                 f"{out['peak_flops_per_device'] / 1e12:.0f} TFLOP/s (bf16 peak): {compute['step_s']:.4g} s per step, "
                 f"{compute['tokens_per_s']:,.0f} tokens/s")
  lines.append(f"verdict: {out['verdict']}")
  return "\n".join(lines)


def read_hf_config(cfg: Config, path: str | None) -> dict[str, Any]:
  """The model's config.json: `path` (--hf-config), else the one model.path holds (a local dir or GGUF file)."""
  if path:
    try:
      return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
      raise UserError(f"--hf-config {path}: cannot read it as JSON ({e}); give a model's config.json.") from None
  try:
    return pretrained.open_checkpoint(cfg.model)[0]
  except Exception as e:  # noqa: BLE001 -- a hub id on a host without the network, a missing dir
    raise UserError(f"model.path {cfg.model.path}: no config.json to plan from ({type(e).__name__}); pass "
                    "--hf-config path/to/config.json (configs/hf/ holds Llama 3 shapes).") from None

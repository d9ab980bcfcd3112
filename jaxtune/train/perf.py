"""Performance accounting: training FLOPs per token, the hardware's peak, MFU and peak memory.

FLOPs per token of one training step (forward + backward), as in the PaLM paper's appendix B:
    6 * N  +  12 * n_layers * L * (H * K)
N counts the weights that multiply every token: per layer the attention projections
(D x H*K for q, D x KV*K each for k and v, H*K x D for o) and the MLP (2 * D * F, or 3 * D * F for
gated MLPs), plus the LM head (D * V) for causal LMs. Embedding lookups do no matmul, and a
classifier's pooler and head run once per sequence, so neither is counted. The second term is the
attention scores and their weighted sum over all L x L pairs (causal masking is not discounted).
`6` is 2 FLOPs per multiply-add, times 3 for the forward pass and the two backward matmuls.
"""

from __future__ import annotations

import collections
import contextlib
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from jaxtune import sharding

# model_types whose MLP has three matrices (gate, up, down: SwiGLU or Gemma's GeGLU)
GATED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "qwen3_moe", "mixtral")
# Dense bf16 peaks from vendor datasheets (FLOP/s per chip), matched against jax's device_kind.
VENDOR_BF16_PEAKS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
    "TPU v6 lite": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12,
    "TPU v5": 459e12,  # a v5p reports its kind as "TPU v5"; after the v5 lite entries, which match first
}


def dims(hf: dict[str, Any]) -> tuple[int, int, int, int, int, int]:
  """(D, F, layers, heads, head dim, kv heads) of an HF config dict (GPT-2 spells them n_embd, n_inner, ...,
  DistilBERT dim, hidden_dim, ...)."""
  if hf["model_type"] in ("t5", "mt5"):  # encoder and decoder layers counted alike (cross-attention left out)
    layers = hf["num_layers"] + (hf.get("num_decoder_layers") or hf["num_layers"])
    return hf["d_model"], hf["d_ff"], layers, hf["num_heads"], hf["d_kv"], hf["num_heads"]
  if hf["model_type"] in ("bart", "marian"):
    d, heads = hf["d_model"], hf["encoder_attention_heads"]
    return d, hf["encoder_ffn_dim"], hf["encoder_layers"] + hf["decoder_layers"], heads, d // heads, heads
  d = hf.get("hidden_size") or hf.get("dim") or hf["n_embd"]
  heads = hf.get("num_attention_heads") or hf.get("n_heads") or hf["n_head"]
  f = hf.get("intermediate_size") or hf.get("hidden_dim") or hf.get("n_inner") or 4 * d
  layers = hf.get("num_hidden_layers") or hf.get("n_layers") or hf["n_layer"]
  return d, f, layers, heads, hf.get("head_dim") or d // heads, hf.get("num_key_value_heads") or heads


def matmul_params_per_token(hf: dict[str, Any], task: str) -> int:
  """N of the formula above, from an HF config dict."""
  d, f, layers, heads, head_dim, kv = dims(hf)
  attention = 2 * d * heads * head_dim + 2 * d * kv * head_dim
  mlp = (3 if hf["model_type"] in GATED else 2) * d * f
  if experts := hf.get("num_experts") or hf.get("num_local_experts"):  # an MoE: the router and a token's top-k experts
    mlp = d * experts + hf["num_experts_per_tok"] * 3 * d * (hf.get("moe_intermediate_size") or f)
  head = d * hf["vocab_size"] if task in ("causal_lm", "seq2seq", "preference") else 0
  return layers * (attention + mlp) + head


def train_flops_per_token(hf: dict[str, Any], length: int, task: str) -> float:
  """Training FLOPs per token at sequence length `length` (see the module docstring)."""
  _, _, layers, heads, head_dim, _ = dims(hf)
  return 6.0 * matmul_params_per_token(hf, task) + 12.0 * layers * length * heads * head_dim


def vendor_peak_flops(device_kind: str) -> float | None:
  """The datasheet bf16 peak of an accelerator, or None for a kind not in the table."""
  for name, peak in VENDOR_BF16_PEAKS.items():
    if name.lower() in device_kind.lower():
      return peak
  return None


def matmul_peak(side: str, dtype: str, n: int = 2048, reps: int = 5) -> float:
  """FLOP/s of the fastest of `reps` n x n matmuls in `dtype`, with jax (side "jax") or torch."""
  if side == "jax":
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = min(_timed(lambda: matmul(a).block_until_ready()) for _ in range(reps))
  else:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.ones((n, n), dtype=getattr(torch, dtype), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ a
    best = min(_timed(lambda: (a @ a, sync())) for _ in range(reps))
  return 2.0 * n**3 / best


def _timed(fn: Any) -> float:
  tick = time.perf_counter()
  fn()
  return time.perf_counter() - tick


def peak_rss_bytes() -> int:
  """This process's peak resident memory so far."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


_COMPILE_SECONDS = [0.0]  # jax's tracing, lowering and XLA compile (or persistent-cache load) time in this process
# function name: [XLA compiles (or cache loads), all seconds, XLA's seconds (the rest is tracing and lowering)]
_COMPILE_BY_FUNCTION: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])


def _on_event(event: str, duration: float, fun_name: str = "?", **_: Any) -> None:
  if event.startswith("/jax/core/compile/"):
    _COMPILE_SECONDS[0] += duration
    entry = _COMPILE_BY_FUNCTION[fun_name.removeprefix("jit(").removesuffix(")")]
    entry[1] += duration
    if event.endswith("backend_compile_duration"):
      entry[0] += 1
      entry[2] += duration


def compile_by_function(top: int = 8) -> dict[str, dict[str, float]]:
  """The functions that took the most compile time, slowest first: {name: {compiles, s, xla_s}}, where `s` is
  tracing, lowering and XLA's compile (or persistent-cache load), `xla_s` the last alone."""
  ranked = sorted(_COMPILE_BY_FUNCTION.items(), key=lambda kv: -kv[1][1])[:top]
  return {name: {"compiles": n, "s": round(seconds, 2), "xla_s": round(xla, 2)} for name, (n, seconds, xla) in ranked}


jax.monitoring.register_event_duration_secs_listener(_on_event)


def use_compile_cache(path: str) -> None:
  """Turns on jax's persistent compilation cache in `path` ("" leaves it off), unless JAX already has a dir."""
  if not path or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # skip programs cheaper to rebuild


def compile_seconds() -> float:
  """Seconds this process has spent tracing and compiling (jax's compile events) so far."""
  return _COMPILE_SECONDS[0]


class RunClock:
  """Where a run's wall time went: named phases, with the compile time inside each moved to `compile`."""

  def __init__(self, started: float | None = None):
    """`started`: perf_counter() when the script began; the time since then counts as `imports`."""
    self.started = time.perf_counter() if started is None else started
    self.seconds: dict[str, float] = collections.defaultdict(float)
    self.seconds["imports"] = time.perf_counter() - self.started
    self.compile_at_start = compile_seconds()
    self.first_step: dict[str, float] = {}

  def mark_first_step(self) -> None:
    """Call once the first train step is dispatched: records the wall and compile time it took to get there."""
    if not self.first_step:
      self.first_step = {"first_step_at_s": time.perf_counter() - self.started,
                         "compile_before_first_step_s": compile_seconds() - self.compile_at_start}

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    tick, compiled = time.perf_counter(), compile_seconds()
    try:
      yield
    finally:
      self.seconds[name] += time.perf_counter() - tick - (compile_seconds() - compiled)

  def other_seconds(self) -> float:
    """The seconds of every phase but `train` so far (compile excluded from each)."""
    return sum(v for k, v in self.seconds.items() if k != "train")

  def report(self, train_tokens: int, train_flops: float, mesh: Mesh | None = None,
             steps: StepTimes | None = None) -> dict[str, Any]:
    """The breakdown, throughput, MFU and peak memory, as a JSON-ready dict.

    The peak FLOP/s and device memory are those of the run's `mesh` (its first device on this host): the host's
    first device may be of another kind than the mesh's (default: all devices)."""
    mesh = mesh or Mesh(jax.devices(), ("devices",))
    device = mesh.local_devices[0]
    peak = vendor_peak_flops(device.device_kind) if device.platform != "cpu" else matmul_peak("jax", "float32")
    train_s = self.seconds["train"]
    stats = device.memory_stats() or {}
    return {"wall_s": time.perf_counter() - self.started, **{f"{k}_s": v for k, v in self.seconds.items()},
            "compile_s": compile_seconds() - self.compile_at_start, "compile_by_function": compile_by_function(),
            **self.first_step, "train_tokens": train_tokens,
            "tokens_per_s": train_tokens / train_s if train_s else None, "train_flops": train_flops,
            "devices": sharding.device_facts(mesh), "peak_flops": peak, "peak_source": "measured matmul" if device.platform == "cpu" else "vendor table",
            "mfu": train_flops / train_s / peak if train_s and peak else None,
            "peak_host_bytes": peak_rss_bytes(), "peak_device_bytes": stats.get("peak_bytes_in_use"),
            **({"train_by_length": steps.summary()} if steps is not None else {})}


class StepTimes:
  """The train loop's seconds per step, by the batch's padded length: where a mixed-length run's loop goes.

  A step's seconds run from the moment the previous step's metrics were read to the moment its own were, less
  any compile and any other phase (evaluation, checkpoints) in between. The loop dispatches a step before it reads
  the previous one, so while the host keeps ahead this is the device's time on the step; `waited` is the part the
  host spent blocked on the device, the rest the host's own work (collate, transfer, dispatch, logging) that the
  device did not hide. A shape's first step (`first_s`) pays its buffers' first allocation, and a step that ran
  while the host compiled the next one's new shape counts only what was left after the compile; the mean
  (`rest_mean_s`) leaves out both kinds (`timed_steps` says how many steps it is of).
  """

  def __init__(self, clock: RunClock):
    self.clock = clock
    self.by_length: dict[int, dict[str, float]] = {}
    self.last, self.compiled = self._now(), compile_seconds()

  def _now(self) -> float:
    """The wall clock less the compile and other phases so far: differences of it are train-loop time."""
    return time.perf_counter() - compile_seconds() - self.clock.other_seconds()

  def read(self, length: int, wait: Callable[[], Any]) -> Any:
    """Runs `wait` (the blocking read of a step of `length`, the next in order) and counts the step's time."""
    tick = time.perf_counter()
    out = wait()
    waited = time.perf_counter() - tick
    now, compiled = self._now(), compile_seconds()
    seconds, overlapped = max(now - self.last, 0.0), compiled > self.compiled  # a compile may outlast the step
    self.last, self.compiled = now, compiled
    entry = self.by_length.get(length)
    if entry is None:
      entry = self.by_length[length] = {"steps": 0, "s": 0.0, "waited_s": 0.0, "first_s": seconds,
                                        "timed_steps": 0, "timed_s": 0.0}
    elif not overlapped:
      entry["timed_steps"] += 1
      entry["timed_s"] += seconds
    entry["steps"] += 1
    entry["s"] += seconds
    entry["waited_s"] += min(waited, seconds)
    return out

  def summary(self) -> dict[str, dict[str, float]]:
    """Per padded length: steps, seconds, seconds waited on the device, the first step's, and the mean of the steps
    after it that ran with no compile beside them."""
    out = {}
    for length, e in sorted(self.by_length.items()):
      rest = e["timed_s"] / e["timed_steps"] if e["timed_steps"] else None
      out[str(length)] = {**{k: round(v, 4) for k, v in e.items() if k != "timed_s"},
                          "rest_mean_s": rest and round(rest, 4)}
    return out


def write_report(report: dict[str, Any], path: Path) -> str:
  """Writes `report` as JSON to `path` (atomically); returns it as a few lines of text."""
  import json

  from jaxtune import storage

  storage.write_text(path, json.dumps(report, indent=2) + "\n")
  phases = ("imports", "data", "weights", "setup", "compile", "train", "eval", "checkpoint")
  lines = ["where the time went: " + ", ".join(f"{k} {report[k + '_s']:.1f} s" for k in phases
                                               if report.get(k + "_s") is not None)
           + f" (wall {report['wall_s']:.1f} s)"]
  if report.get("first_step_at_s") is not None:
    lines.append(f"first step dispatched {report['first_step_at_s']:.1f} s after start, after "
                 f"{report['compile_before_first_step_s']:.1f} s of compile")
  if by_length := report.get("train_by_length"):
    lines.append("train steps by padded length: " + ", ".join(
        f"{n}: {e['steps']} steps, {e['s']:.1f} s ({e['s'] / e['steps']:.3f} s/step, "
        f"{100 * e['waited_s'] / max(e['s'], 1e-9):.0f}% of it waiting on the device)" for n, e in by_length.items()))
  mfu = f"{100 * report['mfu']:.1f}%" if report["mfu"] is not None else "-"
  device = report["peak_device_bytes"]
  lines.append(f"train {report['tokens_per_s'] or 0:.0f} tokens/s, MFU {mfu} of {report['peak_flops'] or 0:.3g} "
               f"FLOP/s ({report['peak_source']}); peak host memory {report['peak_host_bytes'] / 1e9:.2f} GB"
               + (f", device {device / 1e9:.2f} GB" if device else ""))
  return "\n".join(lines)

"""Host memory of loading a checkpoint (scripts/benchmark.py loadmem): a random Llama of about 2 GB in float32,
written as 3 safetensors files and an index, loaded by the real loader onto 8 simulated CPU devices (mesh fsdp=8)
in a fresh process per run; the peak RSS of the load minus the idle process, in bytes and per checkpoint byte.

Each run is its own process so that one load's pages never count towards the next. The worker is this file run
as a script (`python jaxtune/tools/loadmem.py DIR`) with PYTHONPATH set to the checkout under test, so the same
measurement runs against an older checkout's loader (`--code /tmp/old`, e.g. from `git worktree add /tmp/old
HEAD~1`): it uses only open_checkpoint, from_config and load_params, which every version has.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DEVICES = 8
# hidden 2048, GQA 32/8 heads, MLP 5632, 8 layers, 32000 tokens, untied: 492M params, 1.97 GB in float32.
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 2048,
         "intermediate_size": 5632, "num_hidden_layers": 8, "num_attention_heads": 32, "num_key_value_heads": 8,
         "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
         "tie_word_embeddings": False}
FILES = 3


def _shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  """HF LlamaForCausalLM key -> shape, in checkpoint order (embedding, layers, norm, head)."""
  d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
  shapes = {"model.embed_tokens.weight": (v, d)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}"
    shapes.update({f"{p}.input_layernorm.weight": (d,), f"{p}.post_attention_layernorm.weight": (d,),
                   f"{p}.self_attn.q_proj.weight": (d, d), f"{p}.self_attn.k_proj.weight": (kv, d),
                   f"{p}.self_attn.v_proj.weight": (kv, d), f"{p}.self_attn.o_proj.weight": (d, d),
                   f"{p}.mlp.gate_proj.weight": (f, d), f"{p}.mlp.up_proj.weight": (f, d),
                   f"{p}.mlp.down_proj.weight": (d, f)})
  shapes.update({"model.norm.weight": (d,), "lm_head.weight": (v, d)})
  return shapes


def write_checkpoint(out: Path, cfg: dict[str, Any] = LLAMA, files: int = FILES, seed: int = 0) -> int:
  """A random float32 checkpoint of `cfg` in `files` safetensors files plus model.safetensors.index.json; its bytes.

  The files are written one at a time, so the writer holds one file's tensors, never the whole model."""
  from safetensors.numpy import save_file

  out.mkdir(parents=True, exist_ok=True)
  shapes = _shapes(cfg)
  total = sum(4 * int(np.prod(s)) for s in shapes.values())
  rng = np.random.default_rng(seed)
  weight_map, part, size, names = {}, [], 0, list(shapes)
  for i, key in enumerate(names):
    part.append(key)
    size += 4 * int(np.prod(shapes[key]))
    filled = len(set(weight_map.values())) + 1
    if i == len(names) - 1 or (size >= total * filled / files and filled < files):
      name = f"model-{filled:05d}-of-{files:05d}.safetensors"
      save_file({k: rng.standard_normal(shapes[k], np.float32) * np.float32(0.02) for k in part}, out / name)
      weight_map.update({k: name for k in part})
      part = []
  (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": weight_map}))
  (out / "config.json").write_text(json.dumps(cfg))
  return total


def _status(field: str) -> int:
  """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) * 1024
  raise RuntimeError(f"no {field} in /proc/self/status")


def worker(model_dir: str) -> dict[str, Any]:
  """Loads `model_dir` onto a fsdp=DEVICES mesh; prints a JSON line of idle RSS, peak RSS during the load, seconds."""
  import jax

  import jaxtune
  from jaxtune import sharding
  from jaxtune.config import MeshConfig, ModelConfig
  from jaxtune.weights import pretrained

  mesh = sharding.make_mesh(MeshConfig(fsdp=DEVICES, data=1))
  model_cfg = ModelConfig(path=model_dir)
  hf_config, reader = pretrained.open_checkpoint(model_cfg)
  model = pretrained.from_config(hf_config, model_cfg, 2, mesh, head="causal_lm")
  jax.block_until_ready(jax.device_put(np.zeros(DEVICES, np.float32)))  # the runtime's own start-up, before idle
  idle = _status("VmRSS")
  try:  # resets VmHWM to the current RSS (Linux >= 4.0), so the peak is the load's, not the imports'
    Path("/proc/self/clear_refs").write_text("5")
    reset = True
  except OSError:
    reset = False
  start = time.perf_counter()
  params = jax.block_until_ready(pretrained.load_params(model, model_cfg, reader, seed=0))
  seconds = time.perf_counter() - start
  held = sum(x.addressable_shards[0].data.nbytes * len(x.addressable_shards) for x in jax.tree.leaves(params))
  return {"code": str(Path(jaxtune.__file__).parent.parent), "idle_rss": idle, "peak_rss": _status("VmHWM"),
          "after_rss": _status("VmRSS"), "device_bytes": held, "hwm_reset": reset, "load_s": round(seconds, 2),
          "devices": len(jax.devices())}


def _run(model_dir: Path, code: Path) -> dict[str, Any]:
  env = {**os.environ, "PYTHONPATH": str(code), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
  proc = subprocess.run([sys.executable, __file__, str(model_dir)], env=env, capture_output=True, text=True,
                        check=False)
  if proc.returncode:
    raise RuntimeError(f"loadmem worker ({code}) failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(codes: list[Path], rounds: int = 1, work_dir: Path | None = None) -> dict[str, Any]:
  """Writes the checkpoint once, then loads it `rounds` times per checkout in `codes`, alternating."""
  with tempfile.TemporaryDirectory(dir=work_dir, prefix="jaxtune-loadmem-") as tmp:
    model_dir = Path(tmp) / "llama-2gb"
    total = write_checkpoint(model_dir)
    runs = []
    for r in range(rounds):
      for code in codes:
        result = _run(model_dir, code)
        grown = result["peak_rss"] - result["idle_rss"]
        runs.append({"round": r, **result, "peak_minus_idle": grown, "ratio": round(grown / total, 3)})
  return {"checkpoint_bytes": total, "files": FILES, "devices": DEVICES, "mesh": {"fsdp": DEVICES}, "runs": runs}


def table(result: dict[str, Any]) -> str:
  gb = 1e9
  lines = [(f"checkpoint: {result['checkpoint_bytes'] / gb:.2f} GB float32 in {result['files']} safetensors files, "
            f"{result['devices']} devices, mesh fsdp={result['devices']}"),
           f"{'code':<32} {'idle GB':>8} {'peak-idle GB':>13} {'x ckpt':>7} {'load s':>7}"]
  for run in result["runs"]:
    lines.append(f"{run['code'][-32:]:<32} {run['idle_rss'] / gb:8.2f} {run['peak_minus_idle'] / gb:13.2f} "
                 f"{run['ratio']:7.3f} {run['load_s']:7.1f}")
  return "\n".join(lines)


if __name__ == "__main__":
  print(json.dumps(worker(sys.argv[1])))

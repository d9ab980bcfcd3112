"""Host memory of loading a checkpoint (scripts/benchmark.py loadmem): a random Llama of about 2 GB in float32,
written as 3 safetensors files and an index (or, with fmt="gguf", as one float32 GGUF file), loaded by the real
loader onto 8 simulated CPU devices (mesh fsdp=8) in a fresh process per run; the peak RSS of the load minus the
idle process, in bytes and per checkpoint byte (the tensors' bytes, the same for both formats).

Each run is its own process so that one load's pages never count towards the next. The worker is this file run
as a script (`python jaxtune/tools/loadmem.py PATH`) with PYTHONPATH set to the checkout under test, so the same
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
from collections.abc import Iterator
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


def _random_tensors(cfg: dict[str, Any], seed: int) -> Iterator[tuple[str, np.ndarray]]:
  """(HF key, random float32 tensor) in checkpoint order, drawn one at a time from one generator: every format
  written from the same seed holds the same values."""
  rng = np.random.default_rng(seed)
  for key, shape in _shapes(cfg).items():
    yield key, rng.standard_normal(shape, np.float32) * np.float32(0.02)


def write_checkpoint(out: Path, cfg: dict[str, Any] = LLAMA, files: int = FILES, seed: int = 0) -> int:
  """A random float32 checkpoint of `cfg` in `files` safetensors files plus model.safetensors.index.json; its bytes.

  The files are written one at a time, so the writer holds one file's tensors, never the whole model."""
  from safetensors.numpy import save_file

  out.mkdir(parents=True, exist_ok=True)
  shapes = _shapes(cfg)
  total = sum(4 * int(np.prod(s)) for s in shapes.values())
  weight_map, part, size = {}, {}, 0
  for i, (key, array) in enumerate(_random_tensors(cfg, seed)):
    part[key] = array
    size += array.nbytes
    filled = len(set(weight_map.values())) + 1
    if i == len(shapes) - 1 or (size >= total * filled / files and filled < files):
      name = f"model-{filled:05d}-of-{files:05d}.safetensors"
      save_file(part, out / name)
      weight_map.update({k: name for k in part})
      part = {}
  (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": weight_map}))
  (out / "config.json").write_text(json.dumps(cfg))
  return total


def _permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """HF q/k rows -> llama.cpp's per-head interleaved order (convert_hf_to_gguf.py's LlamaModel.permute)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, cfg: dict[str, Any] = LLAMA, seed: int = 0) -> int:
  """The same random checkpoint as write_checkpoint (same seed, same values) as one float32 llama GGUF file, q/k
  rows permuted as llama.cpp stores them; the tensors' bytes. Tensor infos first, then the tensors one at a time,
  so the writer holds one tensor, never the whole model. No tokenizer: loading the weights needs none."""
  import gguf

  from jaxtune.weights.gguf import BLOCK, TOP

  names = {hf: g for g, hf in TOP.items()}
  for i in range(cfg["num_hidden_layers"]):
    names.update({f"model.layers.{i}.{hf}": f"blk.{i}.{g}" for g, hf in BLOCK.items()})
  shapes = _shapes(cfg)
  path.parent.mkdir(parents=True, exist_ok=True)
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_context_length(cfg["max_position_embeddings"])
  writer.add_embedding_length(cfg["hidden_size"])
  writer.add_block_count(cfg["num_hidden_layers"])
  writer.add_feed_forward_length(cfg["intermediate_size"])
  writer.add_head_count(cfg["num_attention_heads"])
  writer.add_head_count_kv(cfg["num_key_value_heads"])
  writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  writer.add_rope_freq_base(cfg["rope_theta"])
  writer.add_file_type(gguf.LlamaFileType.ALL_F32)
  for key, shape in shapes.items():
    writer.add_tensor_info(names[key.removesuffix(".weight")] + ".weight", shape, np.dtype(np.float32),
                           4 * int(np.prod(shape)))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_ti_data_to_file()
  for key, array in _random_tensors(cfg, seed):
    if ".q_proj." in key:
      array = _permute_qk(array, cfg["num_attention_heads"])
    elif ".k_proj." in key:
      array = _permute_qk(array, cfg["num_key_value_heads"])
    writer.write_tensor_data(array)
  writer.close()
  return sum(4 * int(np.prod(s)) for s in shapes.values())


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


FORMATS = ("safetensors", "gguf")


def measure(codes: list[Path], rounds: int = 1, work_dir: Path | None = None,
            fmt: str = "safetensors") -> dict[str, Any]:
  """Writes the checkpoint once in `fmt` (FORMATS), then loads it `rounds` times per checkout in `codes`,
  alternating."""
  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
  with tempfile.TemporaryDirectory(dir=work_dir, prefix="jaxtune-loadmem-") as tmp:
    if fmt == "gguf":
      path = Path(tmp) / "llama-2gb.gguf"
      total, files = write_gguf(path), 1
    else:
      path = Path(tmp) / "llama-2gb"
      total, files = write_checkpoint(path), FILES
    file_bytes = sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir()))
    runs = []
    for r in range(rounds):
      for code in codes:
        result = _run(path, code)
        grown = result["peak_rss"] - result["idle_rss"]
        runs.append({"round": r, **result, "peak_minus_idle": grown, "ratio": round(grown / total, 3)})
  return {"format": fmt, "checkpoint_bytes": total, "file_bytes": file_bytes, "files": files, "devices": DEVICES,
          "mesh": {"fsdp": DEVICES}, "runs": runs}


def table(result: dict[str, Any]) -> str:
  gb, fmt = 1e9, result.get("format", "safetensors")
  lines = [(f"checkpoint: {result['checkpoint_bytes'] / gb:.2f} GB float32 in {result['files']} {fmt} "
            f"file{'s' if result['files'] > 1 else ''}, {result['devices']} devices, mesh fsdp={result['devices']}"),
           f"{'code':<32} {'idle GB':>8} {'peak-idle GB':>13} {'x ckpt':>7} {'after-idle GB':>14} {'load s':>7}"]
  for run in result["runs"]:
    lines.append(f"{run['code'][-32:]:<32} {run['idle_rss'] / gb:8.2f} {run['peak_minus_idle'] / gb:13.2f} "
                 f"{run['ratio']:7.3f} {(run['after_rss'] - run['idle_rss']) / gb:14.2f} {run['load_s']:7.1f}")
  return "\n".join(lines)


if __name__ == "__main__":
  print(json.dumps(worker(sys.argv[1])))

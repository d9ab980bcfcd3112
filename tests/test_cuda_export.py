"""The train steps lower for CUDA with cuDNN's fused attention in them, checked on this CPU host with jax.export.

No GPU is needed to lower: jax.export(platforms=["cuda"]) runs jax's CUDA lowering rules, and cuDNN attention
lowers to `__cudnn$fmha*` custom calls whose kernels only a GPU build of XLA links. The one thing the lowering
asks of the host is cuDNN's version (jax reads it to gate a few features). With jax-cuda12-plugin and
nvidia-cudnn-cu12 installed the test reads the real one; without them it pins the version jax[cuda12]==0.10.2
installs (nvidia-cudnn-cu12 9.28), so the check runs on a plain CPU install too. What this proves: the step traces
with model.attention: cudnn and emits the fused kernel forward and backward, with nothing silently falling back to
XLA's ops; not that cuDNN accepts these shapes at run time, which only a GPU can say (scripts/gpu_bench.sh).
"""

from __future__ import annotations

import ctypes
import re
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax import export

from jaxtune import sharding
from jaxtune.config import MeshConfig, ModelConfig, OptimConfig
from jaxtune.tasks import TASKS
from jaxtune.tools import bench
from jaxtune.train import optim, steps
from jaxtune.weights import pretrained

PINNED_CUDNN = 92800  # nvidia-cudnn-cu12 9.28.0.42, what `pip install jax[cuda12]==0.10.2` resolves to
# jax's cuDNN attention custom calls (fp8 aside): forward and backward, with or without a bias / mask, dropout.
CUDNN_TARGETS = tuple(f"__cudnn$fmha{kind}{bwd}" for kind in ("Softmax", "ScaleBiasSoftmax", "SoftmaxDropout",
                                                              "ScaleBiasSoftmaxDropout") for bwd in ("", "Backward"))


@pytest.fixture
def cudnn_version(monkeypatch) -> int:
  """The cuDNN version jax lowers for: the installed library's (jax-cuda12-plugin reads it), else PINNED_CUDNN."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention  # where jax checks the version
  from jax._src.lib import cuda_versions  # jax-cuda12-plugin's version helpers; None without the plugin

  if cuda_versions is not None:
    try:
      import nvidia.cudnn  # the pip wheel's libraries, which the plugin's PJRT part would load at backend start-up

      ctypes.CDLL(str(Path(nvidia.cudnn.__path__[0]) / "lib" / "libcudnn.so.9"))
      return cuda_versions.cudnn_get_version()
    except (ImportError, OSError, RuntimeError):
      pass
  if not callable(getattr(cudnn_attention, "check_cudnn_version", None)):
    pytest.skip("this jax has no fused_attention_stablehlo.check_cudnn_version to pin, and no CUDA plugin with "
                "cuDNN is installed (pip install --no-deps jax-cuda12-plugin nvidia-cudnn-cu12)")
  monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: PINNED_CUDNN)
  return PINNED_CUDNN


def cuda_module(fn, *args) -> str:
  """The StableHLO text of `fn` (a jitted function) lowered for CUDA at these abstract arguments."""
  checks = [export.DisabledSafetyCheck.custom_call(t) for t in CUDNN_TARGETS]  # not on export's stable list
  return export.export(fn, platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()


def cudnn_calls(text: str) -> set[str]:
  return set(re.findall(r"__cudnn\$fmha\w+", text))


def test_plain_cudnn_attention_lowers_forward_and_backward(cudnn_version):
  """The mechanics, on jax's own API: causal cuDNN attention, its value and its gradient."""
  attention = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  loss = lambda q, k, v: attention(q, k, v).astype(jnp.float32).sum()
  q = jax.ShapeDtypeStruct((2, 128, 4, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 128, 2, 64), jnp.bfloat16)  # grouped queries, as the Llamas
  assert cudnn_calls(cuda_module(jax.jit(attention), q, kv, kv)) == {"__cudnn$fmhaSoftmax"}
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  assert cudnn_calls(cuda_module(grad, q, kv, kv)) == {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_train_step_lowers_cudnn_attention(kind, cudnn_version, request):
  """The whole train step (bf16 compute, AdamW, donated state, shardings on a one-device mesh) with
  model.attention: cudnn: every layer's attention is the fused kernel, forward and backward."""
  path, task = (request.getfixturevalue("tiny_llama_dir"), "causal_lm") if kind == "decoder" else (
      request.getfixturevalue("tiny_bert_dir"), "classification")
  mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
  model_cfg = ModelConfig(path=str(path), attention="cudnn", compute_dtype="bfloat16")
  hf_config, _ = pretrained.open_checkpoint(model_cfg)
  model = pretrained.from_config(hf_config, model_cfg, 2 if task == "classification" else 0, mesh, head=task)
  opt = OptimConfig(lr=1e-4, schedule="constant")
  tx = optim.make(opt, 10)
  shardings = steps.state_shardings(model, tx)
  batch_sharding = sharding.batch_sharding(mesh)
  step = steps.make_train_step(model, TASKS[task], tx, optim.schedule(opt, 10), jnp.bfloat16, shardings,
                               batch_sharding)
  # The peer benchmark's batch: the task's collate layout (ids, masks, segments, positions, targets), 2 x 64.
  rows = bench.batch_arrays(types.SimpleNamespace(hf=hf_config, task=task, batch=2, length=64, seed=0))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in rows.items()}
  hyper = jax.ShapeDtypeStruct(step.hyper.shape, step.hyper.dtype)  # the optimiser numbers: an argument
  text = cuda_module(step.jitted, steps.abstract_state(model, tx, shardings), batch, hyper)
  calls = cudnn_calls(text)
  forward = {c for c in calls if not c.endswith("Backward")}
  assert forward and {c + "Backward" for c in forward} <= calls, calls
  # One call per layer each way (a scan of layers would hold one of each): no layer fell back to XLA's ops but the
  # classifier's last, whose one [CLS] query runs as XLA's ops (models/encoder.py, attention.choose).
  layers = hf_config["num_hidden_layers"] - (kind == "encoder")
  assert sum(text.count(f"@{c}(") for c in forward) in (1, layers), text.count("__cudnn")

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

import resource
import sys
import time
from typing import Any

# Dense bf16 peaks from vendor datasheets (FLOP/s per chip), matched against jax's device_kind.
VENDOR_BF16_PEAKS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
    "TPU v6 lite": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12,
}


def matmul_params_per_token(hf: dict[str, Any], task: str) -> int:
  """N of the formula above, from an HF config dict."""
  d, f, layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or d // heads
  kv = hf.get("num_key_value_heads") or heads
  attention = 2 * d * heads * head_dim + 2 * d * kv * head_dim
  mlp = (3 if hf["model_type"] in ("llama", "mistral", "qwen2") else 2) * d * f
  head = d * hf["vocab_size"] if task == "causal_lm" else 0
  return layers * (attention + mlp) + head


def train_flops_per_token(hf: dict[str, Any], length: int, task: str) -> float:
  """Training FLOPs per token at sequence length `length` (see the module docstring)."""
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  return 6.0 * matmul_params_per_token(hf, task) + 12.0 * hf["num_hidden_layers"] * length * heads * head_dim


def vendor_peak_flops(device_kind: str) -> float | None:
  """The datasheet bf16 peak of an accelerator, or None for a kind not in the table."""
  for name, peak in VENDOR_BF16_PEAKS.items():
    if name.lower() in device_kind.lower():
      return peak
  return None


def matmul_peak(side: str, dtype: str, n: int = 2048, reps: int = 5) -> float:
  """FLOP/s of the fastest of `reps` n x n matmuls in `dtype`, with jax (side "jax") or torch."""
  if side == "jax":
    import jax
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

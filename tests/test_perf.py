"""The performance accounting: the FLOPs formula by hand, vendor peaks, and the hashed dropout masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.models import layers
from jaxtune.tools import bench
from jaxtune.train import perf


def test_flops_per_token_of_minilm_and_smollm2_by_hand():
  """MiniLM: 6 layers x (4 x 384^2 + 2 x 384 x 1536); SmolLM2 adds GQA k/v, a gated MLP and the tied head."""
  minilm = 6 * (4 * 384 * 384 + 2 * 384 * 1536)
  assert perf.matmul_params_per_token(bench.SHAPES["minilm"]["hf"], "classification") == minilm == 10_616_832
  assert perf.train_flops_per_token(bench.SHAPES["minilm"]["hf"], 128, "classification") == (
      6 * minilm + 12 * 6 * 128 * 384)
  smol = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) + 576 * 49152
  assert perf.matmul_params_per_token(bench.SHAPES["smollm2-135m"]["hf"], "causal_lm") == smol
  gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100}
  assert perf.matmul_params_per_token(gpt2, "causal_lm") == 2 * (4 * 64 * 64 + 2 * 64 * 256) + 64 * 100


def test_vendor_peaks_match_device_kinds():
  assert perf.vendor_peak_flops("NVIDIA H200") == 989e12
  assert perf.vendor_peak_flops("TPU v5 lite") == 197e12
  assert perf.vendor_peak_flops("cpu") is None


def test_keep_mask_rate_and_independence():
  """Keep fraction within 4 sigma of 1 - rate; different keys and neighbouring elements are uncorrelated."""
  shape = (64, 128, 128)
  a = np.asarray(layers.keep_mask(jax.random.key(0), shape, 0.9), np.float64)
  b = np.asarray(layers.keep_mask(jax.random.key(1), shape, 0.9), np.float64)
  n = a.size
  assert abs(a.mean() - 0.9) < 4 * np.sqrt(0.09 / n)
  corr = lambda x, y: np.corrcoef(x.ravel(), y.ravel())[0, 1]
  assert abs(corr(a, b)) < 4 / np.sqrt(n)
  assert abs(corr(a[..., 1:], a[..., :-1])) < 4 / np.sqrt(n)  # neighbours in the flat index
  assert abs(corr(a[1:], a[:-1])) < 4 / np.sqrt(n)  # rows apart
  again = np.asarray(layers.keep_mask(jax.random.key(0), shape, 0.9), np.float64)
  np.testing.assert_array_equal(a, again)  # a pure function of (key, shape): resume replays it
  assert not np.array_equal(a, b)


def test_dropout_masks_do_not_depend_on_the_batch_sharding():
  """The mask of a sharded array equals the unsharded one (the hash runs on global indices)."""
  x = jnp.ones((8, 16))
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
  drop = jax.jit(lambda v: layers.dropout(v, 0.5, jax.random.key(3)))
  np.testing.assert_array_equal(np.asarray(drop(sharded)), np.asarray(drop(x)))

"""attention.attend: every implementation against the reference, and which one `auto` picks for which devices.

Splash attention runs in Pallas interpret mode here (the devices are CPUs): the kernel's own block loop,
masks and segment handling, values and gradients, in float32 and bfloat16.
"""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.models import attention, cpu_attention, layers


def _inputs(b, length, h, g, k, keys=None, seed=0):
  rng = np.random.default_rng(seed)
  keys = keys or length
  q = rng.normal(size=(b, length, h, k))
  kk, v = (rng.normal(size=(b, keys, g, k)) for _ in range(2))
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, kk, v))


def _packed(b, length):
  """Row 0 one document; row 1 two documents then padding; further rows three documents."""
  seg = np.ones((b, length), np.int32)
  for row in range(1, b):
    cuts = [length // 3, length - 7] if row == 1 else [length // 4, length // 2]
    seg[row, cuts[0]:] = 2
    seg[row, cuts[1]:] = 0 if row == 1 else 3
  pos = np.zeros_like(seg)
  for row in range(b):
    start = 0
    for i in range(1, length + 1):
      if i == length or seg[row, i] != seg[row, i - 1]:
        pos[row, start:i] = np.arange(i - start)
        start = i
  return jnp.asarray(seg), jnp.asarray(pos)


def _padding(b, keys):
  mask = np.ones((b, keys), np.int32)
  mask[1 % b, keys // 2:] = 0
  mask[-1, 3:] = 0 if b > 2 else 1
  return jnp.asarray(mask)


# name -> (batch, length, heads, kv heads, head dim, keys, how the mask is built)
CASES = {
    "causal-packed-gqa-128": (2, 128, 4, 2, 64, None, "packed"),
    "causal-packed-gqa-2048": (1, 2048, 2, 1, 64, None, "packed"),
    "causal-window-512": (2, 512, 2, 2, 32, None, "window"),
    "bidirectional-padding-384": (3, 384, 3, 3, 64, None, "padding"),
    "cross-attention-200x130": (2, 200, 2, 2, 16, 130, "padding"),
    "bidirectional-window-256": (2, 256, 2, 1, 32, None, "bidirectional-window"),
}


def _mask(kind, b, length, keys):
  if kind == "packed":
    seg, pos = _packed(b, length)
    return attention.Mask(q_segments=seg, kv_segments=seg, causal=True, q_positions=pos, kv_positions=pos)
  if kind == "window":
    return attention.Mask(kv_segments=_padding(b, keys), causal=True, window=100)
  if kind == "bidirectional-window":
    return attention.Mask(window=64)
  return attention.Mask(kv_segments=_padding(b, keys))


def _real_queries(mask, b, length):
  """Queries whose output is defined the same way by every kernel (not padding of a packed row)."""
  real = np.ones((b, length), bool) if mask.q_segments is None else np.asarray(mask.q_segments) > 0
  return jnp.asarray(real)[:, :, None, None]


def _run(how, q, k, v, mask, dtype):
  ctx = layers.Context(attention=how)
  return attention.attend(q.astype(dtype), k.astype(dtype), v.astype(dtype), ctx, mask).astype(jnp.float32)


def _value_and_grads(how, q, k, v, mask, dtype, w):
  def loss(q, k, v):
    return jnp.sum(_run(how, q, k, v, mask, dtype) * w)
  out = jax.jit(lambda q, k, v: _run(how, q, k, v, mask, dtype))(q, k, v)
  return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


# The 2048-token case (splash's many-block path) runs splash in float32 by default; its bfloat16 and XLA runs are
# slow-tier (the other cases cover both dtypes and XLA's ops).
SLOW_2048 = lambda how, case, name: case.endswith("2048") and (how, name) != ("splash", "fp32")
KERNEL_CASES = [pytest.param(how, case, dtype, id=f"{how}-{case}-{name}",
                             marks=pytest.mark.slow if SLOW_2048(how, case, name) else ())
                for how in ("splash", "xla") for case in CASES
                for dtype, name in ((jnp.float32, "fp32"), (jnp.bfloat16, "bf16"))]


@pytest.mark.parametrize(("how", "case", "dtype"), KERNEL_CASES)
def test_kernels_match_the_reference_values_and_gradients(how, case, dtype):
  b, length, h, g, kd, keys, kind = CASES[case]
  if how == "xla" and dtype == jnp.bfloat16:
    pytest.skip("XLA's ops and the reference round alike in bfloat16: the float32 case proves the path")
  q, k, v = _inputs(b, length, h, g, kd, keys)
  mask = _mask(kind, b, length, keys or length)
  real = _real_queries(mask, b, length)
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * real
  want, want_grads = _value_and_grads("reference", q, k, v, mask, jnp.float32, w)
  assert attention.choose(layers.Context(attention=how), q.astype(dtype), k, mask, 0.0) == how
  got, got_grads = _value_and_grads(how, q, k, v, mask, dtype, w)
  if dtype == jnp.float32:
    tol = dict(atol=2e-5, rtol=2e-5)
  else:  # bfloat16 inputs: no worse than the reference itself computed in bfloat16, plus rounding slack
    ref16, ref16_grads = _value_and_grads("reference", q, k, v, mask, dtype, w)
    budget = float(jnp.max(jnp.abs((ref16 - want) * real)))
    tol = dict(atol=3 * budget + 1e-2, rtol=0)
  np.testing.assert_allclose(got * real, want * real, **tol)
  for name, got_g, want_g in zip("qkv", got_grads, want_grads):
    scale = float(jnp.max(jnp.abs(want_g)))
    if dtype == jnp.float32:
      np.testing.assert_allclose(got_g, want_g, atol=2e-5 * max(scale, 1), rtol=2e-5, err_msg=f"d{name}")
    else:
      ref_err = float(jnp.max(jnp.abs(ref16_grads["qkv".index(name)] - want_g)))
      assert float(jnp.max(jnp.abs(got_g - want_g))) <= 3 * ref_err + 2e-2 * scale, f"d{name}"


def test_splash_sees_no_key_of_another_document_and_no_padding():
  """Changing a key of document 1 or a padding key leaves every other document's outputs bit for bit."""
  q, k, v = _inputs(2, 128, 2, 1, 32)
  seg, pos = _packed(2, 128)
  mask = attention.Mask(q_segments=seg, kv_segments=seg, causal=True, q_positions=pos, kv_positions=pos)
  run = jax.jit(lambda k: _run("splash", q, k, v, mask, jnp.float32))
  before, after = run(k), run(k.at[1, 10].add(5.0).at[1, 127].add(5.0))  # row 1: doc 1 and padding
  other_docs = np.asarray(seg[1] == 2)
  np.testing.assert_array_equal(np.asarray(before[1])[other_docs], np.asarray(after[1])[other_docs])
  np.testing.assert_array_equal(before[0], after[0])


@dataclasses.dataclass
class _Devices:  # what attention.platform reads of a mesh: its devices' platform
  platform: str

  @property
  def devices(self):
    return np.array([type("Device", (), {"platform": self.platform})()])


def _choose(platform, dtype=jnp.bfloat16, requested="auto", dropout=0.0, mask=None):
  q = jnp.zeros((2, 256, 4, 64), dtype)
  mask = mask or attention.Mask(kv_segments=jnp.ones((2, 256), jnp.int32))
  return attention.choose(layers.Context(mesh=_Devices(platform), attention=requested), q, q, mask, dropout)


def test_auto_follows_the_platform_of_the_mesh_not_the_host(caplog):
  assert jax.default_backend() == "cpu"
  assert _choose("tpu") == "splash" and _choose("tpu", jnp.float32) == "splash"
  assert _choose("gpu") == "cudnn"
  caplog.set_level(logging.INFO, logger="jaxtune.models.attention")
  assert _choose("gpu", jnp.float32) == "xla" and "cuDNN's fused attention takes bfloat16" in caplog.text
  t5_like = attention.Mask(bias=jnp.zeros((1, 4, 256, 256)))
  assert _choose("tpu", mask=t5_like) == "xla" and _choose("gpu", mask=t5_like) == "xla"
  cached = attention.Mask(kv_segments=jnp.ones((2, 256)), causal=True, in_order=False)
  assert _choose("tpu", mask=cached) == "xla"


def test_a_cpu_kernel_never_reaches_an_accelerator_program():
  cpu_attention.load()
  for requested in ("auto", "cpu"):
    for platform in ("tpu", "gpu"):
      assert _choose(platform, jnp.float32, requested) != "cpu"


def test_attention_dropout_is_an_explicit_logged_choice_on_accelerators(caplog):
  caplog.set_level(logging.INFO, logger="jaxtune.models.attention")
  assert _choose("tpu", dropout=0.1) == "xla"  # auto keeps the recipe
  assert "attention dropout 0.1 kept" in caplog.text
  assert _choose("tpu", requested="splash", dropout=0.1) == "splash"  # naming the kernel drops it, loudly
  assert any(r.levelno == logging.WARNING and "draws no dropout" in r.message for r in caplog.records)
  assert _choose("tpu", requested="xla") == "xla" and _choose("tpu", requested="reference") == "reference"


def test_a_splash_kernel_made_under_shard_map_serves_later_traces():
  """The kernel is cached per shape: one first built for an eager call on a mesh (inside no jit, around shard_map)
  must hold no value of that call's trace when a later jitted call without a mesh reuses it."""
  from jaxtune import sharding
  from jaxtune.config import MeshConfig

  q, k, v = _inputs(2, 256, 3, 3, 16, seed=5)
  mask = attention.Mask(kv_segments=_padding(2, 256))
  eager = attention.attend(q, k, v, layers.Context(mesh=sharding.make_mesh(MeshConfig()), attention="splash"), mask)
  jitted = jax.jit(lambda q, k, v: attention.attend(q, k, v, layers.Context(attention="splash"), mask))(q, k, v)
  np.testing.assert_array_equal(eager, jitted)


def test_a_soft_cap_and_a_layers_window_flag_reach_every_kernel(caplog, monkeypatch):
  """Gemma 2's soft cap on the scores and a mixed stack's traced per-layer window flag: splash computes both (one
  kernel per mask under lax.cond), the CPU kernel neither (XLA's ops take over, logged); values and gradients
  equal the reference's either way the flag goes."""
  caplog.set_level(logging.INFO, logger="jaxtune.models.attention")
  monkeypatch.setattr(attention, "_said", set())  # each reason is logged once a process: here, afresh
  cpu_attention.load()
  q, k, v = _inputs(2, 128, 4, 2, 16, seed=3)
  seg, pos = _packed(2, 128)
  mask = functools.partial(attention.Mask, q_segments=seg, kv_segments=seg, causal=True, q_positions=pos,
                           kv_positions=pos)
  real = _real_queries(mask(), 2, 128)
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * real

  def value_and_grads(fn):  # the output and the gradients of sum(output * w)
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(w)

  for cap in (None, 1.0):
    want = {local: value_and_grads(lambda q, k, v: attention.reference(q, k, v, mask(window=20 if local else None),
                                                                       0.25, soft_cap=cap)) for local in (True, False)}
    assert float(jnp.abs((want[True][0] - want[False][0]) * real).max()) > 0.1  # the window bites
    for how in ("splash", "xla", "cpu"):
      run = jax.jit(lambda flag: value_and_grads(lambda q, k, v: attention.attend(  # one program, either flag
          q, k, v, layers.Context(attention=how), mask(window=20, local=flag), soft_cap=cap)))
      for local in (True, False):
        got = run(jnp.asarray(local))
        np.testing.assert_allclose(got[0] * real, want[local][0] * real, atol=2e-5, err_msg=f"{how} {cap} {local}")
        for name, got_g, want_g in zip("qkv", got[1], want[local][1]):
          np.testing.assert_allclose(got_g, want_g, atol=2e-5, err_msg=f"{how} cap={cap} local={local} d{name}")
  capped = attention.reference(q, k, v, mask(), 0.25, soft_cap=1.0)
  assert float(jnp.abs((capped - attention.reference(q, k, v, mask(), 0.25)) * real).max()) > 0.1  # the cap bites
  assert attention.choose(layers.Context(attention="cpu"), q, k, mask(), 0.0) == "cpu"  # the full layers' kernel
  assert "C++ CPU attention kernel has no sliding window" in caplog.text
  assert "C++ CPU attention kernel has no soft cap" in caplog.text
  q16 = q.astype(jnp.bfloat16)
  assert attention.choose(layers.Context(mesh=_Devices("gpu")), q16, q16, mask(), 0.0, soft_cap=1.0) == "xla"
  assert "cuDNN's fused attention has no soft cap" in caplog.text

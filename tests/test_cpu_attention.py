"""jaxtune's CPU attention kernel (models/cpu_attention.cc) against the XLA ops it replaces, its fallback, and when
it is built."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.models import attention, cpu_attention, decoding, layers

# Only a machine without a compiler skips these; where one exists, a kernel that fails to build fails them.
pytestmark = pytest.mark.skipif(cpu_attention.find_compiler() is None, reason="no C++ compiler to build the kernel")


def _inputs(b, length, h, g, k, seed=0):
  rng = np.random.default_rng(seed)
  q, kk, v = (jnp.asarray(rng.normal(size=(b, length, n, k)), jnp.float32) for n in (h, g, g))
  seg = np.ones((b, length), np.int32)
  pos = np.tile(np.arange(length), (b, 1)).astype(np.int32)
  if b > 1:  # row 1 packs two documents and ends in padding
    third = length // 3
    seg[1, third:], pos[1, third:] = 2, np.arange(length - third)
    seg[1, length - 5:], pos[1, length - 5:] = 0, 0
  return q, kk, v, jnp.asarray(seg), jnp.asarray(pos)


XLA, KERNEL = layers.Context(attention="xla"), layers.Context(attention="cpu")


@pytest.fixture(scope="module", autouse=True)
def kernel():
  assert cpu_attention.load()


def _decoder(ctx):
  """decoding.attend under `ctx`: the decoders' segment-causal attention."""
  return lambda q, k, v, seg, pos: decoding.attend(q, k, v, decoding.Segments(seg, pos, seg, pos, None), (seg, pos),
                                                     ctx)


def _encoder(ctx):
  """attention.attend over unpadded keys under `ctx`: an encoder's attention."""
  return lambda q, k, v, mask, rate, rng: attention.attend(q, k, v, ctx, attention.Mask(kv_segments=mask), None,
                                                             rate, rng)


_xla, _xla_bidirectional = _decoder(XLA), _encoder(XLA)


@pytest.mark.parametrize("shape", [(2, 150, 4, 2, 16), (3, 67, 6, 3, 12), (1, 5, 2, 1, 3), (2, 256, 9, 3, 64)],
                         ids=["gqa-2-blocks", "odd-head-dim", "tiny", "smollm2-heads"])
def test_matches_xla_forward_and_gradients(shape):
  q, k, v, seg, pos = _inputs(*shape)
  valid = (seg > 0)[:, :, None, None]  # padding queries: the kernel gives 0, XLA a mean of values
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * valid

  def loss(f):
    return lambda q, k, v: jnp.sum(f(q, k, v, seg, pos) * w)

  ours, ref = jax.jit(_decoder(KERNEL))(q, k, v, seg, pos), jax.jit(_xla)(q, k, v, seg, pos)
  np.testing.assert_allclose(ours * valid, ref * valid, atol=2e-6, rtol=1e-5)
  assert not jnp.any((ours != 0) & ~valid)
  grads = jax.jit(jax.grad(loss(_decoder(KERNEL)), argnums=(0, 1, 2)))(q, k, v)
  ref_grads = jax.jit(jax.grad(loss(_xla), argnums=(0, 1, 2)))(q, k, v)
  for name, g, r in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("rate", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_bidirectional_matches_xla_with_the_same_dropout_masks(rate):
  """An encoder's attention: padded keys masked, padded queries kept, dropout drawn as layers.keep_mask draws it."""
  q, k, v, _, _ = _inputs(3, 70, 4, 4, 16)
  mask = jnp.ones((3, 70), jnp.int32).at[1, 50:].set(0).at[2, 3:].set(0)
  rng = jax.random.key(7)
  w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)

  def loss(f):
    return lambda q, k, v: jnp.sum(f(q, k, v, mask, rate, rng) * w)

  ours = jax.jit(_encoder(KERNEL), static_argnums=4)(q, k, v, mask, rate, rng)
  ref = jax.jit(_xla_bidirectional, static_argnums=4)(q, k, v, mask, rate, rng)
  np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=1e-5)
  grads = jax.jit(jax.grad(loss(_encoder(KERNEL)), argnums=(0, 1, 2)))(q, k, v)
  ref_grads = jax.jit(jax.grad(loss(_xla_bidirectional), argnums=(0, 1, 2)))(q, k, v)
  for name, g, r in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")
  if rate:  # a different key drops other probabilities
    other = cpu_attention.bidirectional_attention(q, k, v, mask, rate, jax.random.key(8))
    assert float(jnp.max(jnp.abs(other - ours))) > 1e-2


def test_attend_routes_training_attention_to_the_kernel():
  q, k, v, seg, pos = _inputs(2, 32, 4, 2, 8)
  auto = _decoder(layers.Context())
  assert cpu_attention._FORWARD in jax.jit(auto).lower(q, k, v, seg, pos).as_text()
  segments = decoding.Segments(seg, pos, seg, pos, None)
  dropped = jax.jit(lambda q, k, v: decoding.attend(q, k, v, segments, (seg, pos), layers.Context(), 0.1,
                                                    jax.random.key(0)))
  assert cpu_attention._FORWARD not in dropped.lower(q, k, v).as_text()  # dropout: XLA's ops
  hlo16 = jax.jit(auto).lower(*(x.astype(jnp.bfloat16) for x in (q, k, v)), seg, pos).as_text()
  assert cpu_attention._FORWARD not in hlo16  # float32 only
  assert cpu_attention._FORWARD not in jax.jit(_xla).lower(q, k, v, seg, pos).as_text()  # model.attention: xla


def test_without_a_compiler_attention_falls_back_to_xla(monkeypatch, tmp_path, caplog):
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  monkeypatch.setenv("JAXTUNE_KERNEL_DIR", str(tmp_path / "kernels"))
  cpu_attention._library.cache_clear()
  try:
    assert not cpu_attention.load() and not cpu_attention.loaded()
    assert "CPU attention kernel unavailable" in caplog.text
    q, k, v, seg, pos = _inputs(2, 20, 4, 2, 8)
    auto = jax.jit(_decoder(layers.Context()))
    assert cpu_attention._FORWARD not in auto.lower(q, k, v, seg, pos).as_text()
    np.testing.assert_allclose(auto(q, k, v, seg, pos), _xla(q, k, v, seg, pos), atol=1e-6)
  finally:
    monkeypatch.undo()
    cpu_attention._library.cache_clear()
    assert cpu_attention.load()
  monkeypatch.setenv("JAXTUNE_CPU_ATTENTION", "0")
  assert not cpu_attention.loaded()


def test_the_kernel_is_built_before_tracing_not_during_it(monkeypatch):
  """Tracing only asks whether `load` made the kernel available: an unbuilt kernel means XLA's ops, no build."""
  cpu_attention._library.cache_clear()
  try:
    q, k, v, seg, pos = _inputs(2, 20, 4, 2, 8)
    hlo = jax.jit(_decoder(layers.Context())).lower(q, k, v, seg, pos).as_text()
    assert cpu_attention._library.cache_info().currsize == 0 and cpu_attention._FORWARD not in hlo
  finally:
    assert cpu_attention.load()

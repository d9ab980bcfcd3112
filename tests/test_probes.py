"""benchmark.py probe: the optimizer probe's scalar clipping is optax's clipping, scaled as torch scales."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtune.tools import probes


@pytest.mark.parametrize("scale", [1e-3, 10.0], ids=["below the norm", "above the norm"])
def test_the_scalar_clip_matches_optax_to_an_ulp(scale):
  rng = np.random.default_rng(0)
  grads = {"a": jnp.asarray(rng.standard_normal((64, 32), np.float32) * scale),
           "b": {"bias": jnp.asarray(rng.standard_normal(32, np.float32) * scale)}}
  ours, _ = probes._scalar_clip(1.0).update(grads, optax.EmptyState())
  theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=2)
  norm = float(optax.tree.norm(ours))
  assert norm == pytest.approx(min(float(optax.tree.norm(grads)), 1.0), rel=1e-6)

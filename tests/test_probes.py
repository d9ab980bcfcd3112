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


def test_the_compile_cost_variants_flags_are_this_xlas_and_its_table_compares_with_as_is():
  import os
  import subprocess
  import sys

  from jaxtune.tools import compile_cost

  # XLA aborts a process whose XLA_FLAGS name a flag or value it does not know
  flags = " ".join(v[0] for v in compile_cost.VARIANTS.values())
  out = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                       env={**os.environ, "XLA_FLAGS": flags}, capture_output=True, text=True)
  assert out.returncode == 0 and out.stdout.strip().endswith("3.0"), out.stderr[-2000:]
  one = lambda x: {"median": x, "min": x, "max": x}
  result = {"length": 32, "rounds": 1, "variants": {"as is": {"compile_s": one(8.0), "step_s": one(0.5)},
                                                    "LLVM -O1": {"compile_s": one(6.5), "step_s": one(0.55)}}}
  rows = compile_cost.table(result).splitlines()
  assert rows[-1] == "| LLVM -O1 | 6.50 [6.50-6.50] | 0.550 [0.550-0.550] | -1.50 s | +10.0% |"

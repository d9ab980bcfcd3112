"""Param trees, and the one place they change shape.

Params are nested dicts wherever JAX sees them: nnx's pure state, which the model merges, the optimiser
updates, and shardings, train state and checkpoints mirror. A tree is flat (`a.b.c` path -> leaf) only
where weights meet another naming: HF checkpoint keys, exports, and the config's regexes over param
paths. `flatten` and `unflatten` are that boundary; `partition` and `merge` split a tree into the params
that train and those that do not, and put it back, without leaving the nested form.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import jax
from flax import nnx

Params = dict[str, Any]  # a nested param tree (leaves: arrays, ShapeDtypeStructs or shardings)


def flat_variables(state: nnx.State) -> dict[str, nnx.Variable]:
  """`a.b.c` path -> Variable for every variable of an nnx State."""
  leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  return {_path_str(p): v for p, v in leaves}


def flatten(tree: Mapping[Any, Any], is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
  """`a.b.c` path -> leaf of a nested tree (list indices become path components; `is_leaf`: nodes kept whole,
  e.g. quant.is_quantised for a quantised kernel's arrays)."""
  return {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def unflatten(flat: Mapping[str, Any]) -> Params:
  """Inverse of `flatten`; numeric components become int keys as nnx uses for layer lists."""
  tree: Params = {}
  for path, value in flat.items():
    *parents, leaf = (int(k) if k.isdigit() else k for k in path.split("."))
    node = tree
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = value
  return tree


def partition(tree: Mapping[Any, Any], paths: Collection[str], prefix: str = "") -> tuple[Params, Params]:
  """(the leaves whose path is not in `paths`, those that are), each a nested tree like `tree`."""
  rest: Params = {}
  picked: Params = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      a, b = partition(value, paths, path + ".")
      if a:
        rest[key] = a
      if b:
        picked[key] = b
    elif path in paths:
      picked[key] = value
    else:
      rest[key] = value
  return rest, picked


def merge(*trees: Mapping[Any, Any]) -> Params:
  """One nested tree holding the leaves of disjoint trees (the inverse of `partition`)."""
  out: Params = {}
  for tree in trees:
    for key, value in tree.items():
      out[key] = merge(out[key], value) if isinstance(value, Mapping) and key in out else value
  return out


def matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
  """Whether a string (a param path or checkpoint key) fully matches one of the regexes."""
  compiled = [re.compile(p) for p in patterns]
  return lambda s: any(c.fullmatch(s) for c in compiled)


def _path_str(path: tuple[Any, ...]) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)

"""Device mesh and the one table mapping logical axis names to mesh axes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxtune.config import MeshConfig
from jaxtune.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes, in priority order. A mesh axis is used at most once per array; a
# dimension that does not divide evenly by its mesh axes stays replicated.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("embed_out", None),
    ("head_dim", None),
    ("classes", None),
    ("length", None),
)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices; one axis may be -1 to take the rest."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % fixed:
      raise UserError(f"mesh sizes {sizes} do not divide the {len(devices)} devices; change mesh.*.")
    sizes[sizes.index(-1)] = len(devices) // fixed
  if math.prod(sizes) != len(devices):
    raise UserError(f"mesh data x fsdp x tensor = {math.prod(sizes)} but there are {len(devices)} devices; "
                    "set the mesh sizes so that their product equals the device count (or use -1).")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def spec_for(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh,
             rules: Sequence[tuple[str, Any]] = RULES) -> P:
  """The PartitionSpec that `rules` give a `shape` whose dims have logical names `axes`."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for dim, name in zip(shape, axes):
    target = table.get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(t for t in targets if t not in used and mesh.shape[t] > 1)
    if targets and dim % math.prod(mesh.shape[t] for t in targets) == 0:
      used.update(targets)
      out.append(targets[0] if len(targets) == 1 else targets)
    else:
      out.append(None)
  return P(*out)


def param_shardings(abstract_state: nnx.State, mesh: Mesh) -> dict[str, Any]:
  """Pure-dict tree of NamedShardings for an (abstract) nnx param state, from each param's `axes`."""
  flat = {path: NamedSharding(mesh, spec_for(v.get_value().shape, v.get_metadata()["axes"], mesh))
          for path, v in flat_variables(abstract_state).items()}
  return unflatten(flat)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over data and fsdp; the rest replicated."""
  return NamedSharding(mesh, spec_for((mesh.shape["data"] * mesh.shape["fsdp"],), ("batch",), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def on_mesh(s: jax.sharding.Sharding, mesh: Mesh) -> NamedSharding:
  """`s` if it is already a NamedSharding, else replicated over `mesh` (e.g. a scalar's)."""
  return s if isinstance(s, NamedSharding) and s.mesh == mesh else replicated(mesh)


def flat_variables(state: nnx.State) -> dict[str, nnx.Variable]:
  """`a.b.0.c` path -> Variable for every variable of an nnx State."""
  leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  return {_path_str(p): v for p, v in leaves}


def flatten(tree: Mapping[Any, Any]) -> dict[str, Any]:
  """`a.b.0.c` path -> leaf for a nested dict (list indices become path components)."""
  return {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: Mapping[str, Any]) -> dict[Any, Any]:
  """Inverse of `flatten`; numeric components become int keys as nnx uses for layer lists."""
  tree: dict[Any, Any] = {}
  for path, value in flat.items():
    *parents, leaf = (int(k) if k.isdigit() else k for k in path.split("."))
    node = tree
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = value
  return tree


def _path_str(path: tuple[Any, ...]) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)

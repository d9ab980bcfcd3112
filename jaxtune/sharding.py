"""Device mesh and the one table mapping logical axis names to mesh axes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtune import params as params_lib
from jaxtune.config import MeshConfig, TrainConfig
from jaxtune.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, tuple[str, ...]], ...]

# Logical axis -> mesh axes. Within one array a mesh axis is used at most once, by the first
# dimension (left to right) that claims it; a dimension that does not divide evenly by its mesh
# axes stays replicated. Params: FSDP shards `embed`, Megatron-style tensor parallelism shards
# heads / mlp / vocab. Activations: the batch is split over data and fsdp.
RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("embed", ("fsdp",)),
    ("expert", ("fsdp",)),  # an MoE's stacked experts (models/moe.py), whole ones a device; no expert mesh axis
    ("embed_out", ()),  # the pooler's output: its input dim already takes fsdp
    ("head_dim", ()),
    ("classes", ()),
    ("length", ()),
    ("layers", ()),  # the stacked-layer axis: every device holds its slice of every layer
    ("lora_rank", ()),  # a LoRA adapter's rank: small, kept whole
)


def rules_with(overrides: Mapping[str, Sequence[str] | None]) -> Rules:
  """RULES with the config's mesh.rules entries replacing the defaults of the same logical axes."""
  known = dict(RULES)
  for name, axes in overrides.items():
    if name not in known:
      raise UserError(f"config key mesh.rules.{name}: unknown logical axis; expected one of {sorted(known)}.")
    bad = [a for a in axes or () if a not in MESH_AXES]
    if bad or len(set(axes or ())) != len(axes or ()):
      raise UserError(f"config key mesh.rules.{name} is {list(axes or ())}; give distinct mesh axes from "
                      f"{list(MESH_AXES)} (or null to replicate).")
  return tuple((name, tuple(overrides[name] or ()) if name in overrides else axes) for name, axes in RULES)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices (or `devices`); one axis may be -1 to take the rest.

  On TPUs the devices are laid out along the physical torus (`_device_grid`), so the innermost mesh axes
  (tensor, then fsdp), whose collectives are the most frequent, run between neighbouring chips."""
  devices = list(devices if devices is not None else jax.devices())
  return Mesh(_device_grid(mesh_sizes(cfg, len(devices)), devices), MESH_AXES)


def mesh_sizes(cfg: MeshConfig, count: int) -> list[int]:
  """[data, fsdp, tensor] of the mesh over `count` devices, -1 resolved (also for devices that are only planned)."""
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if count % fixed:
      raise UserError(f"mesh sizes {sizes} do not divide the {count} devices; change mesh.*.")
    sizes[sizes.index(-1)] = count // fixed
  if math.prod(sizes) != count:
    raise UserError(f"mesh data x fsdp x tensor = {math.prod(sizes)} but there are {count} devices; "
                    "set the mesh sizes so that their product equals the device count (or use -1).")
  return sizes


def _device_grid(sizes: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
  """`devices` as an array of `sizes`: mesh_utils' topology-aware layout on TPUs (real chips or the compile-only
  devices of a topology description), else, or where no layout maps `sizes` onto the torus, in the given order."""
  flat = np.asarray(devices).reshape(sizes)
  if devices[0].platform != "tpu" or len(devices) == 1:
    return flat
  for split in (False, True):  # split=True: one mesh axis may take part of a physical axis (e.g. 2 of a 4-ring)
    try:
      return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=split)
    except (NotImplementedError, ValueError, AssertionError):  # what it raises for a shape it cannot map
      continue
  return flat


def device_facts(mesh: Mesh) -> dict[str, Any]:
  """What a run's devices are: the mesh's, not the host's first device (a compile-only TPU mesh planned on a CPU
  host, or a mesh over part of the devices, reports its own kind and count)."""
  devices = mesh.devices.flat
  return {"platform": devices[0].platform, "kind": devices[0].device_kind, "count": int(mesh.devices.size),
          "processes": len({d.process_index for d in mesh.devices.flat})}


def spec_for(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh, rules: Rules = RULES) -> P:
  """The PartitionSpec that `rules` give a `shape` whose dims have logical names `axes`."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for dim, name in zip(shape, axes):
    targets = tuple(t for t in table.get(name, ()) if t not in used and mesh.shape[t] > 1)
    if targets and dim % math.prod(mesh.shape[t] for t in targets) == 0:
      used.update(targets)
      out.append(targets[0] if len(targets) == 1 else targets)
    else:
      out.append(None)
  return P(*out)


def spec_axes(spec: Sequence[str | tuple[str, ...] | None]) -> tuple[str, ...]:
  """The mesh axes a PartitionSpec (or a slice of its entries) splits over, in order."""
  return tuple(a for entry in spec if entry for a in (entry if isinstance(entry, tuple) else (entry,)))


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules = RULES) -> dict[str, Any]:
  """Pure-dict tree of NamedShardings for an (abstract) nnx param state, from each param's `axes`."""
  flat = {path: NamedSharding(mesh, spec_for(v.get_value().shape, v.get_metadata()["axes"], mesh, rules))
          for path, v in params_lib.flat_variables(abstract_state).items()}
  return params_lib.unflatten(flat)


def batch_shards(mesh: Mesh, rules: Rules = RULES) -> int:
  """How many ways the `batch` rule splits a batch: every global batch must be a multiple of this."""
  return math.prod(mesh.shape[a] for a in dict(rules)["batch"])


def check_batch_sizes(cfg: TrainConfig, mesh: Mesh, rules: Rules = RULES,
                      keys: tuple[str, ...] = ("batch_size", "eval_batch_size")) -> None:
  """Each global batch size in `keys` (a train microbatch for batch_size) splits evenly over the batch shards."""
  shards = batch_shards(mesh, rules)
  axes = " x ".join(f"mesh.{a}" for a in dict(rules)["batch"])
  for key in keys:
    size = getattr(cfg, key)
    what = f"train.{key}={size}"
    if key == "batch_size" and cfg.grad_accum > 1:
      size //= cfg.grad_accum
      what = f"train.batch_size / train.grad_accum = {size}"
    if size % shards:
      raise UserError(f"config key {what} is not divisible by the {shards} batch shards ({axes}); make it a "
                      "multiple.")


def batch_sharding(mesh: Mesh, rules: Rules = RULES) -> NamedSharding:
  """Leading (batch) dim split as the `batch` rule says (data and fsdp by default); the rest replicated."""
  return NamedSharding(mesh, spec_for((batch_shards(mesh, rules),), ("batch",), mesh, rules))


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh, rules: Rules = RULES) -> jax.Array:
  """`x` (an activation, while traced) pinned to the sharding `rules` give its logical `axes` on `mesh`."""
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(x.shape, axes, mesh, rules)))


def placed(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `abstract` carrying the matching `shardings`: a target that allocates nothing."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())

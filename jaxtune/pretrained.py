"""Builds a model from a HF checkpoint directly into its shardings: abstract init, then load."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxtune import sharding, weights
from jaxtune.config import ModelConfig
from jaxtune.errors import UserError
from jaxtune.models import FAMILIES, ModelFamily


@dataclasses.dataclass(frozen=True)
class Model:
  family: str  # key of FAMILIES (the HF model_type)
  cfg: Any  # the family's frozen config
  graphdef: nnx.GraphDef  # module structure; merge with params to call it
  abstract: dict[str, jax.ShapeDtypeStruct]  # flat param path -> shape/dtype
  shardings: dict[str, Any]  # pure-dict tree of NamedShardings, same structure as params

  def apply(self, params: dict[str, Any], batch: dict[str, jax.Array], **kwargs: Any) -> dict[str, jax.Array]:
    return nnx.merge(self.graphdef, params)(batch, **kwargs)


def family_of(hf_config: dict[str, Any]) -> tuple[str, ModelFamily]:
  model_type = hf_config.get("model_type")
  if model_type not in FAMILIES:
    raise UserError(f"model_type {model_type!r} in config.json is not supported; jaxtune knows "
                    f"{sorted(FAMILIES)}.")
  return model_type, FAMILIES[model_type]


def describe(family: str, cfg: Any, mesh: Mesh, seed: int = 0) -> Model:
  """Model structure and param shardings, without allocating any parameter."""
  module = FAMILIES[family].module
  abstract_module = nnx.eval_shape(lambda: module(cfg, rngs=nnx.Rngs(seed)))
  graphdef, state = nnx.split(abstract_module)
  abstract = {p: v.get_value() for p, v in sharding.flat_variables(state).items()}
  return Model(family, cfg, graphdef, abstract, sharding.param_shardings(state, mesh))


def init_params(model: Model, seed: int, only: set[str] | None = None) -> dict[str, jax.Array]:
  """Randomly initialised params (flat), each created on its devices; `only` limits which."""
  module = FAMILIES[model.family].module
  flat_shardings = sharding.flatten(model.shardings)
  keep = set(flat_shardings) if only is None else only

  def init() -> dict[str, jax.Array]:  # XLA drops the initialisers of params not returned
    state = nnx.state(module(model.cfg, rngs=nnx.Rngs(seed)))
    return {p: v.get_value() for p, v in sharding.flat_variables(state).items() if p in keep}

  return jax.jit(init, out_shardings={p: flat_shardings[p] for p in keep})()


def from_pretrained(model_cfg: ModelConfig, num_labels: int, mesh: Mesh, seed: int) -> tuple[Model, dict]:
  """(model, params): params from the checkpoint, new ones (model.new_params) initialised."""
  model_dir = weights.resolve_model_dir(model_cfg.path)
  hf_config = weights.read_hf_config(model_dir)
  family_name, family = family_of(hf_config)
  model = describe(family_name, family.config.from_hf(hf_config, num_labels, model_cfg.dropout), mesh, seed)
  loaded = weights.load_params(
      model.abstract, sharding.flatten(model.shardings), family.param_map(model.cfg),
      weights.SafetensorsReader(model_dir), new_params=model_cfg.new_params,
      unused_keys=model_cfg.unused_keys, buffer_keys=family.ignored_keys(model.cfg), base_prefix=family.base_prefix)
  fresh = init_params(model, seed, only=set(model.abstract) - set(loaded))
  return model, sharding.unflatten({**loaded, **fresh})


def model_dir_of(model_cfg: ModelConfig) -> Path:
  return weights.resolve_model_dir(model_cfg.path)

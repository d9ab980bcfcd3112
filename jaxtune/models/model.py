"""The model as jaxtune holds it: a family's NNX module split into structure, param shapes and shardings.

Nothing here reads weights (weights/pretrained.py does): `describe` builds the module abstractly (no
param is allocated) with its LoRA adapters, and gives every param its sharding from the logical axes
it declares; `init_params` creates fresh params directly on their devices; `Model.apply` runs the module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxtune import params as params_lib
from jaxtune import sharding
from jaxtune.config import LoraConfig, ModelConfig
from jaxtune.models import FAMILIES, layers, lora


@dataclasses.dataclass(frozen=True)
class Model:
  family: str  # key of FAMILIES (the HF model_type)
  cfg: Any  # the family's frozen config
  hf_config: dict[str, Any]  # the checkpoint's config.json (or the GGUF-derived one), for export
  graphdef: nnx.GraphDef  # module structure; merge with params to call it
  abstract: dict[str, jax.ShapeDtypeStruct]  # flat param path -> shape/dtype
  axes: dict[str, tuple[str | None, ...]]  # flat param path -> logical name of each dim
  shardings: dict[str, Any]  # pure-dict tree of NamedShardings, same structure as params
  rules: sharding.Rules  # logical -> mesh axes, for params (above) and activations (in apply)
  lora: LoraConfig = LoraConfig()  # adapters attached to the module (model.lora)
  frozen: frozenset[str] = frozenset()  # param paths that do not train (model.freeze, and the base under LoRA)

  def module(self, params: dict[str, Any]) -> nnx.Module:
    return nnx.merge(self.graphdef, params)

  def apply(self, params: dict[str, Any], batch: dict[str, jax.Array], **kwargs: Any) -> dict[str, jax.Array]:
    """The module's outputs, its activations constrained to the rules' shardings while traced."""
    adapter_rng = kwargs.get("dropout_rng") if self.lora.dropout > 0 else None
    with sharding.activation_rules(self.mesh, self.rules), layers.adapter_rng(adapter_rng):
      return self.module(params)(batch, **kwargs)

  @property
  def mesh(self) -> Mesh:
    return jax.tree.leaves(self.shardings)[0].mesh


def _construct(family: str, cfg: Any, lora_cfg: LoraConfig, seed: int) -> nnx.Module:
  """The family's module with its LoRA adapters attached (their init draws after the model's)."""
  rngs = nnx.Rngs(seed)
  module = FAMILIES[family].module(cfg, rngs=rngs)
  lora.attach(module, lora_cfg, rngs)
  return module


def describe(family: str, cfg: Any, mesh: Mesh, seed: int = 0, hf_config: dict[str, Any] | None = None,
             rules: sharding.Rules = sharding.RULES, model_cfg: ModelConfig | None = None) -> Model:
  """Model structure and param shardings, without allocating any parameter.

  `model_cfg` brings LoRA adapters (model.lora) and frozen params (model.freeze); None: neither."""
  lora_cfg = model_cfg.lora if model_cfg is not None else LoraConfig()
  abstract_module = nnx.eval_shape(lambda: _construct(family, cfg, lora_cfg, seed))
  graphdef, state = nnx.split(abstract_module)
  variables = params_lib.flat_variables(state)
  abstract = {p: v.get_value() for p, v in variables.items()}
  axes = {p: tuple(v.get_metadata()["axes"]) for p, v in variables.items()}
  frozen = lora.frozen(abstract, model_cfg) if model_cfg is not None else frozenset()
  return Model(family, cfg, hf_config or {}, graphdef, abstract, axes, sharding.param_shardings(state, mesh, rules),
               rules, lora_cfg, frozen)


def init_params(model: Model, seed: int, only: set[str] | None = None) -> dict[str, jax.Array]:
  """Randomly initialised params (flat), each created on its devices; `only` limits which."""
  flat_shardings = params_lib.flatten(model.shardings)
  keep = set(flat_shardings) if only is None else only

  def init() -> dict[str, jax.Array]:  # XLA drops the initialisers of params not returned
    state = nnx.state(_construct(model.family, model.cfg, model.lora, seed))
    return {p: v.get_value() for p, v in params_lib.flat_variables(state).items() if p in keep}

  return jax.jit(init, out_shardings={p: flat_shardings[p] for p in keep})()

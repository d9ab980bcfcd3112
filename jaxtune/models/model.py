"""The model as jaxtune holds it: a family's NNX module split into structure, param shapes and shardings.

Nothing here reads weights (weights/pretrained.py does): `describe` builds the module abstractly (no
param is allocated) with its LoRA adapters, and gives every param its sharding from the logical axes
it declares; `init_params` creates fresh params directly on their devices; `Model.apply` runs the module.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxtune import params as params_lib
from jaxtune import sharding
from jaxtune.config import LoraConfig, ModelConfig
from jaxtune.models import FAMILIES, attention, layers, lora, quant
from jaxtune.params import Params


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity: jit takes it as a static argument
class Model:
  family: str  # key of FAMILIES (the HF model_type)
  cfg: Any  # the family's frozen config
  hf_config: dict[str, Any]  # the checkpoint's config.json (or the GGUF-derived one), for export
  graphdef: nnx.GraphDef  # module structure; merged with params by `apply`
  abstract: Params  # param tree of ShapeDtypeStructs
  axes: dict[str, tuple[str | None, ...]]  # flat param path -> logical name of each dim (reports and tests)
  shardings: Params  # param tree of NamedShardings
  rules: sharding.Rules  # logical -> mesh axes, for params (above) and activations (in apply)
  lora: LoraConfig = LoraConfig()  # adapters attached to the module (model.lora)
  frozen: frozenset[str] = frozenset()  # param paths that do not train (model.freeze, and the base under LoRA)
  attention: str = "auto"  # model.attention: the attention kernel (models/attention.py chooses for the mesh)
  frozen_dtype: str = "float32"  # model.frozen_dtype: how `frozen` is held (weights/pretrained.py casts or quantises)
  # frozen kernel path -> its Dense's input dims, for the kernels held as models/quant.py's int8 / NF4
  quantised: dict[str, int] = dataclasses.field(default_factory=dict)

  @functools.cached_property
  def held(self) -> tuple[Params, Params]:
    """(abstract, shardings) of the params as a run holds them: `abstract` and `shardings` are the float32
    checkpoint's (what the loader reads); here the frozen params are bfloat16 (model.frozen_dtype bfloat16, int8
    or nf4), but for the int8 / NF4 kernels, which are their quantised arrays, placed by quant.placement. As
    QLoRA (bitsandbytes with torch_dtype bfloat16) keeps embeddings, norms and heads. The train state's layout."""
    if self.frozen_dtype == "float32":
      return self.abstract, self.shardings
    abstract, shardings = params_lib.flatten(self.abstract), params_lib.flatten(self.shardings)
    for path in self.frozen:
      if path in self.quantised:
        abstract[path] = quant.abstract(abstract[path], self.frozen_dtype, 1, self.quantised[path])
        shardings[path] = quant.placement(abstract[path], shardings[path])
      else:
        abstract[path] = jax.ShapeDtypeStruct(abstract[path].shape, jnp.bfloat16)
    return params_lib.unflatten(abstract), params_lib.unflatten(shardings)

  def split(self, tree: Params) -> tuple[Params, Params]:
    """(the params that train, the frozen ones) of a param tree (or of `abstract` / `shardings`)."""
    return params_lib.partition(tree, self.frozen)

  def module(self, params: Params, *more: Params) -> nnx.Module:
    """The module holding `params` (and, given disjoint trees, all of them)."""
    return nnx.merge(self.graphdef, params, *more)

  def apply(self, params: Params, *args: Any, frozen: Params | None = None, method: str = "__call__",
            **kwargs: Any) -> Any:
    """The module's `method` (its forward pass, or encode / init_cache / decode_step for generation) on `args`.

    Every call gets the same explicit layers.Context: activations constrained to the rules' shardings on the
    mesh, and LoRA dropout drawn from kwargs["dropout_rng"] in training. `frozen`: the params that do not
    train, when `params` holds only the trainable ones (the train step)."""
    adapter_rng = kwargs.get("dropout_rng") if self.lora.dropout > 0 else None
    ctx = layers.Context(self.mesh, self.rules, adapter_rng, self.attention)
    module = self.module(params, *([frozen] if frozen else []))
    return getattr(module, method)(*args, ctx=ctx, **kwargs)

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
  attention.prepare(model_cfg.attention if model_cfg is not None else "auto", mesh)
  abstract_module = nnx.eval_shape(lambda: _construct(family, cfg, lora_cfg, seed))
  graphdef, state = nnx.split(abstract_module)
  variables = params_lib.flat_variables(state)
  axes = {p: tuple(v.get_metadata()["axes"]) for p, v in variables.items()}
  frozen = lora.frozen(variables, model_cfg) if model_cfg is not None else frozenset()
  frozen_dtype = model_cfg.frozen_dtype if model_cfg is not None else "float32"
  quantised = lora.quantised(abstract_module, frozen, frozen_dtype)
  abstract = params_lib.unflatten({p: v.get_value() for p, v in variables.items()})
  shardings = sharding.param_shardings(state, mesh, rules)
  return Model(family, cfg, hf_config or {}, graphdef, abstract, axes, shardings, rules, lora_cfg, frozen,
               model_cfg.attention if model_cfg is not None else "auto", frozen_dtype, quantised)


def init_params(model: Model, seed: int, only: Collection[str] | None = None) -> Params:
  """Randomly initialised params, each created on its devices; `only` (param paths) limits which."""
  keep = set(model.axes) if only is None else set(only)
  _, shardings = params_lib.partition(model.shardings, keep)

  def init() -> Params:  # XLA drops the initialisers of params not returned
    state = nnx.state(_construct(model.family, model.cfg, model.lora, seed))
    return params_lib.unflatten({p: v.get_value() for p, v in params_lib.flat_variables(state).items() if p in keep})

  return jax.jit(init, out_shardings=shardings)()

"""Builds a model from a HF checkpoint directly into its shardings: abstract init, then load."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import transformers
from flax import nnx
from jax.sharding import Mesh

from jaxtune import gguf, lora, sharding, weights
from jaxtune.config import LoraConfig, ModelConfig
from jaxtune.errors import UserError
from jaxtune.models import FAMILIES, ModelFamily, layers


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


def family_of(hf_config: dict[str, Any]) -> tuple[str, ModelFamily]:
  model_type = hf_config.get("model_type")
  if model_type not in FAMILIES:
    raise UserError(f"model_type {model_type!r} in config.json is not supported; jaxtune knows "
                    f"{sorted(FAMILIES)}.")
  return model_type, FAMILIES[model_type]


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
  variables = sharding.flat_variables(state)
  abstract = {p: v.get_value() for p, v in variables.items()}
  axes = {p: tuple(v.get_metadata()["axes"]) for p, v in variables.items()}
  frozen = lora.frozen(abstract, model_cfg) if model_cfg is not None else frozenset()
  return Model(family, cfg, hf_config or {}, graphdef, abstract, axes, sharding.param_shardings(state, mesh, rules),
               rules, lora_cfg, frozen)


def init_params(model: Model, seed: int, only: set[str] | None = None) -> dict[str, jax.Array]:
  """Randomly initialised params (flat), each created on its devices; `only` limits which."""
  flat_shardings = sharding.flatten(model.shardings)
  keep = set(flat_shardings) if only is None else only

  def init() -> dict[str, jax.Array]:  # XLA drops the initialisers of params not returned
    state = nnx.state(_construct(model.family, model.cfg, model.lora, seed))
    return {p: v.get_value() for p, v in sharding.flat_variables(state).items() if p in keep}

  return jax.jit(init, out_shardings={p: flat_shardings[p] for p in keep})()


def open_checkpoint(model_cfg: ModelConfig) -> tuple[dict[str, Any], Any]:
  """(HF config dict, tensor reader) of an HF directory, hub id or llama.cpp .gguf file."""
  local = weights.resolve_path(model_cfg.path)
  if local.suffix == ".gguf":
    reader = gguf.GGUFReader(local)
    return reader.hf_config(), reader
  model_dir = weights.resolve_model_dir(model_cfg.path)
  return weights.read_hf_config(model_dir), weights.SafetensorsReader(model_dir)


def load_tokenizer(model_cfg: ModelConfig) -> Any:
  """model.tokenizer if set, else the tokenizer stored with the checkpoint (HF dir or GGUF metadata)."""
  source = model_cfg.tokenizer or model_cfg.path
  local = weights.resolve_path(source)
  try:
    if local.suffix == ".gguf":
      return gguf.load_tokenizer(local)
    return transformers.AutoTokenizer.from_pretrained(local)
  except (OSError, ValueError) as e:
    raise UserError(f"no tokenizer could be loaded from {source} ({type(e).__name__}); set model.tokenizer "
                    "to an HF tokenizer directory or hub id.") from None


def check_kind(hf_config: dict[str, Any], model_cfg: ModelConfig, head: str | None) -> tuple[str, ModelFamily]:
  """(family name, family) of an HF config; a family that cannot carry `head` (a task's name) is a UserError."""
  family_name, family = family_of(hf_config)
  kind = {"causal_lm": "decoder", "seq2seq": "seq2seq"}.get(head or "", "encoder")
  if head is not None and family.kind != kind:
    raise UserError(f"model.path {model_cfg.path} is a {family_name} {family.kind}, but task {head} needs "
                    f"{'an' if kind == 'encoder' else 'a'} {kind} model; change task or model.path.")
  return family_name, family


def from_config(hf_config: dict[str, Any], model_cfg: ModelConfig, num_labels: int, mesh: Mesh, seed: int = 0,
                head: str | None = None, rules: sharding.Rules = sharding.RULES) -> Model:
  """The model an HF config (from `open_checkpoint`) describes, shardings included; no weight is read.

  `head` is the task (classification, question_answering, token_classification, causal_lm), which
  decides the encoders' head; a model of the wrong kind for it is a UserError. None: the family's default.
  """
  family_name, family = check_kind(hf_config, model_cfg, head)
  task_head = {} if head is None else {"head": head}
  try:
    cfg = family.config.from_hf(hf_config, num_labels, model_cfg.dropout, **task_head)
  except (TypeError, KeyError) as e:  # a config.json without the fields its model_type has
    raise UserError(f"{model_cfg.path}: config.json lacks fields ({e}) that a {family_name} model needs; use the "
                    "checkpoint's own config.json.") from None
  cfg = dataclasses.replace(cfg, scan_layers=model_cfg.scan_layers)
  return describe(family_name, cfg, mesh, seed, hf_config, rules, model_cfg)


def load_params(model: Model, model_cfg: ModelConfig, reader: Any, seed: int,
                only: frozenset[str] | None = None) -> dict[str, Any]:
  """Params read from `reader` (see `open_checkpoint`) straight into their shardings; new_params and LoRA
  adapters initialised. With `only`, just those params (flat), all read from the checkpoint."""
  family = FAMILIES[model.family]
  loaded = weights.load_params(
      model.abstract, sharding.flatten(model.shardings), family.param_map(model.cfg),
      reader, new_params=() if only is not None else (*model_cfg.new_params, lora.ADAPTER),
      unused_keys=model_cfg.unused_keys, buffer_keys=family.ignored_keys(model.cfg), base_prefix=family.base_prefix,
      only=only)
  if only is not None:
    return loaded
  fresh = init_params(model, seed, only=set(model.abstract) - set(loaded))
  return sharding.unflatten({**loaded, **fresh})


def from_pretrained(model_cfg: ModelConfig, num_labels: int, mesh: Mesh, seed: int, head: str | None = None,
                    rules: sharding.Rules = sharding.RULES) -> tuple[Model, dict]:
  """(model, params): params from the checkpoint, new ones (model.new_params) initialised."""
  hf_config, reader = open_checkpoint(model_cfg)  # opened once: parsing a GGUF file takes seconds
  model = from_config(hf_config, model_cfg, num_labels, mesh, seed, head, rules)
  return model, load_params(model, model_cfg, reader, seed)

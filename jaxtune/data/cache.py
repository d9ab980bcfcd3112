"""Tokenised splits cached on disk as memory-mapped arrays, keyed by the rows, the tokenizer and the data config.

An entry is a directory `<data.cache_dir>/<key>/` holding one flat binary file per field of the task's encoded
split (classification.Encoded, lm.LMExamples, ...): a fixed-width array as its rows back to back, a ragged field
(token ids of varying length) as one flat array plus an int64 offsets file, so row i is flat[off[i]:off[i + 1]].
Read back, every file is memory-mapped: opening an entry costs its offsets and per-row lengths, a batch reads
only its rows, and the feed's positional order (and so an exact resume) needs nothing beyond that.

The key is a sha256 of the content of the rows that are encoded (their Arrow data, so file contents, a held-out
subset and `limit` all count), of the tokenizer (its vocabulary, normaliser, special tokens and chat template,
not its path), of every data-config field that can change an encoded row, and of the encoding code itself; any
change names another entry. A build writes into a temporary directory a chunk of rows at a time (never the whole
split in memory) and renames it into place after `manifest.json`, written last with every file's size and the
index files' sha256. An entry whose manifest is missing, stale or disagrees with its files is removed and rebuilt.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import os
import pickle
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxtune.data import hostrows

FORMAT = 1  # the entry layout; bump it when the files' meaning changes
CHUNK_ROWS = 4096  # rows encoded and written at a time by `in_chunks`
STATS = ("lengths", "target_lengths")  # per-row lengths the batch order and collate read of every row
# Data-config fields that never change an encoded row: the split specs (the rows' content is keyed instead),
# how rows are ordered and padded into batches, streaming, and where the cache is.
UNKEYED = ("train", "validation", "test", "validation_holdout", "streaming", "stream_shuffle_window",
           "length_buckets", "group_by_length", "cache_dir")
STALE_TMP_S = 24 * 3600  # a temporary build directory this old belongs to a build that died
log = logging.getLogger(__name__)


class Ragged(Sequence):
  """Rows of a flat (memory-mapped) array cut at `offsets`: row i is flat[offsets[i]:offsets[i + 1]]."""

  def __init__(self, flat: np.ndarray, offsets: np.ndarray):
    self.flat, self.offsets = flat, offsets

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: Any) -> Any:
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    return self.flat[self.offsets[i]:self.offsets[i + 1]]


class Texts(Ragged):
  """Strings stored as utf-8 bytes in a Ragged layout."""

  def __getitem__(self, i: Any) -> Any:
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    return self.flat[self.offsets[i]:self.offsets[i + 1]].tobytes().decode()


def key(**parts: Any) -> str:
  """sha256 of the key parts (JSON; values that are not JSON by their repr)."""
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


def rows_digest(ds: Any, batch_size: int = 10_000) -> str:
  """sha256 of a datasets.Dataset's rows (schema and values, in order), read a batch at a time."""
  import pyarrow as pa

  h = hashlib.sha256(str(len(ds)).encode())
  for table in ds.with_format("arrow").iter(batch_size=batch_size):
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
      writer.write_table(table)
    h.update(sink.getvalue())
  return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
  """sha256 of what a tokenizer encodes with: its backend's state (vocabulary, merges, normaliser, pre- and post-
  processor, added tokens) or a slow one's vocabulary and options, its special tokens and chat template. Not its
  path, and not the truncation and padding state, which each call sets: the copy a run saves digests the same."""
  import tokenizers
  import transformers

  parts: dict[str, Any] = {"class": type(tokenizer).__name__, "special": tokenizer.special_tokens_map,
                           "chat_template": getattr(tokenizer, "chat_template", None),
                           "versions": [transformers.__version__, tokenizers.__version__]}
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    state = json.loads(backend.to_str())
    for call_state in ("truncation", "padding"):
      state.pop(call_state, None)
    parts["backend"] = state
  else:
    parts["vocab"] = sorted(tokenizer.get_vocab().items())
    parts["options"] = {k: v for k, v in tokenizer.init_kwargs.items()
                        if k not in ("name_or_path", "is_local", "local_files_only") and not k.endswith("_file")}
  return key(**parts)


@functools.cache
def code_digest(*modules: str) -> str:
  """sha256 of the source of the modules that encode rows (and of this one): editing them names new entries."""
  h = hashlib.sha256()
  for name in (*modules, __name__):
    h.update(Path(importlib.import_module(name).__file__).read_bytes())
  return h.hexdigest()


def data_fields(cfg: Any) -> dict[str, Any]:
  """The data-config fields that can change an encoded row (every field but UNKEYED)."""
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in UNKEYED}


def in_chunks(ds: Any, encode: Callable[[Any], Any], whole: Callable[[], Any]) -> Iterator[Any]:
  """encode(rows of `ds`) CHUNK_ROWS rows at a time, for tasks whose rows are encoded independently. A bad row
  past the first chunk re-encodes the whole split (`whole`) so that its error numbers the row within the split
  (which data/origin.py turns into its file and line)."""
  from jaxtune.errors import UserError

  for start in range(0, len(ds), CHUNK_ROWS):
    try:
      yield encode(ds.select(range(start, min(start + CHUNK_ROWS, len(ds)))))
    except UserError:
      if start:
        whole()
      raise


def load(cache_dir: str, parts: dict[str, Any], ds: Any, encode: Callable[[Any], Any], name: str,
         per_host: bool = False, stats: Sequence[str] = ("lengths",), chunked: bool = True) -> Any:
  """A split's encoded rows, `encode(ds)`, read from its entry under `cache_dir` when there is one, else built
  there (`chunked`: CHUNK_ROWS rows at a time; a task whose rows refer to each other across the split, such as
  QA's windows to their examples, builds in one piece). `parts` key the entry beside the rows' content.

  `per_host` (a multi-process run's train split) gives a hostrows.Rows: each process reads only its own rows
  from an entry, or without one tokenises only them and builds nothing, which would take every row in one
  process. Without `cache_dir` it is `encode(ds)` (or the hostrows.Rows) as if there were no cache."""
  whole = lambda: encode(ds)
  store = Store(cache_dir) if cache_dir else None
  entry_key = key(rows=rows_digest(ds), **parts) if store else ""
  entry = store.open(entry_key) if store else None
  if per_host:
    if entry is None:
      return hostrows.Rows.of_dataset(ds, encode, stats)
    return hostrows.Rows(len(entry), functools.partial(take, entry), whole, stats)
  if entry is not None:
    return entry
  if store is None:
    return whole()
  return store.build(entry_key, in_chunks(ds, encode, whole) if chunked else [whole()], {**parts, "split": name})


def take(data: Any, rows: np.ndarray) -> Any:
  """The encoded split's rows `rows` (in that order) as a new split of the same class, read from the entry:
  what a process of a multi-process run reads of a cached train split (hostrows.Rows)."""
  rows = np.asarray(rows, np.int64)
  fields = {}
  for name in type(data).ROW_FIELDS:
    value = getattr(data, name)
    if isinstance(value, np.ndarray):
      fields[name] = np.array(value[rows])
    else:
      fields[name] = [np.array(x) if isinstance(x, np.ndarray) else x for x in (value[int(r)] for r in rows)]
  return type(data)(**fields)


class Store:
  """The entries under one cache root."""

  def __init__(self, root: str | Path):
    self.root = Path(root).expanduser()

  def get(self, entry_key: str, chunks: Callable[[], Iterable[Any]], parts: dict[str, Any] | None = None) -> Any:
    """The entry `entry_key`, built from `chunks()` (the encoded split a piece at a time) when missing or damaged."""
    data = self.open(entry_key)
    return data if data is not None else self.build(entry_key, chunks(), parts)

  def open(self, entry_key: str) -> Any | None:
    """The entry's encoded split, memory-mapped; None when there is none. A damaged one is removed (and None)."""
    path = self.root / entry_key
    if not path.exists():
      return None
    try:
      return _read(path, entry_key)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError, pickle.UnpicklingError,
            EOFError) as e:
      log.warning("data cache entry %s is damaged (%s: %s); rebuilding it", path, type(e).__name__, e)
      shutil.rmtree(path, ignore_errors=True)
      return None

  def build(self, entry_key: str, chunks: Iterable[Any], parts: dict[str, Any] | None = None) -> Any:
    """Writes the chunks into a temporary directory, then renames it into place; the entry, opened."""
    self.root.mkdir(parents=True, exist_ok=True)
    self._sweep()
    tmp = self.root / f"tmp-{entry_key}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    writer = _Writer(tmp)
    try:
      for chunk in chunks:
        writer.append(chunk)
      writer.commit(entry_key, parts or {})
      final = self.root / entry_key
      if final.exists():  # another process built it meanwhile, or a damaged one is in the way
        theirs = self.open(entry_key)
        if theirs is not None:
          return theirs
      os.rename(tmp, final)
    finally:
      writer.close()
      shutil.rmtree(tmp, ignore_errors=True)
    data = self.open(entry_key)
    if data is None:
      raise OSError(f"data cache entry {self.root / entry_key} could not be read back after writing it")
    return data

  def _sweep(self) -> None:
    """Removes temporary directories of builds that died (older than STALE_TMP_S)."""
    now = time.time()
    for tmp in self.root.glob("tmp-*"):
      try:
        if now - tmp.stat().st_mtime > STALE_TMP_S:
          shutil.rmtree(tmp, ignore_errors=True)
      except OSError:
        pass


def _kind(value: Any) -> str:
  if isinstance(value, np.ndarray):
    return "array"
  if isinstance(value, (list, tuple, Ragged)) and value and all(isinstance(x, np.ndarray) for x in value):
    return "ragged"
  if isinstance(value, (list, tuple, Ragged)) and value and all(isinstance(x, str) for x in value):
    return "text"
  return "object"


class _Writer:
  """Appends encoded chunks (instances of one dataclass) to the files of an entry being built in `path`."""

  def __init__(self, path: Path):
    path.mkdir(parents=True)
    self.path = path
    self.cls: type | None = None
    self.rows = 0
    self.fields: dict[str, dict[str, Any]] = {}
    self.objects: dict[str, list[Any]] = {}
    self.files: dict[str, Any] = {}  # name -> open file
    self.hashes: dict[str, Any] = {}
    self.ends: dict[str, int] = {}  # ragged field -> items written so far
    self.stats: dict[str, str] = {}
    self.max_token_id = 0

  def _write(self, name: str, data: np.ndarray | bytes) -> None:
    if name not in self.files:
      self.files[name], self.hashes[name] = open(self.path / name, "wb"), hashlib.sha256()
    buf = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else data
    self.files[name].write(buf)
    self.hashes[name].update(buf)

  def append(self, chunk: Any) -> None:
    if self.cls is None:
      self.cls = type(chunk)
    elif type(chunk) is not self.cls:
      raise TypeError(f"chunk of {type(chunk).__name__} in an entry of {self.cls.__name__}")
    n = len(chunk)
    for f in dataclasses.fields(chunk):
      value = getattr(chunk, f.name)
      kind = _kind(value)
      if kind == "object" and isinstance(value, (list, tuple)) and not value:
        kind = self.fields.get(f.name, {}).get("kind", kind)  # an empty chunk of a ragged or text field
      spec = self.fields.setdefault(f.name, {"kind": kind, "count": 0})
      if spec["kind"] != kind and kind != "object":
        raise TypeError(f"field {f.name} is {kind} in one chunk and {spec['kind']} in another")
      if kind == "array":
        spec.update(dtype=value.dtype.str, tail=list(value.shape[1:]))
        self._write(f.name + ".bin", value)
        spec["count"] += len(value)
      elif kind in ("ragged", "text") and value:
        as_bytes = lambda x: np.frombuffer(x.encode(), np.uint8)
        parts = [as_bytes(x) for x in value] if kind == "text" else [np.asarray(x) for x in value]
        if kind == "ragged":
          spec.update(dtype=parts[0].dtype.str, tail=list(parts[0].shape[1:]))
        lengths = np.fromiter((len(p) for p in parts), np.int64, len(parts))
        ends = self.ends.get(f.name, 0) + np.cumsum(lengths)
        self._write(f.name + ".bin", np.concatenate(parts) if parts else np.zeros(0, np.uint8))
        self._write(f.name + ".off", ends)
        self.ends[f.name] = int(ends[-1]) if len(ends) else self.ends.get(f.name, 0)
        spec["count"] += len(value)
      elif kind == "object":
        self.objects.setdefault(f.name, []).append(value)
    for stat in STATS:
      if hasattr(type(chunk), stat):
        values = np.asarray(getattr(chunk, stat), np.int32)
        self.stats[stat] = values.dtype.str
        self._write(f"stat.{stat}.bin", values)
    self.max_token_id = max(self.max_token_id, int(chunk.max_token_id) if n else 0)
    self.rows += n

  def close(self) -> None:
    for f in self.files.values():
      f.close()

  def commit(self, entry_key: str, parts: dict[str, Any]) -> None:
    """Pickles the object fields, syncs every file and writes the manifest last."""
    if self.cls is None:
      raise ValueError("an entry needs at least one chunk")
    for name, values in self.objects.items():
      value = values[0] if len(values) == 1 else [x for v in values for x in v]
      self._write(name + ".pkl", pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    for name, spec in self.fields.items():  # a ragged field whose every row was empty still needs its files
      if spec["kind"] in ("ragged", "text") and name + ".off" not in self.files:
        spec.setdefault("dtype", np.dtype(np.int32).str)
        spec.setdefault("tail", [])
        self._write(name + ".bin", b"")
        self._write(name + ".off", np.zeros(0, np.int64))
    files = {}
    for name, f in self.files.items():
      f.flush()
      os.fsync(f.fileno())
      f.close()
      files[name] = {"bytes": (self.path / name).stat().st_size, "sha256": self.hashes[name].hexdigest()}
    manifest = {"format": FORMAT, "key": entry_key, "class": f"{self.cls.__module__}:{self.cls.__qualname__}",
                "rows": self.rows, "fields": self.fields, "stats": self.stats, "max_token_id": self.max_token_id,
                "files": files, "parts": parts, "created": time.time()}
    with open(self.path / "manifest.json", "w") as f:
      json.dump(manifest, f, indent=1, default=repr)
      f.flush()
      os.fsync(f.fileno())


def _read(path: Path, entry_key: str) -> Any:
  """The entry at `path`, checked against its manifest: every file's size, the index files' sha256."""
  manifest = json.loads((path / "manifest.json").read_text())
  if manifest.get("format") != FORMAT or manifest.get("key") != entry_key:
    raise ValueError(f"manifest format {manifest.get('format')} / key {manifest.get('key')} is not this one's")
  for name, info in manifest["files"].items():
    size = (path / name).stat().st_size
    if size != info["bytes"]:
      raise ValueError(f"{name} holds {size} bytes, its manifest {info['bytes']}")
    if not name.endswith(".bin") or name.startswith("stat."):  # offsets, lengths, objects: small, read whole
      if hashlib.sha256((path / name).read_bytes()).hexdigest() != info["sha256"]:
        raise ValueError(f"{name} does not match its checksum")
  module, _, qualname = manifest["class"].partition(":")
  if not module.startswith("jaxtune."):
    raise ValueError(f"class {manifest['class']} is not jaxtune's")
  cls = getattr(importlib.import_module(module), qualname)
  rows, fields = manifest["rows"], {}
  for name, spec in manifest["fields"].items():
    kind = spec["kind"]
    if kind == "object":
      fields[name] = pickle.loads((path / (name + ".pkl")).read_bytes())
      continue
    dtype, tail = np.dtype(spec["dtype"]) if kind != "text" else np.dtype(np.uint8), tuple(spec.get("tail", ()))
    if kind == "array":
      fields[name] = _mapped(path / (name + ".bin"), dtype, (spec["count"], *tail))
      continue
    offsets = np.concatenate([[0], np.fromfile(path / (name + ".off"), np.int64)])
    if len(offsets) != spec["count"] + 1:
      raise ValueError(f"{name} has {len(offsets) - 1} offsets for {spec['count']} rows")
    flat = _mapped(path / (name + ".bin"), dtype, (int(offsets[-1]), *tail))
    fields[name] = (Texts if kind == "text" else Ragged)(flat, offsets)
  data = cls(**fields)
  if len(data) != rows:
    raise ValueError(f"{len(data)} rows, its manifest {rows}")
  for stat, dtype in manifest["stats"].items():  # cached properties, seeded: reading them would touch every row
    data.__dict__[stat] = np.fromfile(path / f"stat.{stat}.bin", np.dtype(dtype))
  data.__dict__["max_token_id"] = manifest["max_token_id"]
  return data


def _mapped(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
  """A read-only memory map of `path` as an ndarray (an empty array for an empty file, which mmap refuses)."""
  if int(np.prod(shape)) == 0:
    return np.zeros(shape, dtype)
  return np.asarray(np.memmap(path, dtype=dtype, mode="r", shape=shape))

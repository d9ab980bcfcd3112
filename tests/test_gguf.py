"""GGUF import: the packaged SmolLM2 file read as transformers reads it; Q/K un-permutation; bad files."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from jaxtune.errors import UserError
from jaxtune.weights import gguf as jgguf


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim: HF rows -> GGUF rows."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def smollm2() -> Path:
  return jgguf.find_packaged_smollm2()


@pytest.fixture(scope="module")
def reader(smollm2) -> jgguf.GGUFReader:
  return jgguf.GGUFReader(smollm2)


@pytest.fixture(scope="module")
def raw(smollm2) -> gguf.GGUFReader:
  """The gguf package's own view of the file: metadata fields and still-quantised tensors."""
  return gguf.GGUFReader(smollm2)


@pytest.fixture(scope="module")
def reference(smollm2):
  """transformers' own GGUF import of the same file: (config, HF name -> tensor, model state-dict keys)."""
  import torch
  import transformers
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  config = transformers.AutoConfig.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
  with torch.device("meta"):  # only the names are needed; from_pretrained itself would want accelerate
    model = transformers.AutoModelForCausalLM.from_config(config)
  tensors = load_gguf_checkpoint(smollm2, return_tensors=True, model_to_load=model)["tensors"]
  return config, tensors, set(model.state_dict())


def test_tensors_equal_transformers_import(reader, reference):
  _, tensors, state_keys = reference
  keys = reader.keys()
  assert keys == set(tensors)
  assert reader.hf_config()["tie_word_embeddings"] and "lm_head.weight" not in keys
  assert state_keys == keys | {"lm_head.weight"}  # tied: HF's lm_head is embed_tokens
  assert len(keys) == 2 + 30 * 9
  for key in sorted(keys):
    got, want = reader.get(key), tensors[key].numpy()
    assert got.dtype == np.float32 and got.shape == want.shape, key
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=key)


def test_real_q_and_k_need_the_unpermutation(raw, reader, reference):
  """Without the un-permutation the real q/k rows differ from transformers' (so the test above checks it)."""
  _, tensors, _ = reference
  by_name = {t.name: t for t in raw.tensors}
  for gguf_name, key in [("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
                         ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight")]:
    t = by_name[gguf_name]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
    rows = gguf.dequantize(t.data, t.tensor_type)
    assert not np.allclose(rows, tensors[key].numpy(), atol=1e-3), key
    np.testing.assert_array_equal(reader.get(key), tensors[key].numpy())


def test_config_equals_transformers_config(reader, reference):
  config, _, _ = reference
  hf = reader.hf_config()
  assert hf["model_type"] == config.model_type == "llama"
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
              "eos_token_id", "pad_token_id"):
    assert hf[key] == getattr(config, key), key
  assert hf["rms_norm_eps"] == pytest.approx(config.rms_norm_eps, rel=1e-6)
  assert hf["rope_theta"] == config.rope_parameters["rope_theta"] == 100000.0
  assert hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"]) == config.head_dim == 64
  assert "rope_scaling" not in hf and config.rope_parameters["rope_type"] == "default"
  assert hf["num_key_value_heads"] < hf["num_attention_heads"]  # GQA: k uses its own head count


@pytest.mark.parametrize("n_head,n_head_kv,head_dim", [(4, 4, 8), (9, 3, 64), (6, 2, 12)])
def test_unpermute_inverts_llama_cpp_permute(n_head, n_head_kv, head_dim):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(n_head * head_dim, 5)).astype(np.float32)
  k = rng.normal(size=(n_head_kv * head_dim, 5)).astype(np.float32)
  np.testing.assert_array_equal(jgguf.unpermute_qk(llama_cpp_permute(q, n_head, n_head), n_head), q)
  np.testing.assert_array_equal(jgguf.unpermute_qk(llama_cpp_permute(k, n_head, n_head_kv), n_head_kv), k)
  assert not np.array_equal(llama_cpp_permute(q, n_head), q)  # the permutation is not trivial
  wrong = jgguf.unpermute_qk(llama_cpp_permute(k, n_head, n_head_kv), 2 * n_head_kv)  # heads of half the size
  assert not np.array_equal(wrong, k)


def test_unpermuted_rows_rotate_as_hf_rope():
  """llama.cpp's interleaved rope on GGUF rows equals HF's rotate-half rope on our un-permuted rows."""
  n_head, head_dim, pos = 3, 8, 5.0
  w_hf = np.random.default_rng(1).normal(size=(n_head * head_dim, 7))
  x = np.random.default_rng(2).normal(size=7)
  angle = pos * 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)  # (K/2,)
  cos, sin = np.cos(angle), np.sin(angle)
  q_gguf = (llama_cpp_permute(w_hf, n_head) @ x).reshape(n_head, head_dim // 2, 2)
  roped_gguf = np.stack([q_gguf[..., 0] * cos - q_gguf[..., 1] * sin,  # pairs (2i, 2i+1)
                         q_gguf[..., 0] * sin + q_gguf[..., 1] * cos], -1).reshape(-1)
  q_hf = (jgguf.unpermute_qk(llama_cpp_permute(w_hf, n_head), n_head) @ x).reshape(n_head, 2, head_dim // 2)
  roped_hf = np.stack([q_hf[:, 0] * cos - q_hf[:, 1] * sin,  # pairs (i, i + K/2)
                       q_hf[:, 0] * sin + q_hf[:, 1] * cos], 1).reshape(-1)
  np.testing.assert_allclose(jgguf.unpermute_qk(roped_gguf[:, None], n_head)[:, 0], roped_hf, atol=1e-12)


RawTensor = tuple[np.ndarray, tuple[int, ...], gguf.GGMLQuantizationType]  # bytes, byte shape, type


def write_tiny_llama(path: Path, tensors: dict[str, np.ndarray], arch: str = "llama",
                     raw: dict[str, RawTensor] | None = None) -> Path:
  """A 1-layer llama GGUF (D 12, 3 heads, 1 kv head, F 20, V 10) holding `tensors` (numpy order)."""
  w = gguf.GGUFWriter(path, arch)
  w.add_context_length(64)
  w.add_embedding_length(12)
  w.add_block_count(1)
  w.add_feed_forward_length(20)
  w.add_head_count(3)
  w.add_head_count_kv(1)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
  w.add_rope_scaling_factor(2.0)
  for name, array in tensors.items():
    w.add_tensor(name, array)
  for name, (data, shape, qtype) in (raw or {}).items():
    w.add_tensor(name, data, raw_shape=shape, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_synthetic_file_round_trips_hf_layout(tmp_path):
  """HF tensors written as llama.cpp writes them (permuted q/k, F16 too) come back in HF layout."""
  rng = np.random.default_rng(0)
  hf = {"model.embed_tokens.weight": (10, 12), "model.norm.weight": (12,), "lm_head.weight": (10, 12),
        "model.layers.0.self_attn.q_proj.weight": (12, 12), "model.layers.0.self_attn.k_proj.weight": (4, 12),
        "model.layers.0.self_attn.v_proj.weight": (4, 12), "model.layers.0.self_attn.o_proj.weight": (12, 12),
        "model.layers.0.mlp.gate_proj.weight": (20, 12), "model.layers.0.mlp.up_proj.weight": (20, 12),
        "model.layers.0.mlp.down_proj.weight": (12, 20), "model.layers.0.input_layernorm.weight": (12,),
        "model.layers.0.post_attention_layernorm.weight": (12,)}
  hf = {k: rng.normal(size=s).astype(np.float16 if "mlp" in k else np.float32) for k, s in hf.items()}
  to_gguf = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
  to_gguf |= {f"model.layers.0.{v}": f"blk.0.{k}" for k, v in jgguf.BLOCK.items()}
  written = {}
  for key, array in hf.items():
    if "q_proj" in key:
      array = llama_cpp_permute(array, 3, 3)
    elif "k_proj" in key:
      array = llama_cpp_permute(array, 3, 1)
    written[to_gguf[key.removesuffix(".weight")] + ".weight"] = array
  r = jgguf.GGUFReader(write_tiny_llama(tmp_path / "tiny.gguf", written))
  assert r.keys() == set(hf)
  for key, want in hf.items():
    got = r.get(key)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=key)
  cfg = r.hf_config()
  assert cfg["tie_word_embeddings"] is False and cfg["vocab_size"] == 10 and cfg["num_key_value_heads"] == 1
  assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 10000.0 and "head_dim" not in cfg
  assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


def test_tokenizer_matches_the_gguf_vocab_and_config(smollm2, raw, reader):
  tok = jgguf.load_tokenizer(smollm2)
  assert tok.is_fast
  vocab = raw.fields["tokenizer.ggml.tokens"].contents()
  text = "Hello world, how are you?"
  ids = tok(text)["input_ids"]  # SmolLM2 adds no BOS (tokenizer.ggml.add_bos_token is false)
  assert [vocab[i] for i in ids] == ["Hello", "Ġworld", ",", "Ġhow", "Ġare", "Ġyou", "?"]
  assert tok.decode(ids) == text
  for text in ["Grüße, 東京! 12345", "  two  spaces\nand a newline", "<|im_start|>user\nHi<|im_end|>"]:
    assert tok.decode(tok(text)["input_ids"]) == text
  assert tok("<|im_end|>")["input_ids"] == [reader.hf_config()["eos_token_id"]]
  assert tok.eos_token_id == reader.hf_config()["eos_token_id"] == vocab.index("<|im_end|>")
  assert tok.chat_template == raw.fields["tokenizer.chat_template"].contents()
  prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
  assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n")


def test_non_gguf_file_is_an_error(tmp_path):
  bad = tmp_path / "model.gguf"
  bad.write_bytes(b"not a gguf file at all" * 10)
  with pytest.raises(UserError, match=r"model\.gguf is not a readable GGUF file"):
    jgguf.GGUFReader(bad)
  with pytest.raises(UserError, match=r"does not exist"):
    jgguf.GGUFReader(tmp_path / "missing.gguf")


def test_non_llama_and_undequantisable_files_are_errors(tmp_path):
  norm = {"output_norm.weight": np.ones(12, np.float32)}
  with pytest.raises(UserError, match=r"'qwen2' model.*only GGUF files with general.architecture 'llama'"):
    jgguf.GGUFReader(write_tiny_llama(tmp_path / "qwen.gguf", norm, arch="qwen2"))
  with pytest.raises(UserError, match=r"tensor 'blk\.0\.ffn_gate_exps\.weight'.*does not use"):
    jgguf.GGUFReader(write_tiny_llama(tmp_path / "moe.gguf", {"blk.0.ffn_gate_exps.weight": np.ones((2, 3))}))
  q8_1 = gguf.GGMLQuantizationType.Q8_1  # a type with no numpy dequantiser in the gguf package
  up = (np.zeros((20, 40), np.uint8), (20, 40), q8_1)  # 20 rows of one 40-byte block (32 values)
  r = jgguf.GGUFReader(write_tiny_llama(tmp_path / "q81.gguf", norm, raw={"blk.0.ffn_up.weight": up}))
  with pytest.raises(UserError, match=r"tensor blk\.0\.ffn_up\.weight has type Q8_1"):
    r.get("model.layers.0.mlp.up_proj.weight")
  r = jgguf.GGUFReader(write_tiny_llama(tmp_path / "q8.gguf", {"blk.0.attn_q.weight": np.ones((8, 12), np.float32)}))
  with pytest.raises(UserError, match=r"attn_q\.weight has 8 rows, not a multiple of 2 x 3 heads"):
    r.get("model.layers.0.self_attn.q_proj.weight")

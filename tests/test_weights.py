"""Strict checkpoint import: sharded safetensors load; missing, unexpected and misshapen keys fail."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxtune import params as params_lib
from jaxtune import sharding
from jaxtune.config import MeshConfig, ModelConfig
from jaxtune.errors import UserError
from jaxtune.weights import hf, pretrained

MESH = sharding.make_mesh(MeshConfig())


def load(model_dir, **kw):
  return pretrained.from_pretrained(ModelConfig(path=str(model_dir), **kw), 2, MESH, seed=0)


def edited_copy(src, dst, edit):
  """A copy of the model dir whose safetensors dict is passed through `edit`."""
  shutil.copytree(src, dst)
  tensors = load_file(dst / "model.safetensors")
  save_file(edit(tensors), dst / "model.safetensors")
  return dst


def test_sharded_index_loads_the_same_params(tiny_bert_dir, tmp_path):
  import transformers

  sharded = tmp_path / "sharded"
  transformers.BertModel.from_pretrained(tiny_bert_dir).save_pretrained(sharded, max_shard_size="300KB")
  index = json.loads((sharded / hf.INDEX).read_text())
  assert len(set(index["weight_map"].values())) > 1 and not (sharded / hf.SAFETENSORS).exists()
  _, want = load(tiny_bert_dir)
  _, got = load(sharded)
  for path, value in params_lib.flatten(want).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(params_lib.flatten(got)[path]), err_msg=path)


def test_loaded_params_equal_the_checkpoint(tiny_bert_dir):
  _, params = load(tiny_bert_dir)
  raw = load_file(tiny_bert_dir / "model.safetensors")
  stacked = params["bert"]["layers"]  # N x ...: layer i of every block param at index i
  assert stacked["query"]["kernel"].shape == (2, 32, 4, 8)
  np.testing.assert_array_equal(np.asarray(stacked["query"]["kernel"][1]),
                                raw["encoder.layer.1.attention.self.query.weight"].T.reshape(32, 4, 8))
  np.testing.assert_array_equal(np.asarray(stacked["attn_out"]["kernel"][0]),
                                raw["encoder.layer.0.attention.output.dense.weight"].T.reshape(4, 8, 32))


def test_missing_key_is_an_error(tiny_bert_dir, tmp_path):
  d = edited_copy(tiny_bert_dir, tmp_path / "m", lambda t: {k: v for k, v in t.items() if "pooler.dense.bias" not in k})
  with pytest.raises(UserError, match=r"lacks 1 parameter.*pooler\.dense\.bias.*model\.new_params"):
    load(d)
  load(d, new_params=(r"classifier\..*", r"bert\.pooler\..*"))  # declared new: initialised instead


def test_unexpected_key_is_an_error(tiny_bert_dir, tmp_path):
  extra = lambda t: {**t, "cls.predictions.bias": np.zeros(4, np.float32)}
  d = edited_copy(tiny_bert_dir, tmp_path / "u", extra)
  with pytest.raises(UserError, match=r"1 unexpected key.*cls\.predictions\.bias.*model\.unused_keys"):
    load(d)
  load(d, unused_keys=(r"cls\..*",))


def test_shape_mismatch_is_an_error(tiny_bert_dir, tmp_path):
  key = "encoder.layer.0.intermediate.dense.weight"
  d = edited_copy(tiny_bert_dir, tmp_path / "s", lambda t: {**t, key: t[key][:, :-1].copy()})
  with pytest.raises(UserError, match=rf"{key} has shape \(37, 31\).*needs \(32, 37\)"):
    load(d)


def test_unsupported_model_type_and_missing_dir(tiny_bert_dir, tmp_path):
  d = tmp_path / "gpt"
  shutil.copytree(tiny_bert_dir, d)
  (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "wav2vec2"}))
  with pytest.raises(UserError, match="model_type 'wav2vec2'.*not supported"):
    load(d)
  (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "t5"}))
  with pytest.raises(UserError, match="config.json lacks .*d_model.* that a t5 model needs"):
    load(d)  # a BERT config relabelled t5
  with pytest.raises(UserError, match="does-not-exist does not exist"):
    load(tmp_path / "does-not-exist")
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="has no config.json"):
    load(tmp_path / "empty")
  with pytest.raises(UserError, match="downloading it from the hub failed"):
    load("no-such-org/no-such-model")


def test_layout_round_trip():
  rng = np.random.default_rng(0)
  for kind, ours in [("copy", (5, 3)), ("flat", (4, 2)), ("linear", (3, 4, 2)), ("linear_hk", (4, 2, 3))]:
    theirs = rng.normal(size=hf.hf_shape(kind, ours))
    np.testing.assert_array_equal(hf.to_hf(hf.to_ours(theirs, kind, ours), kind), theirs)


def test_fused_tensor_pieces_map_to_their_rows_and_export_joins_them():
  fused = np.random.default_rng(0).normal(size=(10, 3))  # torch (out, in): rows 0:4 one param's, 4:10 another's
  param_map = {"a": ("w", "linear[0:4]"), "b": ("w", "linear[4:10]")}
  ours = {"a": hf.to_ours(fused, "linear[0:4]", (3, 4)), "b": hf.to_ours(fused, "linear[4:10]", (3, 2, 3))}
  np.testing.assert_array_equal(ours["a"], fused[:4].T)
  np.testing.assert_array_equal(ours["b"], fused[4:].T.reshape(3, 2, 3))
  np.testing.assert_array_equal(hf.to_hf_tensors(param_map, ours)["w"], fused)
  with pytest.raises(RuntimeError, match="not covering all 10"):
    hf.to_hf_tensors(param_map, ours, ["b"])


def test_fused_tensor_of_the_wrong_size_is_one_error_naming_it(tmp_path):
  """Phi-3's qkv_proj holds q's 32, k's 16 and v's 16 rows; one row short is refused before a byte is read."""
  import torch
  import transformers

  torch.manual_seed(0)
  cfg = transformers.Phi3Config(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)
  transformers.Phi3ForCausalLM(cfg).save_pretrained(tmp_path / "src")
  load(tmp_path / "src")
  key = "model.layers.1.self_attn.qkv_proj.weight"
  d = edited_copy(tmp_path / "src", tmp_path / "short", lambda t: {**t, key: t[key][:-1].copy()})
  with pytest.raises(UserError, match=rf"checkpoint key {re.escape(key)} has shape \(63, 32\), but layers\.attn\."
                                      r"k\.kernel needs \(32, 2, 8\) from its rows 32:48 of \(64, 32\)"):
    load(d)

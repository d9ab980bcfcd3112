"""Encoder-decoder generation and export on tiny random checkpoints, padding in the source batch: cached greedy
decoding against uncached decoding and transformers' generate, beam search against transformers', export round
trips into the PyTorch classes."""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import export_run
from safetensors import safe_open
from test_export import perturbed, save_run
from test_seq2seq_parity import CASES, MESH, batch

from jaxtune.config import ModelConfig
from jaxtune.generation import search
from jaxtune.generation import seq2seq as seq2seq_generation
from jaxtune.weights import pretrained

N = 12  # max new tokens


@pytest.fixture(scope="module", params=["bart", "marian", "t5_v1.0", "t5_v1.1"])
def tiny(request, tmp_path_factory):
  """(name, PyTorch model, our model, params, rules, sources) of one family."""
  hf_config, cls = CASES[request.param]
  torch.manual_seed(0)
  source = cls(hf_config).eval()
  with torch.no_grad():  # larger weights than the init's: a tiny random model then repeats itself less
    for p in source.parameters():
      if p.requires_grad:  # not Marian's sinusoidal table, which is a fixed function
        p.add_(torch.randn_like(p) * 2.0)
    if hasattr(source, "final_logits_bias"):  # zero as initialised; random so that a dropped bias shows
      source.final_logits_bias.normal_()
  path = tmp_path_factory.mktemp(request.param)
  source.save_pretrained(path)
  model, params = pretrained.from_pretrained(ModelConfig(path=str(path), new_params=()), 0, MESH, 0)
  hf = json.loads((path / "config.json").read_text())
  generation = path / "generation_config.json"
  hf.update(json.loads(generation.read_text()) if generation.exists() else {})
  rules = seq2seq_generation.Rules.from_hf(hf)
  rng = np.random.default_rng(1)
  special = {rules.pad_id, *rules.eos_ids, rules.decoder_start}
  ok = [t for t in range(hf_config.vocab_size) if t not in special]
  sources = [rng.choice(ok, size) for size in (9, 5, 14)]
  # EOS: a token some rows emit and others do not, so that rows stop at different steps.
  free = uncached_greedy(model, params, sources, dataclasses.replace(rules, eos_ids=(-1,)))
  seen = [set(row[:-1].tolist()) for row in free]  # the last may be a forced EOS
  some = sorted(set.union(*seen) - set.intersection(*seen))
  rules = dataclasses.replace(rules, eos_ids=(some[len(some) // 2],)) if some else rules
  return request.param, source, model, params, rules, sources


@functools.partial(jax.jit, static_argnames="model")
def _logits(model, params, batch):
  return model.apply(params, batch)["logits"]


def uncached_greedy(model, params, sources, rules):
  """Argmax of the full decoder over everything generated so far, step by step: no cache. The decoder input is
  padded to N + 1 positions (causal attention: what follows a position does not change its logits)."""
  batch = {k: jnp.asarray(v) for k, v in seq2seq_generation.right_pad(sources, rules.pad_id).items()}
  decoded = np.full((len(sources), N + 1), rules.pad_id, np.int32)
  decoded[:, 0] = rules.decoder_start
  done = np.zeros(len(sources), bool)
  for step in range(N):
    logits = _logits(model, params, {**batch, "decoder_input_ids": jnp.asarray(decoded)})[:, step]
    token = np.asarray(jnp.argmax(seq2seq_generation._process(logits, jnp.int32(step), rules, search.Search(N)),
                                  -1))
    decoded[:, step + 1] = np.where(done, rules.pad_id, token)
    done |= np.isin(token, rules.eos_ids)
    if done.all():
      break
  return [row[1:][:_length(row[1:], rules.eos_ids)] for row in decoded]


def _length(row, eos_ids):
  hits = np.flatnonzero(np.isin(row, eos_ids))
  return int(hits[0]) + 1 if len(hits) else len(row)


def hf_generate(source, sources, rules, **kwargs):
  """transformers' generate on the same right-padded batch: the new tokens of each row, padding dropped."""
  batch = seq2seq_generation.right_pad(sources, rules.pad_id)
  with torch.no_grad():
    out = source.generate(torch.from_numpy(batch["input_ids"]).long(),
                          attention_mask=torch.from_numpy(batch["attention_mask"]).long(), max_new_tokens=N,
                          eos_token_id=list(rules.eos_ids), pad_token_id=rules.pad_id,
                          decoder_start_token_id=rules.decoder_start, use_cache=False, **kwargs).numpy()
  assert (out[:, 0] == rules.decoder_start).all()
  return [row[1:][:_length(row[1:], rules.eos_ids)] for row in out]


def test_cached_greedy_equals_uncached_decoding_and_transformers(tiny):
  name, source, model, params, rules, sources = tiny
  s = search.Search(N)
  ours = seq2seq_generation.generate(model, params, sources, rules, s)
  if name == "t5_v1.1":  # its random weights say more than one token: EOS stops rows at different steps
    assert any(len(o) < N for o in ours) and any(len(o) != len(ours[0]) for o in ours), ours
  uncached = uncached_greedy(model, params, sources, rules)
  theirs = hf_generate(source, sources, rules, do_sample=False, num_beams=1)
  for mine, plain, hf in zip(ours, uncached, theirs, strict=True):
    np.testing.assert_array_equal(mine, plain)
    np.testing.assert_array_equal(mine, hf)


@pytest.mark.parametrize("early_stopping", [False, True, pytest.param("never", marks=pytest.mark.slow)])
def test_beam_search_equals_transformers(tiny, early_stopping):
  name, source, model, params, rules, sources = tiny
  if name != "t5_v1.1":
    pytest.skip("beam search is family-agnostic: one family checks it")
  s = search.Search(N, num_beams=3, length_penalty=0.6, early_stopping=early_stopping)
  ours = seq2seq_generation.generate(model, params, sources, rules, s)
  theirs = hf_generate(source, sources, rules, do_sample=False, num_beams=3, length_penalty=0.6,
                       early_stopping=early_stopping)
  assert any(o[-1] in rules.eos_ids for o in ours)  # some hypothesis finished with EOS
  for mine, hf in zip(ours, theirs, strict=True):
    np.testing.assert_array_equal(mine, hf)


def test_sampling_draws_differ_by_key_and_a_tiny_nucleus_is_greedy(tiny):
  name, _, model, params, rules, sources = tiny
  if name != "t5_v1.0":
    pytest.skip("sampling is family-agnostic: one family checks it")
  hot = search.Search(N, temperature=2.0)
  draws = {tuple(np.concatenate(seq2seq_generation.generate(model, params, sources, rules, hot, jax.random.key(i))))
           for i in range(4)}
  assert len(draws) > 1
  greedy = seq2seq_generation.generate(model, params, sources, rules, search.Search(N))
  narrow = seq2seq_generation.generate(model, params, sources, rules, search.Search(N, 2.0, 1e-6),
                                    jax.random.key(7))
  for g, n in zip(greedy, narrow, strict=True):
    np.testing.assert_array_equal(g, n)


def test_export_loads_in_transformers_with_our_logits(tiny, tmp_path):
  """Perturbed weights saved as a run and exported: the PyTorch class loads them with no missing or unexpected keys
  and gives our encoder outputs and logits (within 1e-4) with padding in source and target."""
  name, source, _, _, rules, _ = tiny
  torch.manual_seed(0)
  source = type(source)(source.config).eval()  # at the init's scale (the fixture's weights are 2.0 larger)
  source.save_pretrained(tmp_path / "source")
  model, params = pretrained.from_pretrained(ModelConfig(path=str(tmp_path / "source"), new_params=()), 0, MESH, 0)
  params = perturbed(params, 1)
  save_run(tmp_path / "run", model, params, step=3)
  out = export_run(tmp_path / "run", "latest", tmp_path / "hf")
  cls = type(source)
  assert json.loads((out / "config.json").read_text())["architectures"] == [cls.__name__]
  hf, info = cls.from_pretrained(out, output_loading_info=True)
  assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
  with safe_open(out / "model.safetensors", "np") as f:
    unwritten = set(hf.state_dict()) - set(f.keys())
  assert all(re.fullmatch(r"(model\.)?(encoder\.|decoder\.)?(embed_tokens|embed_positions)\.weight|lm_head\.weight", k)
             for k in unwritten), unwritten  # tied to the shared embedding, or Marian's fixed sinusoids
  inputs = batch(source.config, rules.pad_id)
  ours = model.apply(params, {k: jnp.asarray(v) for k, v in inputs.items()})
  with torch.no_grad():
    theirs = hf.eval()(**{k: torch.from_numpy(v).long() for k, v in inputs.items()})
    before = source(**{k: torch.from_numpy(v).long() for k, v in inputs.items()}).logits.numpy()
  src, tgt = inputs["attention_mask"].astype(bool), inputs["decoder_attention_mask"].astype(bool)
  assert np.abs(np.asarray(ours["hidden"]) - theirs.encoder_last_hidden_state.numpy())[src].max() <= 1e-4
  assert np.abs(np.asarray(ours["logits"]) - theirs.logits.numpy())[tgt].max() <= 1e-4
  assert np.abs(before - theirs.logits.numpy())[tgt].max() > 1e-3  # the perturbation shows: the export wrote it

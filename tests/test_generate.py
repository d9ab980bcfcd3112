"""KV-cached generation equals uncached argmax decoding; sampling respects temperature and top-p."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxtune import sharding
from jaxtune.config import MeshConfig, ModelConfig
from jaxtune.generation import decoder, search
from jaxtune.weights import pretrained

CASES = {
    "llama": (transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2), transformers.LlamaForCausalLM),
    "gpt2": (transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0), transformers.GPT2LMHeadModel),
}


@pytest.fixture(scope="module", params=list(CASES))
def tiny(request, tmp_path_factory):
  hf_config, cls = CASES[request.param]
  torch.manual_seed(0)
  path = tmp_path_factory.mktemp(request.param)
  cls(hf_config).save_pretrained(path)
  return pretrained.from_pretrained(ModelConfig(path=str(path), new_params=()), 0,
                                    sharding.make_mesh(MeshConfig()), 0)


def uncached_greedy(model, params, prompt, n, eos, width=32):
  """Reference: rerun the whole sequence for every new token and take the argmax.

  The sequence is padded to one width, which causal attention hides from its last real position, so one
  compiled forward serves every length (eager op-by-op forwards took most of this file's time).
  """
  forward = jax.jit(lambda p, ids: model.apply(p, {"input_ids": ids, "segment_ids": jnp.ones_like(ids),
                                                   "positions": jnp.arange(width)[None]})["logits"])
  seq, out = list(prompt), []
  for _ in range(n):
    ids = np.zeros((1, width), np.int32)
    ids[0, :len(seq)] = seq
    token = int(jnp.argmax(forward(params, jnp.asarray(ids))[0, len(seq) - 1]))
    out.append(token)
    seq.append(token)
    if token in eos:
      break
  return out


def test_cached_generation_equals_uncached_argmax(tiny):
  model, params = tiny
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 99, n) for n in (5, 11, 2)]
  free = decoder.generate(model, params, prompts, eos_ids=[-1], s=search.Search(max_new_tokens=12))
  assert all(len(g) == 12 for g in free)
  for prompt, got in zip(prompts, free):
    assert got.tolist() == uncached_greedy(model, params, prompt, 12, [-1])
  eos = int(free[0][4])  # a token the first row emits: generation must stop right after it
  stopped = decoder.generate(model, params, prompts, eos_ids=[eos], s=search.Search(max_new_tokens=12))
  for prompt, got in zip(prompts, stopped):
    assert got.tolist() == uncached_greedy(model, params, prompt, 12, [eos])
  assert len(stopped[0]) <= 5 and stopped[0][-1] == eos


def test_sampling_is_seeded_and_top_p_narrows_to_argmax(tiny):
  model, params = tiny
  prompts = [np.array([3, 4, 5]), np.array([7])]
  hot = search.Search(max_new_tokens=8, temperature=1.5)
  draw = lambda s, seed: [g.tolist() for g in decoder.generate(model, params, prompts, [-1], s, jax.random.key(seed))]
  assert draw(hot, 1) == draw(hot, 1) and draw(hot, 1) != draw(hot, 2)
  greedy = draw(search.Search(max_new_tokens=8), 0)
  assert draw(search.Search(max_new_tokens=8, temperature=1.5, top_p=1e-6), 5) == greedy


def test_top_p_only_draws_from_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  s = search.Search(temperature=1.0, top_p=0.7)
  draws = {int(search.sample(logits, jax.random.key(i), s)[0]) for i in range(200)}
  assert draws == {0, 1}


def test_generation_places_activations_as_training_does(tiny):
  """Generation calls the model through Model.apply, as training does, so the rules' activation sharding
  constraints are in its program: once for the prompt's forward pass and once in the loop's step."""
  model, params = tiny
  batch = {k: jnp.asarray(v) for k, v in decoder.left_pad([np.arange(1, 6)]).items()}
  forward = str(jax.make_jaxpr(lambda p, b: model.apply(p, b))(params, batch)).count("sharding_constraint")
  traced = decoder._generate.trace(model, params, batch, (0,), jax.random.key(0), search.Search(4),
                                    jnp.dtype(jnp.float32))
  assert forward > 0 and str(traced.jaxpr).count("sharding_constraint") == 2 * forward

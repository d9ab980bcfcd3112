"""Per-token attributions for a classification prediction: integrated gradients on the input token embeddings.

IG_i = (x_i - x'_i) . integral over a in [0, 1] of dF/dx_i at x' + a (x - x'), with F the logit of the
explained class, x the token embeddings of the text and x' a baseline. The integral is Gauss-Legendre
quadrature with `steps` nodes (Captum's default rule), all nodes in one batched gradient. By completeness
the attributions sum to F(x) - F(x'); `delta` reports how far the quadrature is from that.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.errors import UserError
from jaxtune.models import encoder
from jaxtune.models.model import Model

BASELINES = ("pad", "zeros")


@dataclass
class Explanation:
  tokens: list[str]
  attributions: np.ndarray  # per token, summed over the embedding dim
  target: int  # the explained class
  probs: np.ndarray  # the model's class probabilities for the text
  logit: float  # F(x)
  baseline_logit: float  # F(x')

  @property
  def delta(self) -> float:
    """Completeness error relative to the logit difference: |sum(IG) - (F(x) - F(x'))| / |F(x) - F(x')|."""
    diff = self.logit - self.baseline_logit
    return abs(float(self.attributions.sum()) - diff) / max(abs(diff), 1e-12)


def baseline_embeddings(word_VxD: jax.Array, ids: np.ndarray, special: np.ndarray, pad_id: int | None,
                        kind: str) -> jax.Array:
  """x': special tokens ([CLS], [SEP]) keep their embeddings, every other token becomes [PAD]'s or zeros."""
  if kind not in BASELINES:
    raise UserError(f"--baseline {kind!r} is not one of {list(BASELINES)}.")
  if kind == "pad" and pad_id is None:
    raise UserError("the tokenizer has no pad token for --baseline pad; use --baseline zeros.")
  x = word_VxD[ids]
  fill = word_VxD[pad_id] if kind == "pad" else jnp.zeros_like(x[..., 0, :])
  return jnp.where(jnp.asarray(special)[..., None], x, fill)


def integrated_gradients(model: Model, params: Any, batch: dict[str, np.ndarray], target: int | None,
                         steps: int = 50, baseline: str = "pad", pad_id: int | None = None,
                         special: np.ndarray | None = None) -> tuple[np.ndarray, int, np.ndarray, float, float]:
  """(per-token attributions L, target, probs, F(x), F(x')) for one row (batch of 1) of a classifier."""
  if getattr(model.cfg, "head", None) != "classification":
    raise UserError(f"explanations are built for the encoder classifiers; a {model.family!r} "
                    f"{getattr(model.cfg, 'head', 'language model')} is not one.")
  if steps < 1:
    raise UserError(f"--steps {steps} must be >= 1.")
  word_VxD = params[encoder.BASE_PREFIX[model.family]]["embeddings"]["word"]
  ids = np.asarray(batch["input_ids"])
  special = np.zeros_like(ids, bool) if special is None else special
  x = word_VxD[ids]
  x0 = baseline_embeddings(word_VxD, ids, special, pad_id, baseline)
  nodes, weights = np.polynomial.legendre.leggauss(steps)
  alphas, weights = jnp.asarray((nodes + 1) / 2, jnp.float32), jnp.asarray(weights / 2, jnp.float32)
  fixed = {k: jnp.asarray(v) for k, v in batch.items()}

  def logits(word_1xLxD: jax.Array) -> jax.Array:
    return model.apply(params, {**fixed, "word_embeddings": word_1xLxD})["logits"][0]

  out = jax.jit(logits)(x)
  probs = np.asarray(jax.nn.softmax(out))
  target = int(np.argmax(probs)) if target is None else target

  @jax.jit
  def attributions(x: jax.Array, x0: jax.Array) -> tuple[jax.Array, jax.Array]:
    grad = jax.vmap(jax.grad(lambda w: logits(w)[target]))(x0[None] + alphas[:, None, None, None] * (x - x0)[None])
    avg_1xLxD = jnp.tensordot(weights, grad, axes=1)
    return ((x - x0) * avg_1xLxD).sum(-1)[0], logits(x0)[target]

  attr, base = attributions(x, x0)
  return np.asarray(attr), target, probs, float(out[target]), float(base)


def explain_texts(model: Model, params: Any, tokenizer: Any, texts: Sequence[str], max_len: int,
                  labels: Sequence[Any], target: str | None = None, steps: int = 50,
                  baseline: str = "pad") -> list[Explanation]:
  """An Explanation per text (pairs are not supported), the class `target` (a label) or the predicted one."""
  names = [str(label) for label in labels]
  if target is not None and target not in names:
    raise UserError(f"--target {target!r} is not one of the run's labels {names}.")
  out = []
  for text in texts:
    enc = tokenizer(text, truncation=True, max_length=max_len, return_token_type_ids=True,
                    return_special_tokens_mask=True, return_tensors="np")
    batch = {"input_ids": enc["input_ids"].astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32),
             "token_type_ids": enc["token_type_ids"].astype(np.int32)}
    attr, cls, probs, logit, base = integrated_gradients(
        model, params, batch, None if target is None else names.index(target), steps, baseline,
        tokenizer.pad_token_id, enc["special_tokens_mask"].astype(bool))
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    out.append(Explanation(tokens, attr, cls, probs, logit, base))
  return out


def to_html(explanations: Sequence[Explanation], labels: Sequence[Any], texts: Sequence[str]) -> str:
  """A page with each text's tokens shaded by attribution: green for the explained class, red against it."""
  parts = ["<!doctype html><meta charset='utf-8'><title>jaxtune attributions</title>",
           "<style>body{font-family:sans-serif;max-width:60em}span{padding:0 2px;border-radius:3px}</style>"]
  for exp, text in zip(explanations, texts):
    scale = float(np.abs(exp.attributions).max()) or 1.0
    spans = []
    for token, a in zip(exp.tokens, exp.attributions):
      strength = min(abs(float(a)) / scale, 1.0)
      colour = f"rgba(0,160,0,{strength:.3f})" if a >= 0 else f"rgba(220,0,0,{strength:.3f})"
      spans.append(f"<span style='background:{colour}' title='{float(a):+.4f}'>{html.escape(token)}</span>")
    probs = ", ".join(f"{html.escape(str(label))} {p:.3f}" for label, p in zip(labels, exp.probs))
    parts.append(f"<h3>{html.escape(str(labels[exp.target]))}</h3><p>{html.escape(text[:200])}</p>"
                 f"<p>probabilities: {probs}; attributions sum {exp.attributions.sum():+.4f} for a logit difference "
                 f"{exp.logit - exp.baseline_logit:+.4f} (relative gap {exp.delta:.2e})</p><p>{' '.join(spans)}</p>")
  return "\n".join(parts) + "\n"

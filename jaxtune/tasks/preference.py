"""Preference tuning (DPO) of a causal LM on pairs of responses to one prompt, as TRL's DPOTrainer computes it.

Each row's score is its summed response log-probability log pi(y | x) (prompt masked); against the reference
policy's, the log-ratios r = log pi(y | x) - log pi_ref(y | x) of the chosen (c) and rejected (r) responses give,
with d = r_c - r_r:
  sigmoid: -log sigmoid(beta d), or with label smoothing e (cDPO) -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d)
  ipo:     (d' - 1 / (2 beta))^2, d' the same difference of per-token means (TRL's normalisation)
  robust:  (-(1 - e) log sigmoid(beta d) + e log sigmoid(-beta d)) / (1 - 2e)   (rDPO)
averaged over the pairs. Metrics as TRL logs them: rewards/chosen and rewards/rejected (beta r), rewards/margins,
rewards/accuracies (chosen reward above rejected), logps/chosen and logps/rejected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.config import Config, PreferenceConfig
from jaxtune.data import origin, preference, splits
from jaxtune.errors import UserError
from jaxtune.models import vocab
from jaxtune.tasks.base import Batch, Task
from jaxtune.tasks.text import CausalLM, with_prompts

PROMPT = "prompt"


@dataclasses.dataclass(frozen=True)
class Preference(Task):
  """DPO: the pair loss of `cfg` (preference section) on chosen / rejected rows; TRL's reward metrics."""
  cfg: PreferenceConfig = PreferenceConfig()
  name = "preference"
  head = "causal_lm"
  tiles_vocab = True

  def configured(self, cfg: Config) -> Preference:
    return dataclasses.replace(self, cfg=cfg.preference)

  def best(self, cfg: Config) -> tuple[str, Literal["max", "min"]]:
    return "loss", "min"

  def load(self, cfg: Config, tokenizer: Any, names: Sequence[str], labels: Sequence[Any] | None = None,
           extra: dict[str, str] | None = None, limit: int | None = None,
           per_host: bool = False) -> tuple[None, dict[str, preference.Pairs]]:
    del labels, per_host  # every process encodes the pairs whole (they are the size of an SFT set)
    d = cfg.data
    out = {}
    for n, (name, ds) in splits.load_rows(d, cfg.train.seed, names, extra, limit).items():
      ds = with_prompts(ds, cfg, name)
      for column in (d.chosen_column, d.rejected_column):
        if column not in ds.column_names:
          raise UserError(f"data split {name} has no column {column!r} (it has {ds.column_names}); preference data "
                          "needs a prompt, a chosen and a rejected response: set data.chosen_column / "
                          "data.rejected_column to existing columns.")
      if len(ds) == 0:
        raise UserError(f"data split {name} has no rows; point it at a non-empty file.")
      triples = [preference.encode_pair(p, c, r, tokenizer, d.use_chat_template, origin.At(name, row))
                 for row, (p, c, r) in enumerate(zip(ds[PROMPT], ds[d.chosen_column], ds[d.rejected_column]))]
      out[n] = preference.assemble(triples, d.max_len, name)
    return None, out

  def collate(self, data: preference.Pairs, rows: np.ndarray, batch_size: int, cfg: Config,
              part: slice = slice(None)) -> Batch:
    return preference.collate(data, rows, batch_size, cfg.data.length_buckets, part)

  def row_logps(self, logits: jax.Array | vocab.TiledHead, batch: dict[str, jax.Array]) -> jax.Array:
    """float32 2B: each row's summed log-probability of its response tokens."""
    return -(CausalLM().token_losses(logits, batch) * batch["loss_mask"]).sum(-1)

  def pair_terms(self, logits: jax.Array | vocab.TiledHead, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per pair (B): the loss, the policy's and the reference's log-probs, rewards and whether the pair is real."""
    c = self.cfg
    logps = self.row_logps(logits, batch)
    chosen, rejected = logps[0::2], logps[1::2]
    chosen_ratio, rejected_ratio = chosen - batch["ref_logps"][0::2], rejected - batch["ref_logps"][1::2]
    delta = chosen_ratio - rejected_ratio
    e = c.label_smoothing
    if c.loss == "sigmoid":
      loss = -(1 - e) * jax.nn.log_sigmoid(c.beta * delta) - e * jax.nn.log_sigmoid(-c.beta * delta)
    elif c.loss == "robust":
      loss = (-(1 - e) * jax.nn.log_sigmoid(c.beta * delta) + e * jax.nn.log_sigmoid(-c.beta * delta)) / (1 - 2 * e)
    else:  # ipo: the log-ratios averaged over each response's tokens
      tokens = batch["loss_mask"].sum(-1)
      chosen_tokens, rejected_tokens = jnp.maximum(tokens[0::2], 1.0), jnp.maximum(tokens[1::2], 1.0)
      loss = (chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens - 1 / (2 * c.beta)) ** 2
    real = (batch["loss_mask"][0::2].sum(-1) > 0).astype(jnp.float32)
    return {"loss": loss, "logps_chosen": chosen, "logps_rejected": rejected, "reward_chosen": c.beta * chosen_ratio,
            "reward_rejected": c.beta * rejected_ratio, "real": real}

  def loss_terms(self, logits: jax.Array | vocab.TiledHead,
                 batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(the pair losses summed, the pair count, TRL's metrics summed over the pairs: logged as their means)."""
    t = self.pair_terms(logits, batch)
    real = t["real"]
    sums = {k: (v * real).sum() for k, v in _metrics(t).items()}
    return (t["loss"] * real).sum(), real.sum(), jax.tree.map(jax.lax.stop_gradient, sums)

  def eval_outputs(self, logits: jax.Array | vocab.TiledHead, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return self.pair_terms(logits, batch)

  def metrics(self, out: dict[str, np.ndarray], data: preference.Pairs, labels: Any, cfg: Config) -> dict[str, Any]:
    real = out["real"] > 0
    means = {k: float(np.mean(v[real])) for k, v in _metrics({k: v[real] for k, v in out.items()}).items()}
    # the policy alone ranks the chosen response above the rejected one (the rewards' accuracy is against the
    # reference, so 0 for the starting model): a before / after measure of the same pairs
    ranked = float(np.mean(out["logps_chosen"][real] > out["logps_rejected"][real]))
    return {"loss": float(np.mean(out["loss"][real])), **means, "preference_accuracy": ranked,
            "num_examples": int(real.sum())}


def _metrics(t: dict[str, Any]) -> dict[str, Any]:
  """TRL's per-pair metrics from pair_terms' outputs (means over the pairs are what gets logged)."""
  chosen, rejected = t["reward_chosen"], t["reward_rejected"]
  return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
          "rewards/accuracies": (chosen > rejected) * 1.0, "logps/chosen": t["logps_chosen"],
          "logps/rejected": t["logps_rejected"]}

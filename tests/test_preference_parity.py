"""DPO against TRL's DPOTrainer (trl, pinned in the test extra) on a tiny random Llama with SmolLM2's tokenizer.

One full-batch step of 8 review pairs (the true label chosen, the wrong one rejected), the reference policy a second
random Llama, so the margins are not 0 as they are at the first step of a run (where every beta and loss agree):
loss, gradient norm and every gradient, and the params after one AdamW step equal TRL's float64 run to the
tolerances of tests/test_step_parity.py. Each of beta, the prompt mask and the reference log-probs, broken on purpose,
makes the comparison fail. (With the prompt scored too, the sigmoid loss and its gradient are unchanged: both
rows of a pair share the prompt, so its log-prob cancels in the margin; the logged log-probs and rewards catch it,
as would IPO's per-token means.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxtune import sharding
from jaxtune.config import MeshConfig, ModelConfig, OptimConfig, PreferenceConfig
from jaxtune.data import batching, preference
from jaxtune.tasks import TASKS
from jaxtune.train import optim, reference, steps
from jaxtune.weights import export, pretrained

trl = pytest.importorskip("trl")

LR, PAIRS, MAX_LEN = 1e-2, 8, 64
REL = 1e-5  # loss and gradient norm, relative
PARAMS = 0.01  # max |jax - torch| over params <= PARAMS x max |torch - initial|
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")
CASES = {"sigmoid": PreferenceConfig(beta=0.1), "ipo": PreferenceConfig(beta=0.5, loss="ipo"),
         "robust": PreferenceConfig(beta=0.1, loss="robust", label_smoothing=0.1)}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_llama_dir):
  """(the policy's checkpoint, the reference's: the same architecture, other random weights)."""
  ref_dir = tmp_path_factory.mktemp("dpo_reference")
  torch.manual_seed(1)
  transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(tiny_llama_dir)).save_pretrained(ref_dir)
  return tiny_llama_dir, ref_dir


@pytest.fixture(scope="module")
def rows(reviews):
  import pandas as pd

  df = pd.read_csv(reviews["train"]).head(PAIRS)
  return [{"prompt": f"Review: {r.review[:100]}\nGreat or other?\n", "chosen": r.score,
           "rejected": "other" if r.score == "great" else "great"} for r in df.itertuples()]


class ExactLogProbs:
  """TRL's fused LM head with its float32 tiled log-softmax replaced by the exact one in the model's dtype (float64
  here): TRL's own kernel rounds each token's log-prob to float32, which alone moves the loss by ~1e-5."""

  @staticmethod
  def apply(hidden, weight, bias, labels, temperature, chunk, softcap, logit_scale, outputs):
    assert temperature == 1.0 and softcap is None and logit_scale == 1.0
    logits = hidden @ weight.T + (0 if bias is None else bias)
    logp = torch.log_softmax(logits, -1)
    picked = logp.gather(-1, labels[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None
    mean = logits.mean(-1) if "mean_logits" in outputs else None
    top1 = (logits.argmax(-1) == labels) if "is_top1" in outputs else None
    return picked, entropy, None, mean, top1


def trl_step(policy_dir, ref_dir, rows, out_dir, pref: PreferenceConfig):
  """TRL's float64 step: (its tokenised pairs, loss, gradients by HF key, params before and after by HF key)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(trl.trainer.utils, "_ChunkedLogProbFunction", ExactLogProbs)
    return _trl_step(policy_dir, ref_dir, rows, out_dir, pref)


def _trl_step(policy_dir, ref_dir, rows, out_dir, pref: PreferenceConfig):
  import datasets

  tokenizer = transformers.AutoTokenizer.from_pretrained(policy_dir)
  model = transformers.AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float64)
  ref = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float64)
  args = trl.DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=PAIRS, beta=pref.beta,
                       loss_type=[pref.loss], label_smoothing=pref.label_smoothing, learning_rate=LR, max_steps=1,
                       lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1e9,
                       report_to="none", use_cpu=True, max_length=MAX_LEN, save_strategy="no", seed=0)
  trainer = trl.DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(rows),
                           processing_class=tokenizer)
  data = trainer.train_dataset
  triples = [(data[i]["prompt_ids"], data[i]["chosen_ids"], data[i]["rejected_ids"]) for i in range(len(data))]
  before = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  model.train()
  loss = trainer.compute_loss(model, trainer.data_collator([data[i] for i in range(len(data))]))
  loss.backward()
  grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
  model.zero_grad()
  trainer.train()
  after = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  logged = next(r for r in trainer.state.log_history if "rewards/chosen" in r)
  return triples, float(loss), grads, before, after, {k: logged[k] for k in METRICS}


def jax_step(policy_dir, ref_dir, triples, pref: PreferenceConfig, break_mask: bool = False, ref_scale: float = 1.0):
  """jaxtune's float32 step on the same token ids: (loss, grad norm, gradients and params after, by HF key)."""
  mesh = sharding.make_mesh(MeshConfig())
  batch_sharding = sharding.batch_sharding(mesh)
  data = preference.assemble(triples, MAX_LEN, "pairs")
  if break_mask:  # the prompt's tokens scored too
    every = np.pad((data.rows.segment_ids[:, 1:] > 0).astype(np.float32), [(0, 0), (0, 1)])
    data = preference.Pairs(dataclasses.replace(data.rows, loss_mask=every))
  task = dataclasses.replace(TASKS["preference"], cfg=pref)
  cfg = _config(policy_dir, pref)
  ref_model, ref_params = pretrained.from_pretrained(ModelConfig(path=str(ref_dir), new_params=()), 0, mesh, 0)
  reference.fill(ref_model, task, ref_params, data, cfg, batch_sharding)
  data.ref_logps[:] *= ref_scale
  model, params = pretrained.from_pretrained(ModelConfig(path=str(policy_dir), new_params=()), 0, mesh, 0)
  batch = batching.to_device(task.collate(data, np.arange(len(data)), PAIRS, cfg), batch_sharding)
  grads = jax.grad(lambda p: steps.loss_fn(model, task, p, batch, jnp.float32, None)[0])(params)
  opt = OptimConfig(lr=LR, schedule="constant", weight_decay=0.0, clip_norm=0.0)
  tx = optim.make(opt, 10)
  shardings = steps.state_shardings(model, tx)
  state = steps.init_state(model, params, tx, 0, shardings)
  step = steps.make_train_step(model, task, tx, optim.schedule(opt, 10), jnp.float32, shardings, batch_sharding)
  state, metrics = step(state, batch)
  host = lambda tree: export.hf_tensors(model, {k: np.asarray(v) for k, v in export.host_params(model, tree).items()})
  return float(metrics["loss"]), float(metrics["grad_norm"]), host(grads), host(state.params), metrics


def _config(policy_dir, pref):
  from jaxtune import config as config_lib

  return config_lib.from_dict(config_lib.Config, {
      "task": "preference", "model": {"path": str(policy_dir), "new_params": []},
      "data": {"train": "unused.jsonl", "prompt_column": "prompt", "max_len": MAX_LEN},
      "train": {"batch_size": PAIRS, "eval_batch_size": PAIRS, "max_steps": 1},
      "preference": dataclasses.asdict(pref)})


def agrees(theirs, ours) -> tuple[bool, str]:
  """Whether jaxtune's step equals TRL's, and the first difference."""
  _, t_loss, t_grads, before, after, t_metrics = theirs
  loss, grad_norm, grads, params, metrics = ours
  t_norm = float(np.sqrt(sum((g ** 2).sum() for g in t_grads.values())))
  if abs(loss - t_loss) > REL * abs(t_loss):
    return False, f"loss {loss} vs {t_loss}"
  if abs(grad_norm - t_norm) > REL * t_norm:
    return False, f"grad norm {grad_norm} vs {t_norm}"
  for key, g in t_grads.items():
    if key in grads and np.abs(grads[key] - g).max() > REL * max(np.abs(g).max(), t_norm * 1e-3):
      return False, f"gradient of {key}"
  for key, value in t_metrics.items():  # TRL's logged means (float64) against the step's own
    if abs(float(metrics[key]) - value) > REL * max(abs(value), 1.0):
      return False, f"{key} {float(metrics[key])} vs {value}"
  moved = max(np.abs(after[k] - before[k]).max() for k in params)
  worst = max(np.abs(params[k] - after[k]).max() for k in params)
  return worst <= PARAMS * moved, f"params {worst:.3g} from TRL's, which moved {moved:.3g}"


@pytest.fixture(scope="module")
def trl_runs(models, rows, tmp_path_factory):
  """case -> TRL's step, each run once when a test first asks for it."""
  class Runs(dict):
    def __missing__(self, case):
      self[case] = trl_step(*models, rows, tmp_path_factory.mktemp(f"trl_{case}"), CASES[case])
      return self[case]

  return Runs()


# IPO and rDPO: the sigmoid's log-ratios under another formula; their parity runs with -m slow
@pytest.mark.parametrize("case", ["sigmoid", pytest.param("ipo", marks=pytest.mark.slow),
                                  pytest.param("robust", marks=pytest.mark.slow)])
def test_one_dpo_step_equals_trl(models, trl_runs, case):
  theirs = trl_runs[case]
  ours = jax_step(*models, theirs[0], CASES[case])
  ok, why = agrees(theirs, ours)
  assert ok, why
  assert abs(ours[0] - np.log(2)) > 1e-3  # the reference differs from the policy: the margins are not all 0
  assert 0 < float(ours[4]["rewards/accuracies"]) < 1


@pytest.mark.parametrize("broken", ["beta", "prompt_mask", "reference"])
def test_each_broken_ingredient_fails_the_comparison(models, trl_runs, broken):
  theirs, pref = trl_runs["sigmoid"], CASES["sigmoid"]
  ours = jax_step(*models, theirs[0], dataclasses.replace(pref, beta=0.2) if broken == "beta" else pref,
                  break_mask=broken == "prompt_mask", ref_scale=1.01 if broken == "reference" else 1.0)
  ok, why = agrees(theirs, ours)
  assert not ok, why

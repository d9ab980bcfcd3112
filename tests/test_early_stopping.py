"""Early stopping (train.early_stopping_patience / _threshold): HF's EarlyStoppingCallback rule on a hand-worked
sequence, and a run whose validation metric cannot improve ending cleanly with its best checkpoint kept."""

from __future__ import annotations

import json

import pytest
from conftest import write_config

from jaxtune import config as config_lib
from jaxtune import tasks
from jaxtune.errors import UserError
from jaxtune.train import loop, runlog
from jaxtune.train.checkpoints import Checkpoints


def _cfg(tmp_path, tiny_bert_dir, reviews, *overrides):
  return config_lib.load(write_config(tmp_path / "c.yaml", tiny_bert_dir, reviews), list(overrides))


def early_best(summary):
  return summary["best_eval"]["accuracy"]


def test_patience_counts_evals_that_do_not_beat_the_best_by_more_than_the_threshold(tmp_path, tiny_bert_dir, reviews):
  cfg = _cfg(tmp_path, tiny_bert_dir, reviews, "train.early_stopping_patience=3",
             "train.early_stopping_threshold=0.01")
  early = loop.EarlyStopping.of(cfg, None)
  assert (early.metric, early.mode) == ("accuracy", "max")  # the task's best metric, as the best checkpoint's
  # 0.50 first: best. 0.505 beats it by less than the threshold: bad 1, but it is the new best (as HF's
  # Trainer keeps state.best_metric). 0.52 beats 0.505 by 0.015: reset. 0.52 again, 0.40, 0.525: bad 1, 2, 3.
  seen = [early.update(step, {"accuracy": a}) for step, a in enumerate([0.50, 0.505, 0.52, 0.52, 0.40, 0.525], 1)]
  assert seen == [False, False, False, False, False, True]
  assert (early.best, early.best_step, early.bad) == (0.525, 6, 3)
  loss = loop.EarlyStopping.of(_cfg(tmp_path, tiny_bert_dir, reviews, "train.early_stopping_patience=1",
                                    "checkpoint.best_metric=loss"), {"best": 0.3, "best_step": 4, "bad": 0})
  assert loss.mode == "min" and not loss.update(6, {"loss": 0.29}) and loss.update(8, {"loss": 0.295})
  with pytest.raises(UserError, match="does not report"):
    loop.EarlyStopping.of(_cfg(tmp_path, tiny_bert_dir, reviews, "train.early_stopping_patience=1",
                               "checkpoint.best_metric=f1"), None).update(2, {"accuracy": 0.5})


@pytest.mark.parametrize("override, problem", [
    ("data.validation_holdout=0", "needs a validation split"),
    ("train.eval_every=0", "needs train.eval_every > 0"),
    ('checkpoint.best_metric=""', "needs a metric to watch"),
])
def test_early_stopping_without_something_to_watch_is_refused(tmp_path, tiny_bert_dir, reviews, override, problem):
  with pytest.raises(UserError, match=problem):
    _cfg(tmp_path, tiny_bert_dir, reviews, "train.early_stopping_patience=2", override)


def test_a_run_that_stops_improving_ends_cleanly_with_its_best_checkpoint(tmp_path, tiny_bert_dir, reviews):
  """lr 1e-12: the predictions, and so the validation accuracy, never change. Patience 2 with an eval every
  step: the best is step 1, steps 2 and 3 do not beat it, and the run ends at step 3 of 12."""
  cfg = _cfg(tmp_path, tiny_bert_dir, reviews, "optim.lr=1e-12", "train.max_steps=12", "train.eval_every=1",
             "train.early_stopping_patience=2", "checkpoint.keep_last=1")
  run = tmp_path / "run"
  loop.fit(cfg, run)
  summary = json.loads((run / "summary.json").read_text())
  assert summary["status"] == "early_stopped" and summary["step"] == 3 and summary["total_steps"] == 12
  assert summary["early_stopping"] == {"patience": 2, "threshold": 0.0, "metric": "accuracy", "mode": "max",
                                       "best": early_best(summary), "best_step": 1, "bad": 2,
                                       "stopped_at": 3}
  assert [r["step"] for r in runlog.read_records(run) if r.get("split") == "validation"] == [1, 2, 3]
  ckpts = Checkpoints(run, tasks.checkpoint_config(cfg), read_only=True)
  best = ckpts.resolve("best")  # every eval tied: orbax keeps one of them as the best, beside the last
  assert ckpts.resolve("latest") == 3 and ckpts.read_meta(best)["metrics"]["accuracy"] == early_best(summary)
  with pytest.raises(UserError, match="stopped early at step 3 .* raise train.early_stopping_patience above 2"):
    loop.fit(cfg, run, resume=True)

"""Every numeric config field, fuzzed: a drawn value either ends finetune.py with exit 2 and one `error:` line, or
the run trains at least one step. Never a traceback, never exit 0 with nothing trained.

Values come from each field's declared range (config/ranges.py): its bounds and one past them, small and huge
numbers, nan and inf, and values of the wrong type (text, lists, booleans, null, floats for ints). A run that
starts is asked to stop after its first step (the SIGTERM path), so a drawn max_steps of 10**12 costs one step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from pathlib import Path

import pytest
from conftest import run_in_process, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxtune import config
from jaxtune.config import ranges as ranges_lib
from jaxtune.errors import UserError
from jaxtune.train import loop
from jaxtune.train.checkpoints import Checkpoints

SECTIONS = [config.LoraConfig, config.ModelConfig, config.DataConfig, config.OptimConfig, config.TrainConfig,
            config.CheckpointConfig, config.MeshConfig, config.GenerateConfig, config.QAConfig]


def numeric_fields() -> dict[str, tuple[type, config.Range | None]]:
  """'train.batch_size' -> (int, its Range) for every int or float field (optional ones too) of every section."""
  found = {}
  for cls in SECTIONS:
    declared = config.declared(cls)
    for f in dataclasses.fields(cls):
      hint = typing.get_type_hints(cls)[f.name]
      kinds = [a for a in (hint, *typing.get_args(hint)) if a in (int, float)]  # optional ones and tuples too
      if kinds:
        found[f"{cls.SECTION}.{f.name}"] = (kinds[0], declared.get(f.name))
  return found


FIELDS = numeric_fields()
TRIED: list[tuple[list[str], int]] = []  # (the keys drawn, exit code) of every example, for the report below


def test_every_numeric_field_declares_its_range():
  assert len(FIELDS) >= 40, sorted(FIELDS)
  assert not [key for key, (_, bounds) in FIELDS.items() if bounds is None]


def test_a_range_says_what_it_holds():
  positive, mesh = config.Range(lo=1), ranges_lib.MeshSize.__metadata__[0]
  assert [positive.holds(v) for v in (0, 1, 10**12)] == [False, True, True]
  assert mesh.holds(-1) and not mesh.holds(0) and not mesh.holds(-2)
  fraction = ranges_lib.Fraction.__metadata__[0]
  assert [fraction.holds(v) for v in (0.0, 0.5, 1.0, math.nan, math.inf)] == [True, True, False, False, False]
  assert fraction.text() == "must be in [0, 1)" and mesh.text().startswith("must be -1 or >= 1")
  with pytest.raises(UserError, match=r"optim.b2 is 1.0; it must be in \[0, 1\)"):
    config.OptimConfig(b2=1.0)


def literal(value) -> str:
  """`value` as the YAML text of an override."""
  if isinstance(value, float) and not math.isfinite(value):
    return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
  return json.dumps(value)


def values(key: str) -> st.SearchStrategy:
  """Values for field `key`: its bounds and their neighbours (in and out of range), small and huge numbers, nan
  and inf, and values of the wrong type."""
  kind, bounds = FIELDS[key]
  edges = [b for b in (bounds.lo, bounds.hi) if b is not None] + list(bounds.also)
  near = ([int(e) + d for e in edges for d in (-1, 0, 1)] if kind is int else
          [e + d for e in edges for d in (-0.5, -1e-9, 0.0, 1e-9, 0.5)])
  numbers = (st.integers(-3, 3) | st.integers(-2**40, 2**40) if kind is int else
             st.floats(-3, 3) | st.floats(allow_nan=True, allow_infinity=True))
  wrong = st.text(max_size=4) | st.lists(st.integers(0, 3), max_size=2) | st.booleans() | st.none() | (
      st.floats(-3, 3).filter(lambda x: not float(x).is_integer()) if kind is int else st.just("x"))
  return st.sampled_from(near or [0]) | numbers | wrong | in_range(key)


def in_range(key: str) -> st.SearchStrategy:
  """Values the field's declared range accepts: small ones near its lower bound, and large ones."""
  kind, bounds = FIELDS[key]
  lo = bounds.lo if bounds.lo is not None else -1e6
  if kind is int:
    lo = int(lo) + (1 if bounds.lo_open else 0)
    hi = int(bounds.hi) - (1 if bounds.hi_open else 0) if bounds.hi is not None else 2**31
    return st.integers(lo, min(hi, lo + 4)) | st.integers(lo, hi) | st.sampled_from(list(bounds.also) or [lo])
  hi = bounds.hi if bounds.hi is not None else 1e6
  return st.floats(lo, hi, exclude_min=bounds.lo_open, exclude_max=bounds.hi_open)


@st.composite
def draws(draw) -> dict[str, object]:
  """A drawn value (in range or not) for one field, and in-range values for up to two more: a run that starts
  tests every value it was given at once."""
  keys = draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3, unique=True))
  return {key: draw(values(key) if i == 0 else in_range(key)) for i, key in enumerate(keys)}


@pytest.mark.parametrize("key", sorted(FIELDS))
def test_each_field_refuses_values_outside_its_range_in_one_line(key, base):
  """Just past each bound, nan / inf for floats, and a wrong type: config.load refuses each, naming the key."""
  kind, bounds = FIELDS[key]
  bad = [b + d for b, d in ((bounds.lo, -1), (bounds.hi, 1)) if b is not None]
  bad = [int(b) for b in bad] if kind is int else bad + [math.nan, math.inf]
  bad = [v for v in bad if v not in bounds.also] + ["x", {"a": 1}]
  for value in bad:
    with pytest.raises(UserError) as refused:
      config.load(base, [f"{key}={literal(value)}"])
    message = str(refused.value)
    assert key.split(".")[-1] in message and "\n" not in message, message


@pytest.fixture(scope="module")
def base(tiny_bert_dir, reviews, tmp_path_factory) -> Path:
  d = tmp_path_factory.mktemp("fuzz")
  return write_config(d / "c.yaml", tiny_bert_dir, reviews, train={"max_steps": 3, "eval_every": 0},
                      checkpoint={"save_every_minutes": 0})


class StopAfterFirstStep(loop.StopRequests):
  """A stop request already made: the loop saves and stops after its first step, as on SIGTERM."""

  def __init__(self) -> None:
    super().__init__()
    self.signal = "SIGTERM"


@settings(max_examples=int(os.environ.get("JAXTUNE_FUZZ_EXAMPLES", 20)), deadline=None, derandomize=True,
          database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(drawn=draws())
def test_drawn_values_are_refused_in_one_line_or_train(drawn, base, tmp_path_factory, monkeypatch, capsys):
  run_dir = tmp_path_factory.mktemp("run") / "run"
  monkeypatch.setattr(loop, "StopRequests", StopAfterFirstStep)
  overrides = [f"{key}={literal(value)}" for key, value in drawn.items()]
  code, err = run_in_process("finetune", "--config", base, "--run-dir", run_dir, "--quiet", *overrides,
                             monkeypatch=monkeypatch, capsys=capsys)
  TRIED.append((list(drawn), code))
  assert "Traceback" not in err, err
  if code == 2:
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return
  assert code in (0, 3, 75), (code, err)  # finished, a non-finite first step, or stopped after it
  assert Checkpoints(run_dir, read_only=True).steps() == [1] or code == 3, err


def test_report_the_draws(request):
  """Prints how many values were tried and how they ended (run after the property test, in this module)."""
  if not TRIED:
    pytest.skip("the property test did not run in this process")
  codes = {c: sum(1 for _, code in TRIED if code == c) for c in sorted({c for _, c in TRIED})}
  fields = {key for keys, _ in TRIED for key in keys}
  print(f"\nfuzzed configs tried: {len(TRIED)}, {len(fields)} of {len(FIELDS)} fields drawn; exit codes {codes}")

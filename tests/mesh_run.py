"""Trains one config under several meshes in this process and records what each run did.

usage: python tests/mesh_run.py CONFIG OUT_DIR RUNS_JSON, where RUNS_JSON maps a run name to its
list of key=value overrides. For each run, OUT_DIR/<name>/ is the run dir, OUT_DIR/<name>.json holds
the mesh, the logged losses and, per param, its shape, logical axes and the PartitionSpecs that its
final array and its Adam moments really have; OUT_DIR/<name>.npz holds the final params.
(test_meshes.py runs this with 8 simulated devices, and with 1 for the reference.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
from conftest import records  # this script runs from tests/, beside conftest.py

from jaxtune import config
from jaxtune import params as params_lib
from jaxtune.train import loop, setup, steps


def spec(x: jax.Array) -> list:
  return [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]


def record(run: setup.Run, state: steps.TrainState) -> dict:
  params = params_lib.flatten(params_lib.merge(state.params, state.frozen))
  moments = {path: leaf for path, leaf in params_lib.flatten({"opt": state.opt_state}).items()
             if ".mu." in path or ".nu." in path}
  return {
      "mesh": run.meta["mesh"],
      "losses": [r["loss"] for r in records(run.dir) if "loss" in r and "split" not in r],
      "params": {path: {"shape": list(x.shape), "axes": list(run.model.axes[path]), "spec": spec(x),
                        "moments": [spec(m) for p, m in moments.items() if p.endswith("." + path)]}
                 for path, x in params.items()},
  }


def main(config_path: str, out_dir: str, runs_json: str) -> None:
  out = Path(out_dir)
  for name, overrides in json.loads(runs_json).items():
    cfg = config.load(config_path, overrides)
    run = setup.prepare(cfg, out / name)
    try:
      state, _, _ = loop.loop(run)
    finally:
      run.ckpts.wait()
      run.ckpts.close()
      run.lock.release()
    (out / f"{name}.json").write_text(json.dumps(record(run, state)))
    params = params_lib.flatten(jax.device_get(params_lib.merge(state.params, state.frozen)))
    np.savez(out / f"{name}.npz", **{p: np.asarray(x) for p, x in params.items()})


if __name__ == "__main__":
  main(*sys.argv[1:])

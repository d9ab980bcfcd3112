"""Benchmarks, each measured side by side in one invocation.

python scripts/benchmark.py suite [--suite cpu] [--rounds 3] [--only NAME,...] [--compile cold|warm] [--dir DIR]
                                  [--output FILE]
  Whole jobs, scripts/finetune.py against scripts/torch_reference.py on the same batches, alternating over --rounds,
  each run a fresh process: in-loop seconds, end-to-end wall (with compile), peak RSS and their ratios, per
  workload of the suite (cpu: MiniLM at fixed 32/64/128/256 tokens, short mixed-length reviews, the default job,
  a SmolLM2 causal-LM job; jaxtune/tools/matrix.py), and the worst ratio.

python scripts/benchmark.py probe optimizer|padding|compile|background|profile|compile-cost [--rounds N] [--length L]
                                  [--dir DIR]
  Where a MiniLM step's time goes (jaxtune/tools/probes.py), the sides alternating over --rounds: the AdamW update
  alone (jaxtune's, with the clipping as one scalar multiply, torch's fused AdamW); PyTorch's step with padded rows;
  the train step compiled for two shapes one after the other or at once; the short mixed-length job with the later
  shapes compiled on a background thread; a jax.profiler trace of the step at --length, op time by kind; the step's
  compile and step seconds at --length as is and with each way to compile it faster (LLVM -O1, XLA:CPU's
  fast-compile preset, scanned layers; SGD to size the optimiser's share), each a fresh process.

python scripts/benchmark.py peer [--shape minilm|bert-base|smollm2-135m|llama-1b] [--batch B] [--length L]
                                 [--dtype float32|bfloat16] [--dropout P] [--scan-layers] [--remat POLICY] [--reps N]
                                 [--settle N] [--output FILE]
  jaxtune's train step against the transformers PyTorch class of the same shape (random weights, same batch,
  length, dtype, dropout, AdamW + clipping, all cores), in two worker processes whose steps alternate:
  step time, tokens/s, the ratio, compile time, peak memory and MFU (FLOPs formula: jaxtune/train/perf.py).

python scripts/benchmark.py options [--options JSON] [--env JSON] [--shape ...] [--batch B] [--length L] [--reps N]
  jaxtune's train step compiled twice in one process, as is (A) and (B) with extra XLA compiler options for that
  compile only (e.g. '{"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}') and/or environment
  variables set while it is traced (e.g. '{"JAXTUNE_CPU_ATTENTION": "0"}': XLA's attention ops instead of
  jaxtune's CPU kernel), steps alternating: both medians and their ratio.

python scripts/benchmark.py scale [--hidden 256] [--layers 8] [--batch 8] [--length 256] [--output FILE]
  The scale-out options on a random Llama, its layers scanned: compile time and op count for 2/8/32 layers,
  XLA temp memory and step time per model.remat policy, and 1 vs 4 microbatches of the same global batch.

python scripts/benchmark.py loadmem [--format safetensors|gguf] [--code DIR ...] [--rounds N] [--dir DIR]
                                    [--output FILE]
  Host memory of loading a random 2 GB float32 Llama (3 safetensors files + index, or with --format gguf one
  float32 GGUF file) onto 8 simulated devices with mesh fsdp=8, each load in a fresh process: peak RSS minus the
  idle process, in bytes and per checkpoint byte.
  --code: the checkout whose loader runs (repeat it to compare, e.g. an older one from git worktree add; default
  this one), alternating over --rounds; --dir: where the temporary checkpoint goes (default the system's temp).

python scripts/benchmark.py datacache [--rounds N] [--corpus-rounds N] [--sizes MB,MB] [--off-max-mb MB] [--dir DIR]
                                      [--only startup|corpus] [--output FILE]
  The tokenised-data cache (data.cache_dir, docs/data_cache.md), each run a fresh process: the default job's data
  phase and time to its first step with the cache cold and warm, alternating over --rounds; and a generated text
  corpus of each size in --sizes (default 50,250,1000 MB) through the causal-LM data pipeline, cold, warm and (up to
  --off-max-mb) without the cache, over --corpus-rounds: times, peak anonymous RSS and peak RSS. --dir keeps the
  corpus and entries (default a new temporary directory, left for a rerun; it needs about 12 GB).

python scripts/benchmark.py ckptcost [--rounds N] [--store local|s3|both] [--steps 30] [--save-every 10] [--batch 2]
                                     [--length 64] [--dir DIR] [--output FILE]
  What a checkpoint save costs the step loop (docs/checkpoints.md): SmolLM2-135M fully fine-tuned (1.6 GB
  checkpoints), each run the real loop in a fresh process, checkpoint.async_save true (queued) and false
  (synchronous) alternating over --rounds, on a local disk (--dir, default a new temporary directory) and on s3://
  (a moto server per run): step time without a save, each save's blocking time and time to commit, the extra time
  of the --save-every steps after a save, and the end-of-run wait.
"""

import argparse
import json
import typing

from jaxtune import cli


def _spec(args: argparse.Namespace):
  from jaxtune.tools import bench

  shape = bench.SHAPES[args.shape]
  return bench.Spec(args.shape, args.batch or shape["batch"], args.length or shape["length"], args.dtype,
                    shape["dropout"] if args.dropout is None else args.dropout, scan_layers=args.scan_layers,
                    remat=args.remat)


def peer(args: argparse.Namespace) -> dict:
  from jaxtune.tools import bench

  result = bench.peer(_spec(args), args.reps, args.settle)
  print(bench.table(result))
  return result


def options(args: argparse.Namespace) -> dict:
  import jax

  from jaxtune.errors import UserError
  from jaxtune.tools import bench

  try:
    if not args.options and not args.env:
      raise UserError("options: give --options and/or --env (B's XLA options / environment); A is the step as is")
    result = bench.options_ab(_spec(args), args.options, args.reps, args.settle, args.env)
  except jax.errors.JaxRuntimeError as e:
    raise UserError(f"XLA refused --options {json.dumps(args.options)}: {str(e).splitlines()[0]} (enum values take "
                    "their full names, e.g. LIBRARY_FUSION_TYPE_DOT; several go comma-separated in one string)")
  print(bench.options_table(result))
  return result


def scale(args: argparse.Namespace) -> dict:
  from jaxtune.tools import scale as scale_lib

  result = scale_lib.measure_all(args.hidden, args.layers, args.batch, args.length)
  print(scale_lib.table(result))
  return {"args": {k: v for k, v in vars(args).items() if k != "run"}, **result["tables"]}


def loadmem(args: argparse.Namespace) -> dict:
  from pathlib import Path

  from jaxtune.tools import loadmem as loadmem_lib

  here = Path(__file__).resolve().parent.parent
  result = loadmem_lib.measure([Path(c).resolve() for c in args.code or [here]], args.rounds,
                               Path(args.dir) if args.dir else None, args.format)
  print(loadmem_lib.table(result))
  return result


def datacache(args: argparse.Namespace) -> dict:
  from pathlib import Path

  from jaxtune.tools import datacache as datacache_lib

  parts = (args.only,) if args.only else ("startup", "corpus")
  result = datacache_lib.measure(args.rounds, args.corpus_rounds, [int(s) for s in args.sizes.split(",")],
                                 args.off_max_mb, Path(args.dir) if args.dir else None, parts)
  print(datacache_lib.table(result))
  return result


def ckptcost(args: argparse.Namespace) -> dict:
  from pathlib import Path

  from jaxtune.tools import ckpt_cost

  stores = ("local", "s3") if args.store == "both" else (args.store,)
  result = ckpt_cost.measure(args.rounds, stores, Path(args.dir) if args.dir else None, args.steps, args.save_every,
                             args.batch, args.length)
  print(ckpt_cost.table(result))
  return result


def suite(args: argparse.Namespace) -> dict:
  from pathlib import Path

  from jaxtune.errors import UserError
  from jaxtune.tools import matrix

  only = args.only.split(",") if args.only else None
  try:
    result = matrix.measure(args.suite, args.rounds, only, Path(args.dir) if args.dir else None, args.compile)
  except ValueError as e:
    raise UserError(str(e))
  print(matrix.table(result))
  return result


def probe(args: argparse.Namespace) -> dict:
  from pathlib import Path

  from jaxtune.tools import probes

  result = probes.run(args.name, args.rounds, args.length, Path(args.dir) if args.dir else None)
  print(json.dumps(result, indent=2))
  return result


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="mode", required=True)
  p = sub.add_parser("peer", help="jaxtune vs transformers PyTorch, one shape")
  o = sub.add_parser("options", help="jaxtune's step with and without extra XLA compiler options")
  o.add_argument("--options", type=_json_object, default={}, help="B's XLA debug options as a JSON object")
  o.add_argument("--env", type=_json_object, default={},
                 help="environment variables (a JSON object of strings) set while B is traced")
  for sp in (p, o):
    _shape_args(sp)
  p.set_defaults(run=peer)
  o.set_defaults(run=options)
  s = sub.add_parser("scale", help="scale-out options on a random Llama")
  s.add_argument("--hidden", type=cli.positive_int, default=256)
  s.add_argument("--layers", type=cli.positive_int, default=8)
  s.add_argument("--batch", type=cli.positive_int, default=8)
  s.add_argument("--length", type=cli.positive_int, default=256)
  s.set_defaults(run=scale)
  m = sub.add_parser("loadmem", help="host memory of loading a 2 GB checkpoint onto 8 devices")
  m.add_argument("--format", default="safetensors", choices=("safetensors", "gguf"),
                 help="3 safetensors files + index (default) or one float32 GGUF file")
  m.add_argument("--code", action="append", help="checkout whose jaxtune loads it (repeatable; default this one)")
  m.add_argument("--rounds", type=cli.positive_int, default=1, help="loads per checkout, alternating")
  m.add_argument("--dir", help="where the temporary checkpoint is written")
  m.set_defaults(run=loadmem)
  d = sub.add_parser("datacache", help="start-up time and data-pipeline memory with and without the data cache")
  d.add_argument("--rounds", type=cli.positive_int, default=5, help="default-job runs per side, alternating")
  d.add_argument("--corpus-rounds", type=cli.positive_int, default=2,
                 help="corpus passes per size and side, alternating")
  d.add_argument("--sizes", default="50,250,1000", help="corpus sizes in MB (multiples of 50), comma-separated")
  d.add_argument("--off-max-mb", type=cli.positive_int, default=50, help="largest corpus also run without the cache")
  d.add_argument("--dir", help="work directory: corpus, HF datasets cache, entries (default a new temp dir)")
  d.add_argument("--only", choices=("startup", "corpus"), help="run one of the two measurements")
  d.set_defaults(run=datacache)
  c = sub.add_parser("ckptcost", help="step-time cost of a checkpoint save, queued vs synchronous")
  c.add_argument("--rounds", type=cli.positive_int, default=3, help="runs per store and side, alternating")
  c.add_argument("--store", default="both", choices=("local", "s3", "both"), help="local disk, s3:// (moto) or both")
  c.add_argument("--steps", type=cli.positive_int, default=30, help="train steps per run (a multiple of --save-every)")
  c.add_argument("--save-every", type=cli.positive_int, default=10, help="steps between saves")
  c.add_argument("--batch", type=cli.positive_int, default=2, help="rows per step")
  c.add_argument("--length", type=cli.positive_int, default=64, help="tokens per row")
  c.add_argument("--dir", help="work directory: config, compile cache, local run dirs (default a new temp dir)")
  c.set_defaults(run=ckptcost)
  w = sub.add_parser("suite", help="a matrix of whole jobs, jaxtune vs the PyTorch reference, alternated")
  w.add_argument("--suite", default="cpu", choices=("cpu",), help="which workloads (jaxtune/tools/matrix.py)")
  w.add_argument("--rounds", type=cli.positive_int, default=3, help="runs per workload and side, alternating")
  w.add_argument("--only", help="comma-separated workload names (default: the whole suite)")
  w.add_argument("--compile", default="cold", choices=("cold", "warm"),
                 help="jaxtune's compile cache: empty for every run (cold) or shared by a workload's runs (warm)")
  w.add_argument("--dir", help="work directory: short-text data, run logs (default a new temp dir)")
  w.set_defaults(run=suite)
  b = sub.add_parser("probe", help="one question about where a MiniLM step's time goes (jaxtune/tools/probes.py)")
  b.add_argument("name", choices=("optimizer", "padding", "compile", "background", "profile", "compile-cost"))
  b.add_argument("--rounds", type=cli.positive_int, default=5, help="turns per side, alternating")
  b.add_argument("--length", type=cli.positive_int, default=32, help="profile, compile-cost: tokens per row")
  b.add_argument("--dir", help="background: work directory (default a new temp dir)")
  b.set_defaults(run=probe)
  for sp in (p, o, s, m, d, c, w, b):
    sp.add_argument("--output", help="also write the results as JSON here")
  args = parser.parse_args()
  result = args.run(args)
  if args.output:
    with open(args.output, "w") as f:
      json.dump(result, f, indent=2)
  return 0


def _json_object(text: str) -> dict:
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise argparse.ArgumentTypeError(f"not JSON ({e}); give an object such as '{{\"xla_cpu_enable_fast_math\": true}}'")
  if not isinstance(value, dict):
    raise argparse.ArgumentTypeError("give a JSON object of XLA option names to values")
  return value


def _shape_args(p: argparse.ArgumentParser) -> None:
  from jaxtune.config import ModelConfig  # no jax: cli.tune_host still runs first

  p.add_argument("--shape", default="minilm", choices=("minilm", "bert-base", "smollm2-135m", "llama-1b"))
  p.add_argument("--batch", type=cli.positive_int, help="rows per step (default: the shape's)")
  p.add_argument("--length", type=cli.positive_int, help="tokens per row (default: the shape's)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--dropout", type=float, help="every dropout rate (default: 0.1 for BERT shapes, 0 for Llama)")
  p.add_argument("--reps", type=cli.positive_int, default=6, help="turns per side, alternating; one timed step each")
  p.add_argument("--scan-layers", action="store_true", help="jaxtune's layers as one lax.scan (model.scan_layers)")
  p.add_argument("--remat", default="none", choices=typing.get_args(typing.get_type_hints(ModelConfig)["remat"]),
                 help="jaxtune's model.remat (PyTorch's side keeps every activation)")
  p.add_argument("--settle", type=cli.non_negative_int, default=1, help="untimed steps at the start of each turn")

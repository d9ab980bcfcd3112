"""Plan a fine-tuning run before renting the hardware: memory per device, FLOPs, a roofline speed and a verdict.

python scripts/plan.py --config FILE (--topology v5e:2x4 | --gpu h100 --num-devices 8) [--hf-config config.json]
                       [--mfu 0.4] [--json PATH] [section.key=value ...]

TPU topologies compile the real train step for the slice on this host (needs libtpu: pip install
'jaxtune[tpu-compile]'); GPU memory is an analytic estimate. See docs/plan.md.
"""

import argparse
import json
from pathlib import Path

from jaxtune import cli


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="YAML config (see configs/)")
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument("--topology", help="TPU slice: generation:grid, e.g. v5e:2x4, v5p:4x4x4, v6e:4x4")
  where.add_argument("--gpu", choices=["h100", "h200"], help="GPU kind (memory is estimated analytically)")
  parser.add_argument("--num-devices", type=cli.positive_int, default=8, help="with --gpu: how many GPUs (default 8)")
  parser.add_argument("--hf-config", help="the model's config.json, when model.path is a hub id (see configs/hf/)")
  parser.add_argument("--mfu", type=cli.positive_float, default=0.4,
                      help="model FLOPs utilisation for the speed (default 0.4)")
  parser.add_argument("--hbm-gib", type=cli.positive_float,
                      help="HBM per device in GiB, instead of the chip's datasheet value")
  parser.add_argument("--num-labels", type=cli.positive_int, default=2,
                      help="classification / tagging: the number of classes")
  parser.add_argument("--json", help="also write the plan as JSON to this path")
  parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. mesh.fsdp=16")
  args = parser.parse_args()
  if not 0 < args.mfu <= 1:
    parser.error("--mfu is a fraction in (0, 1]")

  from jaxtune import config
  from jaxtune.tools import plan

  cfg = config.load(args.config, args.overrides)
  hf_config = plan.read_hf_config(cfg, args.hf_config)
  target = (plan.tpu_target(args.topology, args.hbm_gib) if args.topology
            else plan.gpu_target(args.gpu, args.num_devices, args.hbm_gib))
  result = plan.plan(cfg, hf_config, target, args.mfu, args.num_labels,
                     " ".join([args.config, *args.overrides]))
  print(plan.table(result))
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
  return 0


TPU_COMPILE_ONLY = True  # `jaxtune` sets cli.compile_only_tpu() before jax is imported, as the script does

"""The configuration reference: python scripts/config_docs.py [--output FILE] (default: print it)

Every config key with its type, range, default and meaning, generated from jaxtune/config/sections.py; the
checkout keeps it as docs/configuration.md (tests/test_config_doc.py checks that it is current)."""

from pathlib import Path

from jaxtune import cli


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__)
  parser.add_argument("--output", help="write the page here (e.g. docs/configuration.md) instead of printing it")
  args = parser.parse_args()

  from jaxtune.tools import config_doc

  text = config_doc.markdown()
  if args.output:
    Path(args.output).write_text(text)
    print(f"wrote {args.output}")
  else:
    print(text, end="")
  return 0

"""Shared entry-point plumbing: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run(main: Callable[[], int | None]) -> None:
  """Runs `main`, turning a UserError into `error: <message>` and exit 2."""
  from jaxtune.errors import UserError

  try:
    code = main()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(code or 0)

"""Runs a script with an OSError injected at jaxtune's write layer, for machines where a test cannot mount a small
tmpfs: python tests/faultinject.py ERRNO:WHERE:N scripts/X.py args...

WHERE is `checkpoint` (the Nth checkpoint write fails as Orbax's background write does: its temp dir is left
behind and the error surfaces in the manager) or `metrics` (the Nth metrics.jsonl append is cut short as on a
full disk: os.write writes half the record and returns the short count; with ERRNO other than ENOSPC the append
fails outright).
"""

import errno
import os
import runpy
import sys

from jaxtune.train import checkpoints, runlog


def inject(name: str, where: str, nth: int) -> None:
  code, calls = getattr(errno, name), [0]

  def fail(path):
    raise OSError(code, os.strerror(code), str(path))

  if where == "checkpoint":
    real = checkpoints.ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
      calls[0] += 1
      if calls[0] == nth:
        (self.directory / f"{step}.orbax-checkpoint-tmp").mkdir()
        fail(self.directory / f"{step}.orbax-checkpoint-tmp")
      return real(self, step, *args, **kwargs)

    checkpoints.ocp.CheckpointManager.save = save
  else:
    real_append = runlog._append

    class ShortWrites:  # runlog's `os` for one append: os.write stops halfway, as on a disk that just filled
      def __getattr__(self, attr):
        return getattr(os, attr)

      @staticmethod
      def write(fd, data):
        return os.write(fd, data[:len(data) // 2])

    def append(path, text):
      calls[0] += 1
      if calls[0] == nth and code != errno.ENOSPC:
        fail(path)
      runlog.os = ShortWrites() if calls[0] == nth else os
      real_append(path, text)

    runlog._append = append


if __name__ == "__main__":
  name, where, nth = sys.argv[1].split(":")
  inject(name, where, int(nth))
  sys.argv = sys.argv[2:]
  runpy.run_path(sys.argv[0], run_name="__main__")

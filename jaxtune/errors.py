"""The exceptions that end a script with one line and a documented exit code (README, Failures and recovery)."""

EXIT_USER_ERROR = 2  # bad config, data, checkpoint or CLI input: nothing was written
EXIT_NONFINITE = 3  # a non-finite loss or gradient (train.nonfinite); the last good checkpoint is kept
EXIT_PREEMPTED = 75  # SIGTERM / SIGINT: a checkpoint was saved; rerun with --resume (sysexits' EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # a second Ctrl-C (or one outside training): stopped at once, nothing saved


class UserError(Exception):
  """A problem in the user's input; the message names it and says how to fix it."""


class Stopped(Exception):
  """Training ended early on purpose; `code` is the process exit code, the message the one line printed."""

  def __init__(self, message: str, code: int):
    super().__init__(message)
    self.code = code

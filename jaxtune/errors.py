"""The one exception type for mistakes a user can fix (config, data, checkpoint, CLI)."""


class UserError(Exception):
  """A problem in the user's input; the message names it and says how to fix it."""

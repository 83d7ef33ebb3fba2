"""The one exception type a user can cause, and how the CLI reports it."""


class PLDError(Exception):
    """Bad input from a user: params, paths, stores, checkpoints.

    The message names the file, key or path that is wrong and the fix. The CLI prints it on one
    line and exits with ``EXIT_CODE``; nothing half-written is left behind.
    """

    EXIT_CODE = 2

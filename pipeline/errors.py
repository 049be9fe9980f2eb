"""Errors the CLI turns into one line and an exit code instead of a traceback."""


class UserError(Exception):
    """Bad input from the user (params, files, CLI arguments): exit code 2."""

    exit_code = 2


class EnvironmentFailure(Exception):
    """The environment failed (network, server unreachable, disk): exit code 1."""

    exit_code = 1

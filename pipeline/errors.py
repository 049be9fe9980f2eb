"""Errors the CLI turns into one line and an exit code instead of a traceback."""


class UserError(Exception):
    """Bad input from the user (params, files, CLI arguments): exit code 2."""

    exit_code = 2


class EnvironmentFailure(Exception):
    """The environment failed (network, server unreachable, disk): exit code 1."""

    exit_code = 1


class TrainingDiverged(Exception):
    """A run's loss went non-finite: not the user's input (exit 1), and a lost candidate where
    the protocol compares several."""

    exit_code = 1


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line for a message: its first line, or its type when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__

"""User-facing errors: one line that names the input and the fix. The CLI prints them and exits 2."""

from __future__ import annotations

import difflib


class BudgetLMError(Exception):
    """Base of every error a user can cause; its message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ModelError(BudgetLMError):
    """A model name or path that cannot be loaded."""


class UnknownNameError(BudgetLMError):
    """A task, method, model or config key that does not exist."""


class ConfigError(BudgetLMError):
    """A recipe or method config with a bad key or value."""


class DataError(BudgetLMError):
    """A data file that is missing, empty or in the wrong schema."""


def suggest(name: str, choices) -> str:
    """' (did you mean: a, b?)' or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def unknown(kind: str, name: str, choices) -> UnknownNameError:
    choices = sorted(choices)
    return UnknownNameError(f"unknown {kind} '{name}'{suggest(name, choices)}; available: {', '.join(choices)}")


# signals budgetlm's CLI handler received (cli.main). The handler raises Interrupted where the main thread is, and
# where that is a finalizer or a callback from C the exception is printed and dropped, and the command would run on:
# the signal is therefore also recorded here and raised again at the next progress step (check_interrupted).
PENDING_SIGNALS: list[int] = []


def check_interrupted() -> None:
    """Raise Interrupted for a signal that arrived but whose exception was dropped on its way (PENDING_SIGNALS)."""
    if PENDING_SIGNALS:
        raise Interrupted(PENDING_SIGNALS[0])


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: raised by budgetlm's signal handlers so that cleanups run on the way out. A
    BaseException, like KeyboardInterrupt, but not one: the CLI framework would turn that into a bare exit code."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum

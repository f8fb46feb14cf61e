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


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: raised by budgetlm's signal handlers so that cleanups run on the way out. A
    BaseException, like KeyboardInterrupt, but not one: the CLI framework would turn that into a bare exit code."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum

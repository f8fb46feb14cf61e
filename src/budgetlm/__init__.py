"""budgetlm: put language models on a budget. The public API lives in budgetlm.api."""

from budgetlm._version import __version__ as __version__


def __getattr__(name):  # lazy, so `import budgetlm` stays cheap and free of torch
    if name in {"load", "apply", "evaluate", "measure", "run", "report"}:
        from budgetlm import api

        return getattr(api, name)
    raise AttributeError(name)

"""budgetlm's version, in a module of its own so that any layer can read it without importing the package's public
face (budgetlm/__init__.py re-exports it as `budgetlm.__version__`; pyproject.toml carries the same number)."""

__version__ = "0.1.0"

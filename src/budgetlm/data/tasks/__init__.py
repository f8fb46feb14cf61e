"""The task registry with every built-in task registered (lazily: a task's module loads on first use)."""

from budgetlm.data.tasks.base import tasks


def _register() -> None:
    from budgetlm.data.tasks.hub import register_hub_tasks
    from budgetlm.data.tasks.offline import register_offline_tasks

    register_offline_tasks(tasks)
    register_hub_tasks(tasks)


try:
    _register()
except ImportError:  # pragma: no cover - a task family module is missing while the tree is being built
    pass

__all__ = ["tasks"]

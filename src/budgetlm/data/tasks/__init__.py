"""The task registry with every built-in task registered (lazily: a task's module loads on first use)."""

from budgetlm.data.tasks.base import tasks
from budgetlm.data.tasks.hub import register_hub_tasks
from budgetlm.data.tasks.offline import register_offline_tasks

register_offline_tasks(tasks)
register_hub_tasks(tasks)

__all__ = ["tasks"]

"""The task registry with every built-in task registered (lazily: a task's module loads on first use)."""

from budgetlm.data.tasks.base import tasks
from budgetlm.data.tasks.hub import register_hub_tasks
from budgetlm.data.tasks.mmlu import register_mmlu_tasks
from budgetlm.data.tasks.more_mc import register_more_mc_tasks
from budgetlm.data.tasks.offline import register_offline_tasks

register_offline_tasks(tasks)
register_hub_tasks(tasks)
register_more_mc_tasks(tasks)
register_mmlu_tasks(tasks)
# the retrieval tasks live with retrieval (rag/tasks.py), above this layer: lazy entries import them on first use
tasks.add("sciq-rag", "budgetlm.rag.tasks:sciq_rag")
tasks.add("boolq-rag", "budgetlm.rag.tasks:boolq_rag")

__all__ = ["tasks"]

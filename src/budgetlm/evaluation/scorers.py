"""ROUGE-L and BERTScore, kept importable here: they live in budgetlm.data.tasks.scorers, below both the tasks
that score with them (fidelity) and the evaluation layer (see docs/architecture.md, "Layers")."""

from budgetlm.data.tasks.scorers import BERTSCORE_BACKBONE as BERTSCORE_BACKBONE
from budgetlm.data.tasks.scorers import bertscore as bertscore
from budgetlm.data.tasks.scorers import minilm as minilm
from budgetlm.data.tasks.scorers import rouge_l as rouge_l

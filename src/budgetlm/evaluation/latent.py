"""The latent space of a model (HOLA's t-SNE figure): the final hidden state of items from several tasks, their 2-D
t-SNE embedding and how well the hidden space separates the tasks.

  prompt_tokens  an item's prompt as its task feeds it: a multiple-choice task's context as loglikelihood encodes
                 it (HFLM._split), a generation task's prompt as generate_until does (chat template included)
  final_states   the final hidden state (after the model's final norm) at each prompt's last token
  embed          scikit-learn's t-SNE to 2-D with a fixed seed, on one thread (deterministic; cosine distance)
  silhouette     scikit-learn's silhouette score of the task labels (cosine distance in the hidden space)

A task without a prompt (perplexity over text, KL, custom runs) has no place here: `check_task` says so in one line.
"""

from __future__ import annotations

import numpy as np
import torch

from budgetlm.data.tasks.base import GenerateTask, MultipleChoiceTask, Task
from budgetlm.errors import BudgetLMError, ConfigError

DISTANCE = "cosine"  # between hidden states, for t-SNE and the silhouette score
METHOD = "scikit-learn TSNE, Barnes-Hut, one thread, PCA start"
BATCH = 8  # prompts of the same length per forward (no padding: see final_states)


def check_task(task: Task, where: str) -> None:
    """A task whose items carry a prompt: multiple-choice or generation tasks."""
    if not isinstance(task, MultipleChoiceTask | GenerateTask):
        raise ConfigError(
            f"{where}: task '{task.name}' ({task.kind}) builds no prompt for its items; choose multiple-choice or "
            "generation tasks (e.g. arc_easy, text-cloze, arith)"
        )


def prompt_tokens(lm, task: Task, doc: dict) -> list[int]:
    """The tokens the task feeds the model before its answer, cut from the left to the model's window."""
    check_task(task, "latent")
    if isinstance(task, MultipleChoiceTask):
        context, continuation = task.requests(doc)[0]
        ids = lm._split(context, continuation)[0]  # the context as loglikelihood scores it
    else:
        ids = lm.encode(lm.format_prompt(task.doc_to_text(doc), task.chat))
    return ids[-lm.max_length :] or [lm.prefix_token]


@torch.inference_mode()
def final_states(lm, prompts: list[list[int]]) -> np.ndarray:
    """[len(prompts), hidden] float32: the decoder's last hidden state (after its final norm) at each prompt's last
    token."""
    # Only prompts of one length share a forward: a padding mask sends attention to sdpa's masked (math) path, which
    # on SmolLM2 at 1 thread doubled the time of 8 gsm8k prompts of 1,300-1,600 tokens (88 s against 42 s one by one)
    # and made the latent phase of an fp32 cell take half an hour
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < BATCH and len(prompts[batches[-1][0]]) == len(prompts[i]):
            batches[-1].append(i)
        else:
            batches.append([i])
    states: list[np.ndarray | None] = [None] * len(prompts)
    for rows in batches:
        hidden, mask = lm._hidden([prompts[i] for i in rows])
        last = hidden[torch.arange(len(rows)), mask.sum(dim=1) - 1].float().numpy()
        for r, i in enumerate(rows):
            states[i] = last[r]
    return np.stack(states).astype(np.float32)


def embed(states: np.ndarray, perplexity: float, seed: int) -> tuple[np.ndarray, float]:
    """(points [n, 2], the final KL divergence of the fit): scikit-learn's Barnes-Hut t-SNE on one thread (its sums over
    threads need not repeat; on one they do: the same points on every rerun), PCA initialisation, the seed's random
    state. (The exact method took twice as long for 192 points and four times for 1,000.)"""
    from sklearn.manifold import TSNE

    n = len(states)
    if perplexity >= n:
        raise BudgetLMError(
            f"latent.perplexity {perplexity:g} needs more than {perplexity:g} items, and the tasks gave {n}; lower "
            "latent.perplexity or raise latent.items"
        )
    tsne = TSNE(n_components=2, perplexity=perplexity, metric=DISTANCE, init="pca", method="barnes_hut",
                random_state=seed, n_jobs=1)  # fmt: skip
    points = tsne.fit_transform(states.astype(np.float64))
    return points.astype(np.float64), float(tsne.kl_divergence_)


def silhouette(x: np.ndarray, labels: list[int], metric: str = DISTANCE) -> float | None:
    """The mean silhouette of the labels (None with fewer than two labels or fewer items than labels + 1)."""
    from sklearn.metrics import silhouette_score

    k = len(set(labels))
    if k < 2 or len(labels) <= k:
        return None
    return float(silhouette_score(x, np.asarray(labels), metric=metric))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cosine similarity of each row of a with the same row of b."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return np.einsum("ij,ij->i", a64, b64) / np.where(norms > 0, norms, 1.0)

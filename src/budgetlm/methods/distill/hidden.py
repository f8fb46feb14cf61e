"""Hidden-state matching for distillation: which student layer learns from which teacher layer, the learned
projection between their widths, capturing the layers' outputs, and the MSE / cosine loss.

The hidden state of decoder layer i is the residual stream leaving it (the block's output, before the final
norm for the last layer), captured with forward hooks, so every layer is treated alike.

Layer map (student layer j -> teacher layer), in this order:
1. `layer_map` given: used as is (indices checked against both models' depths);
2. both models descend from the same original depth and record the layers removed from it
   (config.budgetlm_removed_layers, written by shortgpt.remove_layers): student layer j is mapped to the teacher
   layer with the same original index, i.e. a ShortGPT-pruned student's remaining layer learns from the very
   layer it was in the unpruned teacher (the default teacher is that model);
3. otherwise, proportional depth (TinyBERT's g(m) = m·N/M, end-aligned): j -> round((j + 1)·L_t / L_s) − 1, so
   the last student layer matches the last teacher layer.
`layers` restricts which student layers are matched (default: all).

Projection: when the widths differ (d_s != d_t), each matched student layer gets its own learned
nn.Linear(d_s, d_t, bias=False) (TinyBERT's W_h), seeded from the step's seed, trained with the student and
discarded afterwards (it is not part of the distilled model). Equal widths compare directly.

Loss on every non-padding token (prompt tokens included: hidden states carry no label), averaged over the
matched layers: `mse` = mean over tokens and features of (P h_s − h_t)²; `cosine` = mean over tokens of
1 − cos(P h_s, h_t) (scale-free, the default: hidden-state magnitudes differ by orders between layers and models).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from budgetlm.errors import ConfigError
from budgetlm.methods.calibration import decoder_layers

REMOVED_KEY = "budgetlm_removed_layers"  # shortgpt.REMOVED_KEY (not imported: prune/ is another helper's)


def text_config(model: nn.Module):
    return model.config.get_text_config(decoder=True)


def original_layers(model: nn.Module) -> tuple[list[int], int]:
    """(the original index of each current decoder layer, the original depth), from config.budgetlm_removed_layers."""
    removed = set(getattr(text_config(model), REMOVED_KEY, None) or [])
    depth = len(decoder_layers(model)) + len(removed)
    return [i for i in range(depth) if i not in removed], depth


def layer_map(
    student: nn.Module, teacher: nn.Module, layers: list[int] | None, explicit: dict[int, int] | None, method: str
) -> tuple[dict[int, int], str]:
    """{student layer: teacher layer} and how it was chosen (see the module docstring); bad indices are
    one-line ConfigErrors."""
    n_s, n_t = len(decoder_layers(student)), len(decoder_layers(teacher))
    chosen = list(range(n_s)) if layers is None else sorted(set(layers))
    bad = [j for j in chosen if not 0 <= j < n_s]
    if bad or not chosen:
        raise ConfigError(f"method '{method}': layers {layers} must be student layers 0..{n_s - 1}; fix `layers`")
    if explicit is not None:
        wrong = {j: i for j, i in explicit.items() if not (0 <= j < n_s and 0 <= i < n_t)}
        if wrong:
            raise ConfigError(
                f"method '{method}': layer_map entries {wrong} out of range (student layers 0..{n_s - 1}, teacher "
                f"layers 0..{n_t - 1}); fix layer_map"
            )
        return {j: explicit[j] for j in sorted(explicit) if j in chosen}, "layer_map"
    orig_s, depth_s = original_layers(student)
    orig_t, depth_t = original_layers(teacher)
    if depth_s == depth_t:
        where = {o: i for i, o in enumerate(orig_t)}
        missing = [j for j in chosen if orig_s[j] not in where]
        if missing:
            raise ConfigError(
                f"method '{method}': student layers {missing} (original layers {[orig_s[j] for j in missing]}) were "
                "removed from the teacher too; give a layer_map or leave them out of `layers`"
            )
        return {j: where[orig_s[j]] for j in chosen}, "original layer indices (config.budgetlm_removed_layers)"
    return {j: round((j + 1) * n_t / n_s) - 1 for j in chosen}, f"proportional depth ({n_s} -> {n_t} layers)"


def projections(student: nn.Module, teacher: nn.Module, mapping: dict[int, int], seed: int) -> nn.ModuleDict | None:
    """A learned Linear(d_s, d_t) per matched student layer when the widths differ; None when they agree."""
    d_s, d_t = text_config(student).hidden_size, text_config(teacher).hidden_size
    if d_s == d_t:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.ModuleDict({str(j): nn.Linear(d_s, d_t, bias=False) for j in mapping})


@contextlib.contextmanager
def capture(model: nn.Module, indices: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """While active, store[i] is the output of decoder layer i of the latest forward."""
    store: dict[int, torch.Tensor] = {}
    blocks = decoder_layers(model)

    def hook_for(i: int):
        def hook(_mod, _args, output):
            store[i] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [blocks[i].register_forward_hook(hook_for(i)) for i in indices]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def hidden_loss(
    student_h: dict[int, torch.Tensor],
    teacher_h: dict[int, torch.Tensor],
    mapping: dict[int, int],
    proj: nn.ModuleDict | None,
    mask: torch.Tensor,
    kind: str,
) -> torch.Tensor:
    """The mean over matched layers of the MSE or cosine distance on the tokens where mask is true."""
    total = 0.0
    for j, i in mapping.items():
        hs = student_h[j][mask].float()
        ht = teacher_h[i][mask].float()
        if proj is not None:
            hs = proj[str(j)](hs)
        if kind == "mse":
            total = total + F.mse_loss(hs, ht)
        else:
            total = total + (1 - F.cosine_similarity(hs, ht, dim=-1)).mean()
    return total / len(mapping)

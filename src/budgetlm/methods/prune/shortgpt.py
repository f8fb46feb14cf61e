"""shortgpt: ShortGPT (Men et al., arXiv 2403.03853) — remove the decoder layers that change the hidden state least.

Block Influence of decoder layer i on calibration text: with x_in,t the hidden state entering layer i at token t
and x_out,t the one leaving it (the residual stream, before the final norm for the last layer),

    BI_i = 1 − mean_t cos(x_in,t, x_out,t)

over every calibration token. A layer whose output is its input (a near-identity residual block) has BI ≈ 0 and is
the first to go. Every BI is measured on the *original* model in one layer-by-layer pass
(calibration.LayerwiseCalibration: run the layer on its inputs, compare, and the outputs become the next layer's
inputs; nothing changes during scoring), and the `n_layers` (or round(fraction · L), at least 1) layers with the
lowest BI are removed at once, as in the paper (not iteratively re-scored). Ties go to the lower index. `targets`
and `ignore` select the candidate layers by module-name prefix (e.g. `ignore: ["model.layers.0"]` keeps layer 0).

Removal (`remove_layers`) makes the model really smaller and consistent, so that it saves, loads, evaluates,
generates with a KV cache and exports to GGUF like any other model: the blocks are deleted from the ModuleList (the
remaining ones renumber 0..L'−1, which is also how their weights are named when saved and in GGUF's blk.N), the
config's num_hidden_layers and per-layer lists (Gemma 3's `layer_types`: which layers use sliding-window attention)
follow, and each remaining module's `layer_idx` (the KV cache's index) is renumbered. The config also records
`budgetlm_removed_layers`: the indices, in the model as first loaded, of every layer removed so far (composed over
repeated removals), so the saved config.json says which layers are gone. Recovery fine-tuning (LoRA) is a later
step of the pipeline; depth-mapped distillation can reuse `remove_layers` with its own choice of layers.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import field_validator, model_validator
from torch import nn

from budgetlm.errors import ConfigError, ModelError
from budgetlm.methods.base import MethodConfig, StepContext, StepReport, implements, register_method
from budgetlm.methods.calibration import LayerwiseCalibration, decoder_layers, layer_prefix
from budgetlm.models.handle import ModelHandle

DEFAULT_FRACTION = 0.25
REMOVED_KEY = "budgetlm_removed_layers"  # config attribute: original indices of the removed layers
# config lists with one entry per decoder layer (filtered with the layers); Llama has none, Gemma 3 `layer_types`
PER_LAYER_KEYS = ("layer_types", "mlp_layer_types", "kv_sharing_modes", "no_rope_layers")


@register_method("shortgpt")
class ShortGPT(MethodConfig):
    """ShortGPT: remove the decoder layers with the lowest Block Influence (1 − cos(in, out)) on calibration text."""

    n_layers: int | None = None  # how many layers to remove

    def check(self, model: nn.Module) -> None:
        removable(self, model)

    fraction: float | None = None  # or which fraction of them (default 0.25 when neither is set)
    metric: Literal["bi"] = "bi"

    needs_calibration = True

    @model_validator(mode="before")
    @classmethod
    def _one_of(cls, values):
        if isinstance(values, dict):
            n, f = values.get("n_layers"), values.get("fraction")
            if n is not None and f is not None:
                raise ValueError(
                    f"set either n_layers or fraction, not both (got n_layers={n}, fraction={f}); drop one of them"
                )
            if n is None and f is None:
                values = {**values, "fraction": DEFAULT_FRACTION}
        return values

    @field_validator("n_layers")
    @classmethod
    def _n(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("n_layers must be at least 1 (the number of decoder layers to remove)")
        return v

    @field_validator("fraction")
    @classmethod
    def _fraction(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v < 1:
            raise ValueError("fraction must be strictly between 0 and 1 (e.g. 0.25 removes a quarter of the layers)")
        return v


def layers_to_remove(cfg: ShortGPT, n_total: int) -> int:
    """How many of `n_total` layers the config removes: n_layers, or round(fraction · n_total) (half up, at least 1).
    Removing all of them is a one-line ConfigError."""
    if cfg.n_layers is not None:
        n, what = cfg.n_layers, f"n_layers={cfg.n_layers}"
    else:
        n = max(1, math.floor(cfg.fraction * n_total + 0.5))
        what = f"fraction={cfg.fraction} ({n} of {n_total} layers)"
    if n >= n_total:
        raise ConfigError(
            f"method 'shortgpt': {what} would remove all {n_total} decoder layers; remove at most {n_total - 1}"
        )
    return n


@torch.no_grad()
def block_influence(
    model: nn.Module, tokens: torch.Tensor, batch_size: int = 8, progress: bool = False
) -> torch.Tensor:
    """BI_i = 1 − mean over the calibration tokens of cos(x_in, x_out) for every decoder layer i (float64 [L]),
    from one layer-by-layer pass of `tokens` through the unchanged model."""
    cal = LayerwiseCalibration(
        model, tokens, batch_size=batch_size, method="shortgpt", progress=progress, title="shortgpt block influence"
    )
    out = torch.empty(len(cal.blocks), dtype=torch.float64)
    for i, layer in cal.layers():
        outputs = cal.run(layer)
        total = sum(F.cosine_similarity(x.double(), y.double(), dim=-1).sum() for x, y in zip(cal.inputs, outputs))
        out[i] = 1 - total / cal.n_tokens
        cal.inputs = outputs  # what cal.advance(layer) would compute again: the next layer's inputs
    return out


def remove_layers(model: nn.Module, indices: list[int] | set[int]) -> list[int]:
    """Delete decoder layers `indices` (current positions) from `model` in place, keeping it consistent.

    The blocks leave the decoder's ModuleList (the rest renumber 0..L'−1, so saved weights and GGUF tensors are
    named by the new positions); the decoder config's num_hidden_layers and per-layer lists (PER_LAYER_KEYS, e.g.
    Gemma 3's `layer_types`) follow; every remaining submodule's `layer_idx` (the KV cache index) is set to its
    block's new position; and config.budgetlm_removed_layers lists the indices, in the model as first loaded, of
    all layers removed so far. Returns the current indices of the layers kept. An index out of range, or removing
    every layer, is a one-line ConfigError raised before anything changes.
    """
    blocks = decoder_layers(model)
    n = len(blocks)
    drop = sorted({int(i) for i in indices})
    if not drop:
        return list(range(n))
    if drop[0] < 0 or drop[-1] >= n:
        raise ConfigError(f"remove_layers: layer indices {drop} out of range; the model has layers 0..{n - 1}")
    if len(drop) >= n:
        raise ConfigError(f"remove_layers: cannot remove all {n} decoder layers; keep at least one")
    cfg = model.config.get_text_config(decoder=True)
    if getattr(cfg, "is_heterogeneous", False):
        raise ModelError("remove_layers does not support configs with per-layer overrides (per_layer_config)")
    if cfg.num_hidden_layers != n:
        raise ModelError(f"the config says {cfg.num_hidden_layers} layers but the decoder has {n}; cannot remove")
    kept = [i for i in range(n) if i not in set(drop)]

    previous = list(getattr(cfg, REMOVED_KEY, None) or [])
    original = [i for i in range(n + len(previous)) if i not in set(previous)]  # current index -> original one
    for i in reversed(drop):
        del blocks[i]  # ModuleList renumbers its keys after a deletion
    cfg.num_hidden_layers = len(kept)
    for key in PER_LAYER_KEYS:
        values = getattr(cfg, key, None)
        if isinstance(values, (list, tuple)) and len(values) == n:
            setattr(cfg, key, [values[i] for i in kept])
    for new, block in enumerate(blocks):
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new
    setattr(cfg, REMOVED_KEY, sorted(previous + [original[i] for i in drop]))
    return kept


def _candidates(model: nn.Module, cfg: ShortGPT, n_total: int) -> list[int]:
    """Layers that targets/ignore allow to be removed (matched by their module-name prefix, e.g. model.layers.3)."""
    out = []
    for i in range(n_total):
        prefix = layer_prefix(model, i)
        if any(fnmatch.fnmatchcase(prefix, p) for p in cfg.ignore):
            continue
        if any(fnmatch.fnmatchcase(prefix, p) for p in cfg.targets):
            out.append(i)
    return out


def removable(cfg: ShortGPT, model: nn.Module) -> tuple[int, int, list[int]]:
    """(layers in all, layers to remove, removable layers); one-line ConfigErrors when the config does not fit."""
    n_total = len(decoder_layers(model))
    n_remove = layers_to_remove(cfg, n_total)
    candidates = _candidates(model, cfg, n_total)
    if len(candidates) < n_remove:
        raise ConfigError(
            f"method 'shortgpt': targets {cfg.targets} (ignore {cfg.ignore}) leave {len(candidates)} removable "
            f"decoder layers but {n_remove} are to be removed; widen targets or remove fewer"
        )
    return n_total, n_remove, candidates


@implements(ShortGPT)
@torch.no_grad()
def apply(handle: ModelHandle, cfg: ShortGPT, ctx: StepContext) -> StepReport:
    model = handle.model
    n_total, n_remove, candidates = removable(cfg, model)
    prefixes = [layer_prefix(model, i) for i in range(n_total)]
    bi = block_influence(model, ctx.calibration(handle.tokenizer), progress=ctx.progress)
    ranked = sorted(candidates, key=lambda i: (float(bi[i]), i))  # lowest BI first, ties to the lower index
    removed = sorted(ranked[:n_remove])
    previous = list(getattr(model.config.get_text_config(decoder=True), REMOVED_KEY, None) or [])
    remove_layers(model, removed)
    now = getattr(model.config.get_text_config(decoder=True), REMOVED_KEY)
    original = [i for i in now if i not in set(previous)]  # the removed layers' indices in the model as loaded

    rank = {i: r for r, i in enumerate(ranked)}  # None: not a candidate (targets/ignore)
    stats: dict = {
        prefixes[i]: {"block_influence": float(bi[i]), "removed": i in removed, "rank": rank.get(i)}
        for i in range(n_total)
    }
    shown = ", ".join(f"{i} (BI {float(bi[i]):.4f})" for i in removed)
    notes = [
        f"removed {n_remove} of {n_total} decoder layers with the lowest block influence: {shown}; "
        f"{n_total - n_remove} remain",
        "block influence per layer: " + ", ".join(f"{float(b):.4f}" for b in bi),
    ]
    if original != removed:
        notes.append(f"in the model as first loaded these are layers {original} (config.{REMOVED_KEY} = {now})")
    stats["overall"] = {
        "layers_before": n_total,
        "layers_after": n_total - n_remove,
        "removed_layers": removed,
        "removed_original_layers": original,
    }
    return StepReport("shortgpt", cfg.model_dump(), stats=stats, notes=notes)

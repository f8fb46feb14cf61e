"""Draft models for speculative decoding: any model budgetlm loads (a 4-bit or 2-bit copy, a pruned copy, ...) or
`layers:K`, the verifier's first K decoder layers with its own final norm and head (sharing its weights: no copy).
Every draft must speak the verifier's tokenizer: the same token for the same id, the same vocabulary size."""

from __future__ import annotations

import copy

import torch

from budgetlm.errors import ConfigError, ModelError
from budgetlm.models.handle import ModelHandle

LAYERS = "layers:"


def first_layers(model: torch.nn.Module, k: int, spec: str = "") -> torch.nn.Module:
    """A causal LM made of `model`'s embedding, its first k decoder layers, its final norm and its head, sharing
    their modules (a shallow copy: nothing of `model` changes)."""
    prefix = getattr(model, "base_model_prefix", "model")
    decoder = getattr(model, prefix, None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError(f"draft {spec or LAYERS + str(k)}: {type(model).__name__} has no decoder layer list to cut")
    n = len(layers)
    if not 1 <= k < n:
        raise ConfigError(f"draft {spec or LAYERS + str(k)}: the model has {n} layers; give K from 1 to {n - 1}")
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = k
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:k]
    short = copy.copy(decoder)
    short._modules = dict(decoder._modules)
    short.layers = torch.nn.ModuleList(list(layers)[:k])
    short.config = cfg
    draft = copy.copy(model)
    draft._modules = dict(model._modules)
    setattr(draft, prefix, short)
    draft.config = cfg
    draft.budgetlm_first_layers_of = (model, k)  # its keys and values can be copied from the model's (CachedLM)
    return draft


def check_tokenizer(verifier: ModelHandle, draft: ModelHandle, spec: str) -> None:
    """A draft must give every id the verifier's token and score the same vocabulary."""
    va, vb = verifier.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if va != vb:
        diff = len(set(va.items()) ^ set(vb.items()))
        raise ModelError(
            f"draft {spec} uses another tokenizer than the verifier {verifier.source} ({len(vb)} vs {len(va)} "
            f"tokens, {diff} (token, id) pairs differ); give a draft made from the same model"
        )
    na = verifier.model.get_output_embeddings().weight.shape[0]
    nb = draft.model.get_output_embeddings().weight.shape[0]
    if na != nb:
        raise ModelError(
            f"draft {spec} scores {nb} vocabulary rows, the verifier {na}; give a draft with the verifier's vocabulary"
        )


def parse_specs(text: str | None) -> list[str]:
    specs = [s.strip() for s in (text or "").split(",") if s.strip()]
    for s in specs:
        if s.startswith(LAYERS):
            k = s[len(LAYERS) :]
            if not k.isdigit():
                raise ConfigError(f"draft {s}: write layers:K with K a number of layers (e.g. layers:8)")
    return specs


def load_drafts(verifier: ModelHandle, specs: list[str], load) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) per draft spec, cheapest first as given; `load(spec)` loads a model by budgetlm's rules."""
    out = []
    for spec in specs:
        if spec.startswith(LAYERS):
            out.append((spec, first_layers(verifier.model, int(spec[len(LAYERS) :]), spec)))
            continue
        try:
            handle = load(spec)
        except ModelError as exc:
            raise ModelError(f"draft {spec}: {exc}") from None
        check_tokenizer(verifier, handle, spec)
        handle.model.eval()
        out.append((spec, handle.model))
    return out


def parse_taus(text: str | None, n_drafts: int) -> list[float | None]:
    """One τ per draft ("1.5" for all, or "1.0,2.0" cheapest first; "inf" or "none": no gate)."""
    if n_drafts == 0:
        if text:
            raise ConfigError("--tau needs --draft: the entropy gate belongs to a draft model")
        return []
    parts = [p.strip() for p in (text or "").split(",") if p.strip()] or [str(DEFAULT_TAU)]
    if len(parts) == 1:
        parts = parts * n_drafts
    if len(parts) != n_drafts:
        raise ConfigError(f"--tau gives {len(parts)} values for {n_drafts} drafts; give one, or one per draft")
    taus: list[float | None] = []
    for p in parts:
        if p.lower() in ("inf", "none"):
            taus.append(None)
            continue
        try:
            t = float(p)
        except ValueError:
            raise ConfigError(f"--tau {p} is not a number; give an entropy threshold in nats, e.g. --tau 2") from None
        if not t > 0:
            raise ConfigError(f"--tau {p}: the entropy gate needs τ > 0 (nats); 'inf' drafts to --max-draft")
        taus.append(t)
    return taus


DEFAULT_TAU = 2.0  # nats; chosen by benchmarks/bench_hsd.py's τ sweep on gsm8k with SmolLM2-135M

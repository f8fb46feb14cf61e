"""Draft models for speculative decoding: any model budgetlm loads (a 4-bit or 2-bit copy, a pruned copy, ...),
`layers:K`, the verifier's first K decoder layers with its own final norm and head (sharing its weights: no copy), or
`copy:METHOD[:key=value...]`, a copy of the verifier made here with one method step (copy:rtn:bits=8:embeddings=true:
the int8 self-draft, which reads the verifier's keys and values in exact mode).
Every draft must speak the verifier's tokenizer: the same token for the same id, the same vocabulary size."""

from __future__ import annotations

import copy

import torch

from budgetlm.errors import BudgetLMError, ConfigError, ModelError
from budgetlm.models.handle import ModelHandle

LAYERS = "layers:"
COPY = "copy:"  # copy:METHOD[:key=value...]: the verifier's copy with one method step applied (copy:rtn:bits=8)


def copy_step(spec: str) -> dict:
    """The method step of a `copy:METHOD[:key=value...]` draft, validated (one-line ConfigError)."""
    import yaml

    from budgetlm.methods.base import parse_config

    name, *pairs = spec[len(COPY) :].split(":")
    if not name:
        raise ConfigError(f"draft {spec}: write copy:METHOD[:key=value...], e.g. copy:rtn:bits=8:embeddings=true")
    step: dict = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ConfigError(f"draft {spec}: '{pair}' is not key=value (e.g. copy:rtn:bits=8)")
        try:
            step[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            step[key] = value
    try:
        parse_config(name, step)
    except BudgetLMError as exc:  # an unknown method or setting, a bad value
        raise ConfigError(f"draft {spec}: {exc}") from None
    return {"method": name, **step}


def quantised_copy(verifier: ModelHandle, spec: str) -> torch.nn.Module:
    """A `copy:` draft: a deep copy of the verifier with the spec's method applied (the verifier is not changed).
    Of the verifier's own shape, such a draft reads its keys and values in exact mode (decode/speculative.Chain)."""
    from budgetlm.methods.base import StepContext, apply_steps

    handle = copy.deepcopy(verifier)
    apply_steps(handle, [copy_step(spec)], StepContext())
    return handle.model.eval()


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
        elif s.startswith(COPY):
            copy_step(s)
    return specs


def load_drafts(verifier: ModelHandle, specs: list[str], load) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) per draft spec, cheapest first as given; `load(spec)` loads a model by budgetlm's rules."""
    out = []
    for spec in specs:
        if spec.startswith(LAYERS):
            out.append((spec, first_layers(verifier.model, int(spec[len(LAYERS) :]), spec)))
            continue
        if spec.startswith(COPY):
            out.append((spec, quantised_copy(verifier, spec)))
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

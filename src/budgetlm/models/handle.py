"""ModelHandle: the module, its tokenizer, where it came from and every step applied to it.

A handle saves to a folder (model.safetensors + config.json + tokenizer + provenance.json +
budgetlm.json) and loads back without unpickling anything. Modules that a method replaced (a packed
quantised Linear, say) are listed in budgetlm.json with the registered layer kind that rebuilds them.
Every load checks the loaded tensors for NaN and infinity (`check_finite`), so a corrupt file is refused
with the tensor's name instead of being scored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from budgetlm.errors import ModelError
from budgetlm.registry import Registry
from budgetlm.utils import atomic_dir

MANIFEST = "budgetlm.json"
PROVENANCE = "provenance.json"
WEIGHTS = "model.safetensors"

# kind -> callable(linear: nn.Linear-shaped placeholder, meta: dict) -> nn.Module with the same state keys
layer_kinds: Registry[Any] = Registry("layer kind")
# lazy entries: a saved folder names the kind, the registry imports its builder on first use
layer_kinds.add("quant_linear", "budgetlm.methods.quant.layers:rebuild")
layer_kinds.add("quant_embedding", "budgetlm.methods.quant.embedding:rebuild")
layer_kinds.add("nf4_linear", "budgetlm.methods.quant.nf4:rebuild")
layer_kinds.add("sparse_linear", "budgetlm.methods.prune.sparse:rebuild")

# kind -> callable(model, meta): re-creates a whole-model part (an adapter: its wrapped layers and any state shared
# between them) on a freshly built model before its tensors load. A model lists its parts, {kind: meta} (JSON), in
# the attribute `budgetlm_parts`; layer kinds are rebuilt after the parts (they may sit inside an adapter).
model_parts: Registry[Any] = Registry("model part")
model_parts.add("adapter", "budgetlm.methods.adapt.base:reattach")
model_parts.add("peft_adapter", "budgetlm.methods.adapt.peft_adapters:reattach")


@dataclass
class ModelHandle:
    model: torch.nn.Module
    tokenizer: Any
    source: str
    provenance: list[dict] = field(default_factory=list)
    base: str | None = None  # the source of the unmodified model this one derives from

    @property
    def is_instruct(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def base_id(self) -> str:
        return self.base or self.source

    def replaced_modules(self) -> dict[str, dict]:
        out = {}
        for name, mod in self.model.named_modules():
            kind = getattr(mod, "layer_kind", None)
            if kind:
                out[name] = {"kind": kind, **mod.layer_meta()}
        return out

    def save(self, path: str | os.PathLike, aside: bool = False) -> Path:
        """Write the folder atomically (to a temporary sibling, then rename). A budgetlm model folder already at
        `path` is replaced; anything else there is moved aside with `aside` and refused otherwise (see
        utils.atomic_dir)."""
        from safetensors.torch import save_model

        path = Path(path)
        with atomic_dir(path, marker=MANIFEST, aside=aside) as tmp:
            self.model.config.save_pretrained(tmp)
            gen = getattr(self.model, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            save_model(self.model, str(tmp / WEIGHTS), metadata={"format": "pt"})
            manifest = {"source": self.source, "base": self.base_id, "modules": self.replaced_modules()}
            manifest["parts"] = dict(getattr(self.model, "budgetlm_parts", None) or {})
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            (tmp / PROVENANCE).write_text(json.dumps(self.provenance, indent=2))
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
        return path


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def is_budgetlm_folder(path: Path) -> bool:
    return (path / MANIFEST).is_file() and (path / WEIGHTS).is_file()


def load_folder(path: Path) -> ModelHandle:
    """Load a folder written by ModelHandle.save: build from config, rebuild replaced modules, load tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        provenance = json.loads((path / PROVENANCE).read_text(encoding="utf-8")) if (path / PROVENANCE).exists() else []
        if not isinstance(manifest, dict) or not isinstance(provenance, list):
            raise ValueError(f"{MANIFEST} is not a mapping or {PROVENANCE} not a list")
        config = AutoConfig.from_pretrained(path)
        with no_init_weights():  # every weight comes from the file: random initialisation was 3 of SmolLM2's 10 s
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()  # before loading: the file holds the shared matrix once (skipped init did not tie)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:  # JSONDecodeError is a ValueError
        raise ModelError(
            f"budgetlm model folder {path} is damaged: {first_line(exc)}; re-create it with `budgetlm compress`"
        ) from None
    for kind, meta in manifest.get("parts", {}).items():
        model_parts.get(kind)(model, meta)
    rebuilt = []
    for name, meta in manifest.get("modules", {}).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        meta = dict(meta)
        build = layer_kinds.get(meta.pop("kind"))
        new = build(old, meta)
        if not any(p.requires_grad for p in old.parameters()):  # frozen by a part (the base under an adapter)
            new.requires_grad_(False)
        setattr(parent, child, new)
        rebuilt.append(new)
    try:
        for new in rebuilt:  # modules that read another's tensors (a tied QuantEmbedding: its lm_head's codes)
            if callable(getattr(new, "bind", None)):
                new.bind(model)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"budgetlm model folder {path} is damaged: {first_line(exc)}") from None
    try:
        missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
    except (SafetensorError, RuntimeError, OSError) as exc:  # a damaged file, or tensors the config does not fit
        raise ModelError(
            f"budgetlm model folder {path}: cannot load {WEIGHTS}: {first_line(exc)}; re-create it with "
            "`budgetlm compress`"
        ) from None
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ModelError(
            f"model folder {path} does not match its config (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); re-save it with `budgetlm compress`"
        )
    if getattr(config, "tie_word_embeddings", False) and isinstance(
        getattr(model.get_input_embeddings(), "weight", None), torch.nn.Parameter
    ):  # a quantised tied matrix is already shared (QuantEmbedding.tied_to) and has no float weight to tie
        model.tie_weights()
    model.eval()
    check_finite(model, f"model folder {path} ({WEIGHTS})")
    tok = AutoTokenizer.from_pretrained(path)
    return ModelHandle(model, tok, manifest.get("source", str(path)), provenance, manifest.get("base"))


@torch.no_grad()
def check_finite(model: torch.nn.Module, where: str) -> None:
    """ModelError naming the first floating-point tensor of the model's state that holds NaN or infinity:
    weights, biases, norms, the scales and zeros of packed quantised layers, adapter matrices, buffers; shared
    tensors once. One pass: a tensor's sum is finite exactly when all its values are, unless the sum overflows,
    and only then (or to count the bad values) is the tensor looked at element by element."""
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        if not t.is_floating_point() or t.numel() == 0 or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()):
            continue
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise ModelError(
            f"{where}: tensor '{name}' holds {nan} NaN and {inf} infinite values (of {t.numel():,}); the file is "
            "corrupt or a method wrote broken weights: re-create it from the original model"
        )

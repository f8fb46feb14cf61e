"""QuantEmbedding: an input embedding table stored as packed integer codes plus fp16 scales (and zeros), and the
helpers the integer-grid quantisers (rtn, gptq, awq, lobi) share when their `embeddings` option is on.

Storage is QuantLinear's format for the same grid (the vocabulary matrix [vocab, hidden] read as a Linear's
[out, in] weight): `qweight` (codes packed 8 per b bytes in row-major order, or int8 [vocab, hidden] holding
code − 128 for 8-bit symmetric per-channel grids), `scales` fp16 [vocab, groups], `zeros` uint8 [vocab, groups]
for asymmetric grids, optionally `perm` (GPTQ act-order) and a fp16 low-rank correction `lr_u` [vocab, r] /
`lr_v` [r, hidden] (lobi). The buffers are shaped by building a QuantLinear of that grid on the meta device, so
the two formats cannot drift apart unnoticed (a layout this gather cannot read is an error, never a silent
misreading). The forward pass gathers only the rows of the requested ids — the packed bytes of those rows
(a row is byte-aligned: hidden·bits is a multiple of 8, checked by `check_embedding_grid`) — unpacks and
dequantises them; the whole matrix is never dequantised per call. Gemma 3's scaled embedding (x·√hidden) keeps
its factor (`scale`).

Tied weights (`config.tie_word_embeddings`, SmolLM2, Gemma 3): the matrix is quantised once, as the lm_head's
QuantLinear, and the QuantEmbedding holds no tensors of its own: `tied_to` names the QuantLinear whose tensors it
reads (bound after a load by `bind`, which models/handle.py calls for every rebuilt module that has it). The
state dict, the saved file and hardware.size therefore hold and count the codes once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from budgetlm.errors import ConfigError
from budgetlm.methods.quant.layers import QuantLinear, packed_row_codes
from budgetlm.methods.quant.quantizer import Grid, dequantize, find_grid, quantize


class QuantEmbedding(nn.Module):
    layer_kind = "quant_embedding"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        group_size: int,
        symmetric: bool,
        rank: int = 0,
        scale: float | None = None,
        tied_to: str | None = None,
        permuted: bool = False,
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        # the matrix as a Linear weight [out, in] (what hardware.size, the GGUF export and QuantLinear read)
        self.out_features, self.in_features = num_embeddings, embedding_dim
        self.bits, self.group_size, self.symmetric, self.rank = bits, group_size, symmetric, rank
        self.permuted = permuted
        self.scale = scale
        self.tied_to = tied_to
        self.__dict__["_owner"] = None  # the QuantLinear a tied embedding reads (not a submodule: stored once)
        if tied_to is None:
            with torch.device("meta"):
                ref = QuantLinear(embedding_dim, num_embeddings, bits, group_size, symmetric, False, permuted, rank)
            for name, t in ref._buffers.items():
                self.register_buffer(name, None if t is None else torch.zeros(t.shape, dtype=t.dtype))

    # --- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        grid: Grid,
        scale: float | None = None,
        correction: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> QuantEmbedding:
        """A table owning `codes` [vocab, hidden] on `grid` (stored exactly as QuantLinear.from_codes stores them)."""
        src = QuantLinear.from_codes(codes, grid, None, correction=correction)
        vocab, dim = codes.shape
        emb = cls(vocab, dim, grid.bits, grid.group_size, grid.zeros is None, src.rank, scale)
        for name in emb._buffers:
            t = getattr(src, name)
            if t is not None:
                emb._buffers[name] = t
        return emb

    @classmethod
    def sharing(cls, head: QuantLinear, head_name: str, scale: float | None = None) -> QuantEmbedding:
        """A table reading the codes of the (tied) lm_head `head`, registered in the model as `head_name`."""
        emb = cls(
            head.out_features,
            head.in_features,
            head.bits,
            head.group_size,
            head.symmetric,
            head.rank,
            scale,
            tied_to=head_name,
            permuted=head.perm is not None,
        )
        emb.__dict__["_owner"] = head
        return emb

    def bind(self, model: nn.Module) -> None:
        """After a load: find the module this tied table reads (`tied_to`) and check that it matches."""
        if self.tied_to is None:
            return
        owner = model.get_submodule(self.tied_to)
        shape = (getattr(owner, "out_features", None), getattr(owner, "in_features", None))
        if getattr(owner, "layer_kind", None) != "quant_linear" or shape != (self.num_embeddings, self.embedding_dim):
            raise ConfigError(
                f"the quantised embedding is tied to '{self.tied_to}', which is not a {self.num_embeddings}x"
                f"{self.embedding_dim} QuantLinear; re-create the model with `budgetlm compress`"
            )
        self.__dict__["_owner"] = owner

    def store(self) -> nn.Module:
        """The module holding the codes: this one, or the lm_head it is tied to."""
        if self.tied_to is None:
            return self
        if self._owner is None:
            raise RuntimeError(f"QuantEmbedding tied to '{self.tied_to}' is not bound (call bind(model))")
        return self._owner

    # --- reading ---------------------------------------------------------------------------------------------

    def row_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Codes uint8 [n, hidden] of the rows `ids` (1-D), unpacked from those rows' bytes only (a tied table reads
        them through its lm_head, whatever layout the lm_head holds them in)."""
        s = self.store()
        if s is not self:
            return s.row_codes(ids)
        return packed_row_codes(self.qweight, ids, self.num_embeddings, self.embedding_dim, self.bits)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantised rows (float32 [n, hidden]) of `ids`, low-rank correction included, embed scale excluded."""
        s = self.store()
        codes = self.row_codes(ids)
        zeros = None if s.zeros is None else s.zeros[ids].float()
        out = dequantize(codes, Grid(s.scales[ids].float(), zeros, self.bits, self.group_size))
        perm = getattr(s, "perm", None)
        if perm is not None:  # codes of W[:, perm]: back to the natural column order
            out = out[:, torch.argsort(perm.long())]
        if self.rank:
            out = out + s.lr_u[ids].float() @ s.lr_v.float()
        return out

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.rows(input_ids.reshape(-1)).reshape(*input_ids.shape, self.embedding_dim)
        if self.scale is not None:
            out = out * torch.tensor(self.scale, dtype=out.dtype)
        return out

    def grid(self) -> Grid:
        s = self.store()
        return Grid(s.scales.float(), None if s.zeros is None else s.zeros.float(), self.bits, self.group_size)

    def codes(self) -> torch.Tensor:
        """All codes uint8 [vocab, hidden] (in the stored column order, as QuantLinear.codes)."""
        return self.row_codes(torch.arange(self.num_embeddings))

    def dequantized_weight(self) -> torch.Tensor:
        w = dequantize(self.codes(), self.grid())
        perm = getattr(self.store(), "perm", None)
        if perm is not None:
            w = w[:, torch.argsort(perm.long())]
        return w

    def effective_weight(self) -> torch.Tensor:
        """The table the layer looks rows up in: Q(W) plus the correction (the embed scale not applied)."""
        return self.rows(torch.arange(self.num_embeddings))

    def storage_bytes(self) -> int:
        """Bytes of the stored matrix (the tied lm_head's when tied: the same bytes, to be counted once)."""
        s = self.store()
        if s is not self:
            return int(s.storage_bytes())
        return sum(t.numel() * t.element_size() for t in self._buffers.values() if t is not None)

    def memory_bytes(self) -> int:
        """Bytes a decode step reads of the table: one row's share; a tied table is read whole as the lm_head,
        counted there (hardware.size adds memory_bytes() - storage_bytes(): nothing for a tied table)."""
        if self.tied_to is not None:
            return self.storage_bytes()
        return -(-self.storage_bytes() // self.num_embeddings)

    def layer_meta(self) -> dict:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "rank": self.rank,
            "scale": self.scale,
            "tied_to": self.tied_to,
            "permuted": self.permuted,
        }

    def extra_repr(self) -> str:
        tied = f", tied to {self.tied_to}" if self.tied_to else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group={self.group_size}{tied}"


def rebuild(_old: nn.Module, meta: dict) -> QuantEmbedding:
    """An empty QuantEmbedding of the saved shape and grid (its tensors are loaded next; a tied one is bound to its
    lm_head by models/handle.py once every module is rebuilt)."""
    return QuantEmbedding(
        meta["num_embeddings"],
        meta["embedding_dim"],
        meta["bits"],
        meta["group_size"],
        meta["symmetric"],
        meta.get("rank", 0),
        meta.get("scale"),
        meta.get("tied_to"),
        meta.get("permuted", False),
    )


# ---------------------------------------------------------------------------------------------------------------
# the embedding / lm_head as a quantisation target


@dataclass
class Embeddings:
    """The input embedding table and the output head of a model, and whether they are one tied matrix."""

    emb_name: str
    emb: nn.Embedding
    head_name: str | None
    head: nn.Linear | None
    tied: bool

    @property
    def hidden(self) -> int:
        return int(self.emb.weight.shape[1])

    @property
    def vocab(self) -> int:
        return int(self.emb.weight.shape[0])

    def matrices(self) -> list[tuple[str, str]]:
        """(module name, role) of each matrix to quantise: 'tied' (one matrix, both roles), 'head', 'embedding'."""
        if self.tied:
            return [(self.head_name, "tied")]
        out = [(self.head_name, "head")] if self.head is not None else []
        return out + [(self.emb_name, "embedding")]

    def n_weights(self) -> int:
        return sum(self.vocab * self.hidden for _ in self.matrices())


def find_embeddings(model: nn.Module, method: str) -> Embeddings:
    """The model's float input embedding and output head; a one-line ConfigError when there is no float table to
    quantise (none, or one a previous step already replaced)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        what = "no input embedding" if emb is None else f"a {type(emb).__name__} input embedding"
        raise ConfigError(
            f"method '{method}': embeddings: true needs a float nn.Embedding input table, but the model has {what}; "
            "set embeddings: false"
        )
    names = {id(m): n for n, m in model.named_modules()}
    if head is not None and not isinstance(head, nn.Linear):
        raise ConfigError(
            f"method '{method}': embeddings: true needs a float nn.Linear lm_head, but the model's is a "
            f"{type(head).__name__}; set embeddings: false"
        )
    tied = head is not None and head.weight is emb.weight
    return Embeddings(names[id(emb)], emb, names.get(id(head)), head, tied)


def check_embedding_grid(model: nn.Module, method: str, bits: list[int], groups: list[int | None], rank: int = 0):
    """The grids of the embedding matrices must fit: groups dividing the hidden size, rows byte-aligned."""
    from budgetlm.methods.quant.rtn import check_group

    e = find_embeddings(model, method)
    for g in groups:
        check_group(f"the embedding ({e.emb_name})", e.hidden, g)
    for b in bits:
        if (e.hidden * b) % 8:
            raise ConfigError(
                f"method '{method}': a {b}-bit embedding table needs hidden size x {b} divisible by 8 (rows packed "
                f"byte-aligned), the model's hidden size is {e.hidden}; set embeddings: false"
            )
    if rank > min(e.hidden, e.vocab):
        raise ConfigError(f"method '{method}': rank {rank} exceeds the embedding's hidden size {e.hidden}")
    return e


def embed_scale(emb: nn.Module) -> float | None:
    """The factor a scaled embedding (Gemma 3's x·√hidden) multiplies its rows by, or None."""
    s = getattr(emb, "scalar_embed_scale", None)
    if s is None and isinstance(getattr(emb, "embed_scale", None), torch.Tensor):
        s = float(emb.embed_scale)
    return None if s is None or float(s) == 1.0 else float(s)


def rtn_embedding(emb: nn.Embedding, bits: int, group_size: int | None, symmetric: bool) -> QuantEmbedding:
    """Round-to-nearest of the rows of an (untied) input table: as an input it has no input activations whose
    statistics could weigh its columns, and each row is used as it is, so each row's own rounding error is what
    matters — which round-to-nearest on the row's grid minimises."""
    w = emb.weight.detach().float()
    grid = find_grid(w, bits, group_size, symmetric)
    return QuantEmbedding.from_codes(quantize(w, grid), grid, embed_scale(emb))


UNTIED_TABLE_NOTE = "the input embedding by round-to-nearest (a lookup table has no input activations)"


def quantise_untied_table(model: nn.Module, e: Embeddings, cfg, stats: dict) -> bool:
    """An untied input table by round-to-nearest on cfg's grid, put in place with its stats row (every method: a
    lookup table has no input activations to weigh its columns); False when the table is tied (the lm_head's)."""
    from budgetlm.methods.base import set_module

    if e.tied:
        return False
    table = rtn_embedding(e.emb, cfg.bits, cfg.group_size, cfg.symmetric)
    set_module(model, e.emb_name, table)
    stats[e.emb_name] = stats_row(table, "embedding", quantizer="rtn")
    return True


def install_head(model: nn.Module, e: Embeddings, head: QuantLinear) -> QuantEmbedding | None:
    """Put the quantised lm_head in place; when tied, the input table becomes a QuantEmbedding reading its codes
    (returned)."""
    from budgetlm.methods.base import set_module

    set_module(model, e.head_name, head)
    if not e.tied:
        return None
    table = QuantEmbedding.sharing(head, e.head_name, embed_scale(e.emb))
    set_module(model, e.emb_name, table)
    return table


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm between the last decoder layer and the lm_head (`norm` beside the decoder layers), or None."""
    from budgetlm.methods.calibration import decoder_layers

    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            parent = model.get_submodule(name.rpartition(".")[0])
            norm = getattr(parent, "norm", None)
            return norm if isinstance(norm, nn.Module) else None
    return None


@torch.no_grad()
def head_inputs(model: nn.Module, hidden: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """The lm_head's inputs (the final norm of the last decoder layer's outputs `hidden`), or None without a final
    norm."""
    norm = final_norm(model)
    if norm is None:
        return None
    return [norm(h) for h in hidden]


def stats_row(layer: nn.Module, role: str, **extra) -> dict:
    return {
        "role": role,
        "bits_per_weight": layer.storage_bytes() * 8 / (layer.in_features * layer.out_features),
        **extra,
    }

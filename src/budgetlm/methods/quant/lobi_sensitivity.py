"""What a candidate grid costs the model, for Lo-Bi's sensitivity pass and its final quantisation: a weight
quantised on one candidate grid (rtn, or GPTQ with its Hessian) with the optional low-rank correction of the error
(the truncated SVD lobi_lora also initialises from), and the three measures of its damage: the Hessian-weighted
output error, the diagonal-Fisher estimate of the KL (from fisher_diagonals: one forward/backward pass for every
Linear at once) and the KL measured by forwards that start at the changed Linear's layer (KLProbe). lobi.py's
docstring says when each is used and why the Fisher estimate is the default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from budgetlm.methods.calibration import LayerwiseCalibration, decoder_layers
from budgetlm.methods.quant.layers import QuantLinear
from budgetlm.methods.quant.quantizer import Grid, dequantize, find_grid, quantize

if TYPE_CHECKING:
    from budgetlm.methods.quant.lobi import LoBi


def stored_grid(grid: Grid) -> Grid:
    """The grid as QuantLinear stores it (fp16 scales, integer zeros)."""
    return Grid(grid.scales.to(torch.float16).float(), grid.zeros, grid.bits, grid.group_size)


def truncated_svd(err: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, Σ_r, V_rᵀ) in fp32 of the rank-r truncated SVD of `err`: U_r Σ_r V_rᵀ is its best rank-r
    approximation (Eckart–Young). Shared by the stored correction (`low_rank`) and lobi_lora's adapter init."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK's SVD gains little from a 2nd thread and stalls badly on shared cores
    try:
        u, s, vh = torch.linalg.svd(err.float(), full_matrices=False)
    finally:
        torch.set_num_threads(threads)
    return u[:, :rank], s[:rank], vh[:rank]


def low_rank(err: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r Σ_r, V_rᵀ) of the truncated SVD of `err`, rounded to fp16 as stored."""
    u, s, vh = truncated_svd(err, rank)
    return (u * s).to(torch.float16), vh.to(torch.float16)


class Quantised:
    """One Linear quantised at one width: codes/grid/perm to store, the correction, and the weight it computes."""

    def __init__(self, w, option: tuple[int, int | None], cfg: LoBi, H: torch.Tensor | None, gptq_layer=None):
        w = w.detach().float()
        bits, group = option
        if cfg.quantizer == "gptq" and H is not None:  # (an input table has no Hessian: rtn)
            codes, grid, perm, _ = gptq_layer(
                w.clone(), H.clone(), bits, group, cfg.symmetric, damp=0.01, block_size=128
            )
        else:
            grid = find_grid(w, bits, group, cfg.symmetric)
            codes, perm = quantize(w, grid), None
        deq = dequantize(codes, stored_grid(grid))
        if perm is not None:
            deq = deq[:, torch.argsort(perm.long())]
        self.codes, self.grid, self.perm, self.correction = codes, grid, perm, None
        if cfg.rank:
            self.correction = low_rank(w - deq, cfg.rank)
            deq = deq + self.correction[0].float() @ self.correction[1].float()
        self.weight = deq
        self.err = w - deq

    def output_error(self, H: torch.Tensor) -> float:
        """tr(ΔW H ΔWᵀ)."""
        return float(((self.err @ H) * self.err).sum(dtype=torch.float64))

    def fisher_kl(self, H: torch.Tensor, fisher: torch.Tensor) -> float:
        """¼ Σ_i F_i (ΔW H ΔWᵀ)_ii: the diagonal-Fisher estimate of the KL (nats/token) this error causes."""
        rows = ((self.err @ H) * self.err).sum(1, dtype=torch.float64)
        return 0.25 * float(rows @ fisher.double())

    def layer(self, bias) -> QuantLinear:
        return QuantLinear.from_codes(self.codes, self.grid, bias, perm=self.perm, correction=self.correction)


class KLProbe:
    """KL(p_float ‖ p_changed) of the next-token distribution on a few calibration sequences, starting each
    forward at the changed Linear's decoder layer from cached float hidden states."""

    def __init__(self, model, tokens: torch.Tensor):
        self.model = model
        self.tokens = tokens
        self.cal = LayerwiseCalibration(model, tokens, method="lobi")
        self.inputs = []
        for _i, layer in self.cal.layers():
            self.inputs.append(self.cal.inputs)
            self.cal.advance(layer)
        self.n_tokens = tokens.numel()
        self.ref = [F.log_softmax(model(input_ids=b, use_cache=False).logits.float(), -1) for b in self.cal.batches]
        self.norm, self.cap = self._head()
        self.fast = False
        if self.norm is not None:
            got = [F.log_softmax(x, -1) for x in self._logits(0)]
            self.fast = all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(got, self.ref, strict=True))

    def _head(self):
        layers = decoder_layers(self.model)
        for name, mod in self.model.named_modules():
            if mod is layers:
                parent = self.model.get_submodule(name.rpartition(".")[0])
                norm = getattr(parent, "norm", None)
                if norm is not None and self.model.get_output_embeddings() is not None:
                    return norm, getattr(self.model.config, "final_logit_softcapping", None)
        return None, None

    def _logits(self, index: int) -> list[torch.Tensor]:
        blocks = self.cal.blocks
        out = []
        for h in self.inputs[index]:
            for j in range(index, len(blocks)):
                h = blocks[j](h, **self.cal.kwargs(j, h.shape[0]))
                h = h[0] if isinstance(h, tuple) else h
            logits = self.model.get_output_embeddings()(self.norm(h)).float()
            if self.cap:
                logits = torch.tanh(logits / self.cap) * self.cap
            out.append(logits)
        return out

    @torch.no_grad()
    def kl(self, index: int | None) -> float:
        """The KL with the model as it is now; `index`: the changed Linear's decoder layer (None: the embedding
        or lm_head changed, a full forward)."""
        if self.fast and index is not None:
            logits = self._logits(index)
        else:
            logits = [self.model(input_ids=b, use_cache=False).logits.float() for b in self.cal.batches]
        total = 0.0
        for lq, lp in zip(logits, self.ref, strict=True):
            total += float(F.kl_div(F.log_softmax(lq, -1), lp, log_target=True, reduction="sum"))
        return total / self.n_tokens


def fisher_diagonals(
    model, tokens: torch.Tensor, names: list[str], seed: int = 0, embedding: bool = False
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Per named Linear, the mean over tokens of g_ti², g = ∂ Σ_t log p(ŷ_t) / ∂(Linear output)_t, ŷ_t sampled
    from the model's own next-token distribution: the diagonal of the Fisher information with respect to that
    Linear's output channels (sum over positions, per token). One sequence per forward/backward; no parameter
    gradients are computed (only activation gradients, from the embedding output on).

    With `embedding`, also (ids, F_rows): the token ids seen and, per id and hidden channel, the sum over that
    id's positions of the squared gradient at the embedding output, over all tokens (F_rows [ids, hidden]): the
    diagonal Fisher of the table's rows, each weighted by how often its token occurs."""
    mods = dict(model.named_modules())
    acc = {n: torch.zeros(mods[n].out_features, dtype=torch.float64) for n in names}
    gen = torch.Generator().manual_seed(seed)
    hooks = []

    def on_output(name):
        def record(g: torch.Tensor) -> None:  # returns None: the gradient flows on unchanged
            acc[name].add_(g.detach().double().pow(2).flatten(0, -2).sum(0))

        def hook(_m, _args, out):
            if out.requires_grad:
                out.register_hook(record)

        return hook

    ids_seen, emb_acc, where = None, None, {}
    if embedding:
        ids_seen, inverse = torch.unique(tokens, return_inverse=True)
        emb_acc = torch.zeros(len(ids_seen), model.get_input_embeddings().embedding_dim, dtype=torch.float64)

    def record_rows(g: torch.Tensor) -> None:
        emb_acc.index_add_(0, where["rows"], g.detach().double().reshape(-1, g.shape[-1]).pow(2))

    def grad_from_here(_m, _args, out):
        out = out.detach().requires_grad_(True)
        if emb_acc is not None:
            out.register_hook(record_rows)
        return out

    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        model.requires_grad_(False)
        model.eval()
        hooks.append(model.get_input_embeddings().register_forward_hook(grad_from_here))
        hooks += [mods[n].register_forward_hook(on_output(n)) for n in names]
        with torch.enable_grad():
            for k, seq in enumerate(tokens):
                if embedding:
                    where["rows"] = inverse[k]
                logits = model(input_ids=seq[None], use_cache=False).logits[0].float()
                logp = F.log_softmax(logits, -1)
                y = torch.multinomial(logp.detach().exp(), 1, generator=gen)
                logp.gather(-1, y).sum().backward()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    n_tokens = tokens.numel()
    out = {n: (a / n_tokens).float() for n, a in acc.items()}
    if embedding:
        return out, (ids_seen, (emb_acc / n_tokens).float())
    return out

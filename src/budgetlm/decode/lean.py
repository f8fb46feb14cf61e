"""budgetlm's decode runtime: a lean forward for Llama-architecture models and the fallback to transformers'.

A decode step of a small model on a CPU is dominated by per-call overhead, not by arithmetic: transformers' Llama
forward spends ~15-20 ms per token of SmolLM2-135M (1 thread) outside its matrix products (mask and cache
bookkeeping, the key/value cache grown by concatenation at every step, modules called through hooks), as much as
the 4-bit products themselves. `LeanLlama` computes the same function with few operations per layer:
- the same modules' weights, called directly: each projection is the model's own module (a QuantLinear keeps its
  kernels, a Linear its weight), the rotary embedding is the model's own (so every rope scaling it knows is kept);
  the norms through `F.rms_norm` with the module's weight and epsilon; attention through one
  `scaled_dot_product_attention` call with grouped key/value heads (no repeated copies);
- `StaticKV`: every layer's keys and values in preallocated buffers written in place (capacity doubling when a
  sequence outgrows it); a rollback (`crop`) only moves the length;
- a float32 Linear for a few tokens multiplies as W x^T (`small_m_linear`): torch's x W^T path for 2-8 rows is ~1.5x
  slower than one row on the CPUs measured, W x^T stays near one row's cost; which rows count as few is measured on
  the host once per process (`small_m_rows`), never assumed.
Its logits equal transformers' forward to float32 rounding (tests/unit/test_lean.py compares both on random and
quantised models, prompts and continuations, with rollbacks). `LeanGemma3` does the same for Gemma 3. Models of any
other architecture, or with modules it does not know, run through transformers' forward with a DynamicCache
(`HFRuntime`): same interface. `runtime_for(model)` picks; BUDGETLM_LEAN=0 forces transformers' path everywhere.
Where every module of a Llama or Gemma 3 is one its C step knows, runtime_for returns LeanStepLlama or
LeanStepGemma3 (decode/lean_step.py): calls of up to 256 tokens (fewer for larger models) as one C call.
"""

from __future__ import annotations

import operator
import os
import statistics
import time
from functools import lru_cache

import torch
import torch.nn.functional as F


class StaticKV:
    """Keys and values of every layer, [1, kv_heads, capacity, head_dim] each, valid up to `length`."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, capacity: int = 256):
        self.shape = (1, kv_heads, capacity, head_dim)
        self.keys = [torch.empty(self.shape, dtype=dtype) for _ in range(layers)]
        self.values = [torch.empty(self.shape, dtype=dtype) for _ in range(layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    # positions of room beyond what a growing cache was asked for: a prompt's prefill reserves its own length, and
    # without room the first decoded token would regrow the cache at once (every layer's keys and values copied to
    # fresh pages: ~75 MB and tens of ms for SmolLM2 at 1,600 tokens, per model and prompt). Untouched room costs
    # address space only: torch.empty commits no pages until they are written.
    HEADROOM = 512

    def reserve(self, total: int) -> None:
        """Room for `total` positions (buffers grown, at least doubled, and the valid part copied when needed)."""
        if total <= self.capacity:
            return
        cap = max(total + self.HEADROOM, 2 * self.capacity)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_empty(old.shape[0], old.shape[1], cap, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                buffers[i] = new

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [1, kv_heads, M, head_dim] at positions start..start+M; the layer's keys and values to there."""
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, n: int) -> None:
        """DynamicCache's convention: n < 0 drops the last -n positions, n >= 0 keeps the first n."""
        self.length = max(0, self.length + n) if n < 0 else min(self.length, n)

    def copy_from(self, other: StaticKV, layers: int, start: int, end: int) -> None:
        """Positions start..end of the first `layers` layers from another cache (a draft of a model's first layers)."""
        self.reserve(end)
        for i in range(layers):
            self.keys[i][:, :, start:end] = other.keys[i][:, :, start:end]
            self.values[i][:, :, start:end] = other.values[i][:, :, start:end]
        self.length = end


# -- a float32 Linear for a few rows ---------------------------------------------------------------------------
SMALL_M_PROBE = (2, 3, 4, 6, 8, 12, 16)


@lru_cache(maxsize=8)
def _small_m_rows(threads: int) -> int:
    """Largest row count up to which W x^T beat x W^T on every probed count (0: never) on a 1536 x 576 layer's
    copies that exceed the last-level cache, interleaved passes, medians."""
    n, k = 1536, 576
    copies = max(2, (48 << 20) // (n * k * 4))
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=gen) for _ in range(copies)]
    best = 0
    for m in SMALL_M_PROBE:
        x = torch.randn(m, k, generator=gen)
        times: dict[str, list[float]] = {"xw": [], "wx": []}
        for rnd in range(4):
            for name in times:
                t0 = time.perf_counter()
                for w in ws:
                    if name == "xw":
                        F.linear(x, w)
                    else:
                        torch.mm(w, x.t())
                if rnd:
                    times[name].append(time.perf_counter() - t0)
        if statistics.median(times["wx"]) >= 0.95 * statistics.median(times["xw"]):
            break
        best = m
    return best


def small_m_rows() -> int:
    """Row counts up to this take W x^T for a float32 Linear (measured once per process and thread count)."""
    return _small_m_rows(torch.get_num_threads())


def small_m_linear(module: torch.nn.Linear, x: torch.Tensor, rows: int) -> torch.Tensor:
    """module(x) for x [..., K]; W x^T where x has 2..rows rows."""
    m = x.numel() // x.shape[-1]
    if m < 2 or m > rows or module.weight.dtype != x.dtype:
        return F.linear(x, module.weight, module.bias)
    y = torch.mm(module.weight, x.reshape(m, -1).t()).t()
    if module.bias is not None:
        y = y + module.bias
    return y.reshape(*x.shape[:-1], -1)


# -- the runtimes ----------------------------------------------------------------------------------------------
class HFRuntime:
    """transformers' forward with a DynamicCache (every architecture)."""

    lean = False
    label = "transformers"

    def __init__(self, model: torch.nn.Module):
        import inspect

        self.model = model
        self.keeps = "logits_to_keep" in inspect.signature(model.forward).parameters

    def new_cache(self):
        from transformers import DynamicCache

        # no config: every layer keeps all its keys and values, sliding-window layers too (their masks still come
        # from the model's config), so a rollback to any earlier position is a slice (transformers' sliding layers
        # trim to the window at each crop, after which a deeper rollback is impossible)
        return DynamicCache()

    def __call__(self, ids: torch.Tensor, start: int, cache, keep: int) -> torch.Tensor:
        pos = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
        kw = {"logits_to_keep": keep} if self.keeps else {}
        out = self.model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True, **kw)
        return out.logits if self.keeps or not keep else out.logits[:, -keep:]

    @staticmethod
    def copy_layers(dst, src, layers: int, start: int, end: int) -> None:
        for i in range(layers):
            s = src.layers[i]
            dst.update(s.keys[..., start:end, :], s.values[..., start:end, :], i)


class TorchGlue:
    """The non-matmul parts of a decoder layer in torch operations (any dtype; the reference the C glue is tested
    against, and the path where the C library is not built)."""

    @staticmethod
    def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps) * weight."""
        return F.rms_norm(x, weight.shape, weight, eps)

    def add_rms(self, h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """h += delta in place (the residual stream), then rms(h)."""
        h.add_(delta)
        return self.rms(h, weight, eps)

    @staticmethod
    def attend(q, k, v, cos, sin, cache: StaticKV, layer: int, start: int, d: int, scale: float, window: int = 0,
               sinks: int = 0):  # fmt: skip
        """Rotary on q, k [1, M, heads * d], k and v stored, causal attention over the cache (the last `window`
        positions only when window > 0, and then the first `sinks` too): [1, M, heads * d]. q may be overwritten
        (the C glue rotates it in place)."""
        m = q.shape[1]
        q = q.view(1, m, -1, d).transpose(1, 2)
        k = k.view(1, m, -1, d).transpose(1, 2)
        v = v.view(1, m, -1, d).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [1, 1, M, d]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys, values = cache.write(layer, start, k, v)
        if keys.dtype != q.dtype:  # a bfloat16 cache of a float32 model: attention in the model's dtype
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        mask, causal = None, False
        if start == 0 and m > 1 and not (window and m > window):
            causal = True  # a prompt from position 0: the kernel's own causal path (no mask to read)
        elif m > 1 or (window and start + m > window):  # position start + i sees positions 0..start + i
            mask = torch.ones(m, start + m, dtype=torch.bool).tril(diagonal=start)
            if window:  # ... and only those less than `window` before it, and the first `sinks`
                sunk = mask[:, :sinks].clone()
                mask &= ~torch.ones(m, start + m, dtype=torch.bool).tril(diagonal=start - window)
                mask[:, :sinks] = sunk
        o = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
        )
        return o.transpose(1, 2).reshape(1, m, -1)

    @staticmethod
    def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up


C_ATTENTION_ROWS = 16  # new tokens up to which the C attention runs (a decode step, a speculative verification)


class CGlue(TorchGlue):
    """The same parts in budgetlm's C (methods/quant/native/ops.c), float32: one call each instead of 5-15 torch
    operations."""

    def __init__(self, lib, simd: int):
        self.lib, self.simd = lib, simd

    def rms(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        d = x.shape[-1]
        self.lib.lean_rms_norm(x.data_ptr(), weight.data_ptr(), x.numel() // d, d, eps, out.data_ptr(), self.simd)
        return out

    def add_rms(self, h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        delta = delta.contiguous()
        out = torch.empty_like(h)
        d = h.shape[-1]
        self.lib.lean_add_rms_norm(h.data_ptr(), delta.data_ptr(), weight.data_ptr(), h.numel() // d, d, eps,
                                   out.data_ptr(), self.simd)  # fmt: skip
        return out

    def attend(self, q, k, v, cos, sin, cache: StaticKV, layer: int, start: int, d: int, scale: float, window: int = 0,
               sinks: int = 0):  # fmt: skip
        m = q.shape[1]
        if m > C_ATTENTION_ROWS or d > 1024:  # a prompt: torch's blocked attention does the quadratic work faster
            # (and heads over 1,024 wide: the C rotary store's row buffer)
            return super().attend(q, k, v, cos, sin, cache, layer, start, d, scale, window, sinks)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        heads, kv_heads = q.shape[-1] // d, k.shape[-1] // d
        kc, vc = cache.keys[layer], cache.values[layer]
        cap, bf = kc.shape[2], kc.dtype == torch.bfloat16  # float32 or bfloat16 caches (LeanLlama.kv_dtype)
        cos, sin = cos.contiguous(), sin.contiguous()
        self.lib.lean_rope_store_kv(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), m,
                                    heads, kv_heads, d, kc.data_ptr(), vc.data_ptr(), cap, start, bf)  # fmt: skip
        out = torch.empty_like(q)
        err = self.lib.lean_attention_kv(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), m, heads, kv_heads, d, cap,
                                         start, scale, window, sinks, out.data_ptr(), self.simd,
                                         torch.get_num_threads(), bf)  # fmt: skip
        if err:
            raise MemoryError("lean runtime: no memory for the attention scores")
        return out

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if gate.numel() > C_ATTENTION_ROWS * gate.shape[-1]:  # a prompt: torch's vectorised exp (the C loop's scalar
            return super().silu_mul(gate, up)  # expf cost 0.3 s of a 1,600-token SmolLM2 prefill at 2 threads)
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        self.lib.lean_silu_mul(gate.data_ptr(), up.data_ptr(), gate.numel(), out.data_ptr())
        return out


def glue_for(dtype: torch.dtype) -> TorchGlue:
    """C glue for float32 models where budgetlm's library is built (BUDGETLM_LEAN_C=0: torch's), else torch's."""
    from budgetlm.methods.quant import native

    off = os.environ.get("BUDGETLM_LEAN_C", "1").strip().lower() in ("0", "false", "no", "off")
    lib = None if off or dtype != torch.float32 else native.library()
    return CGlue(lib, native.simd()) if lib is not None else TorchGlue()


class LeanLlama:
    """The lean forward of a LlamaForCausalLM (module docstring)."""

    lean = True
    no_step: str | None = None  # why runtime_for did not take the one-call step (decode/lean_step.py)

    def __init__(self, model: torch.nn.Module, glue: TorchGlue | None = None):
        self.model = model
        inner = model.model
        self.embed, self.rotary, self.norm, self.head = inner.embed_tokens, inner.rotary_emb, inner.norm, model.lm_head
        self.layers = list(inner.layers)
        att = self.layers[0].self_attn
        self.head_dim = att.head_dim
        self.kv_heads = att.k_proj.out_features // self.head_dim
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.glue = glue or glue_for(self.dtype)
        small_m_rows()  # the host probe, here rather than inside the first (timed) call
        # (window, sinks): attend to the first `sinks` and the last `window` positions only (0, 0: to all). A draft's
        # sparse view of a long context (speculative.Chain, `draft_window`): cheaper steps, its guesses a little worse
        self.sparse = (0, 0)
        # the caches' dtype (None: the model's). bfloat16 for a float32 model: half the bytes a step's attention reads
        # at long contexts, keys and values rounded to 8 significant bits (a draft's, speculative.Chain `draft_kv`)
        self.kv_dtype: torch.dtype | None = None
        self.label = "lean (C glue)" if isinstance(self.glue, CGlue) else "lean (torch glue)"

    def new_cache(self) -> StaticKV:
        return StaticKV(len(self.layers), self.kv_heads, self.head_dim, self.kv_dtype or self.dtype)

    def kv_layout(self) -> tuple:
        """What another lean runtime must share for its keys and values to be copied into this one's cache as they
        are: the architecture, layer count, key/value heads, head size, dtype, and the rotary and attention window
        settings (the keys are stored rotated); CachedLM.lend also compares the lent layers' types."""
        cfg = self.model.config
        keys = ("model_type", "rope_theta", "rope_scaling", "rope_parameters", "sliding_window")
        settings = tuple(repr(getattr(cfg, k, None)) for k in keys)
        return (len(self.layers), self.kv_heads, self.head_dim, self.dtype, *settings)

    @staticmethod
    def _begin(ids: torch.Tensor, start: int, cache: StaticKV):
        """(new tokens, end position, lin(module, x)) for a call continuing `cache` at `start`."""
        m = ids.shape[1]
        if start != cache.length:
            raise RuntimeError(f"lean runtime: the cache holds {cache.length} positions, asked to continue at {start}")
        cache.reserve(start + m)
        rows = small_m_rows()

        def lin(module, x):
            return small_m_linear(module, x, rows) if type(module) is torch.nn.Linear else module(x)

        return m, start + m, lin

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, start: int, cache: StaticKV, keep: int) -> torch.Tensor:
        m, end, lin = self._begin(ids, start, cache)
        g, d = self.glue, self.head_dim

        h = self.embed(ids).contiguous()
        cos, sin = self.rotary(h, torch.arange(start, end).unsqueeze(0))
        delta = None
        for i, layer in enumerate(self.layers):
            att, mlp = layer.self_attn, layer.mlp
            n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
            eps = n1.variance_epsilon
            a = g.rms(h, n1.weight, eps) if delta is None else g.add_rms(h, delta, n1.weight, eps)
            q, k, v = lin(att.q_proj, a), lin(att.k_proj, a), lin(att.v_proj, a)
            o = g.attend(q, k, v, cos, sin, cache, i, start, d, att.scaling, *self.sparse)
            a = g.add_rms(h, lin(att.o_proj, o), n2.weight, n2.variance_epsilon)
            delta = lin(mlp.down_proj, g.silu_mul(lin(mlp.gate_proj, a), lin(mlp.up_proj, a)))
        cache.length = end
        if delta is not None:
            h.add_(delta)
        h = h[:, -keep:] if keep else h
        return lin(self.head, g.rms(h, self.norm.weight, self.norm.variance_epsilon))

    @staticmethod
    def copy_layers(dst: StaticKV, src: StaticKV, layers: int, start: int, end: int) -> None:
        dst.copy_from(src, layers, start, end)


class LeanGemma3(LeanLlama):
    """The lean forward of a Gemma3ForCausalLM: Gemma's RMSNorm (times 1 + w) before and after attention and the
    MLP, per-head norms of queries and keys, sliding-window layers with their own rotary embedding, the scaled
    embedding (the model's module), GELU (the model's activation) and the final logit soft-cap."""

    def __init__(self, model: torch.nn.Module, glue: TorchGlue | None = None):
        super().__init__(model, glue)
        cfg = model.config
        self.types = list(cfg.layer_types)[: len(self.layers)]
        self.window = int(cfg.sliding_window or 0)
        self.softcap = cfg.final_logit_softcapping
        self._norm_modules = [
            n
            for y in self.layers
            for n in (y.input_layernorm, y.post_attention_layernorm, y.pre_feedforward_layernorm,
                      y.post_feedforward_layernorm, y.self_attn.q_norm, y.self_attn.k_norm)
        ] + [self.norm]  # fmt: skip
        self._norm_dicts = [n._parameters for n in self._norm_modules]
        self._norm_sources: list = []
        self.refresh_norms()

    def refresh_norms(self) -> bool:
        """(Re)make the 1 + w copies where a norm's weight was replaced since they were made (not a weight changed in
        place); True when it did. Gemma's norm multiplies by (1 + w) in float32, as its forward does."""
        sources = [d.get("weight") for d in self._norm_dicts]
        if len(sources) == len(self._norm_sources) and all(map(operator.is_, sources, self._norm_sources)):
            return False
        copies = [((1.0 + n.weight.float()).to(self.dtype), n.eps) for n in self._norm_modules]
        self.norms = [copies[6 * i : 6 * i + 6] for i in range(len(self.layers))]
        self.final = copies[-1]
        self._norm_sources = sources
        return True

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, start: int, cache: StaticKV, keep: int) -> torch.Tensor:
        self.refresh_norms()
        m, end, lin = self._begin(ids, start, cache)
        g, d = self.glue, self.head_dim

        h = self.embed(ids).contiguous()
        pos = torch.arange(start, end).unsqueeze(0)
        rope = {t: self.rotary(h, pos, t) for t in set(self.types)}
        for i, layer in enumerate(self.layers):
            att, mlp = layer.self_attn, layer.mlp
            (w_in, e_in), (w_pa, e_pa), (w_pf, e_pf), (w_ff, e_ff), (w_q, e_q), (w_k, e_k) = self.norms[i]
            a = g.rms(h, w_in, e_in)
            q = g.rms(lin(att.q_proj, a).view(1, m, -1, d), w_q, e_q).view(1, m, -1)
            k = g.rms(lin(att.k_proj, a).view(1, m, -1, d), w_k, e_k).view(1, m, -1)
            v = lin(att.v_proj, a)
            cos, sin = rope[self.types[i]]
            window = self.window if self.types[i] == "sliding_attention" else 0
            if self.sparse[0]:  # a draft's sparse view: the narrower window, and the sinks
                window = min(window, self.sparse[0]) if window else self.sparse[0]
            o = g.attend(q, k, v, cos, sin, cache, i, start, d, att.scaling, window, self.sparse[1] if window else 0)
            h.add_(g.rms(lin(att.o_proj, o), w_pa, e_pa))
            a = g.rms(h, w_pf, e_pf)
            f = lin(mlp.down_proj, mlp.act_fn(lin(mlp.gate_proj, a)) * lin(mlp.up_proj, a))
            h.add_(g.rms(f, w_ff, e_ff))
        cache.length = end
        h = h[:, -keep:] if keep else h
        logits = lin(self.head, g.rms(h, *self.final))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def cached_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values a cache holds for a layer, [1, kv_heads, positions, head_dim] (either runtime's cache)."""
    if isinstance(cache, StaticKV):
        return cache.keys[layer][:, :, : cache.length], cache.values[layer][:, :, : cache.length]
    return cache.layers[layer].keys, cache.layers[layer].values


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def lean_reason(model: torch.nn.Module) -> str | None:
    """Why the lean forward cannot run this model (None: it can)."""
    from transformers.models.llama import modeling_llama as ml

    if os.environ.get("BUDGETLM_LEAN", "1").strip().lower() in ("0", "false", "no", "off"):
        return "BUDGETLM_LEAN=0"
    if type(model).__name__ == "Gemma3ForCausalLM":
        return _gemma3_reason(model)
    if type(model) is not ml.LlamaForCausalLM:
        return f"{type(model).__name__} is neither a LlamaForCausalLM nor a Gemma3ForCausalLM"
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act}"
    inner = model.model
    if type(inner.norm) is not ml.LlamaRMSNorm or type(inner.rotary_emb) is not ml.LlamaRotaryEmbedding:
        return "a replaced norm or rotary embedding"
    if not len(inner.layers):
        return "no layers"
    kinds = (ml.LlamaDecoderLayer, ml.LlamaAttention, ml.LlamaMLP, ml.LlamaRMSNorm)
    return _layers_reason(model, kinds, lambda y: y.post_attention_layernorm)


def _layers_reason(model: torch.nn.Module, kinds: tuple, norm_of) -> str | None:
    """Why the decoder layers are not the architecture's own (module types `kinds`: layer, attention, MLP, norm)."""
    for layer in model.model.layers:
        parts = (layer, layer.self_attn, layer.mlp, layer.input_layernorm, norm_of(layer))
        if any(type(p) is not t for p, t in zip(parts, (*kinds, kinds[-1]))):
            return "a replaced decoder module"
        if layer._forward_hooks or layer._forward_pre_hooks or layer.self_attn._forward_hooks:
            return "forward hooks"
    if model.training:
        return "a model in training mode"
    return None


def _gemma3_reason(model: torch.nn.Module) -> str | None:
    from transformers.models.gemma3 import modeling_gemma3 as mg

    cfg = model.config
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping"
    if getattr(cfg, "use_bidirectional_attention", False):
        return "bidirectional attention"
    inner = model.model
    if type(inner.norm) is not mg.Gemma3RMSNorm or type(inner.rotary_emb) is not mg.Gemma3RotaryEmbedding:
        return "a replaced norm or rotary embedding"
    if not len(inner.layers) or len(cfg.layer_types) < len(inner.layers):
        return "no layers, or layer types missing"
    if any(t not in ("sliding_attention", "full_attention") for t in cfg.layer_types):
        return "an unknown layer type"
    kinds = (mg.Gemma3DecoderLayer, mg.Gemma3Attention, mg.Gemma3MLP, mg.Gemma3RMSNorm)
    return _layers_reason(model, kinds, lambda y: y.self_attn.q_norm)


def runtime_for(model: torch.nn.Module):
    """The lean forward where it can run the model (LeanLlama or LeanGemma3, or their one-call steps LeanStepLlama,
    LeanStepGemma3 where every module is one the C step knows: decode/lean_step.py), else transformers' forward."""
    if lean_reason(model) is not None:
        return HFRuntime(model)
    from budgetlm.decode.lean_step import step_runtime

    return step_runtime(model)

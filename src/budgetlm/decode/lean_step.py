"""The lean runtime's one-call step: a Llama- or Gemma-3-architecture model's whole forward for 1..STEP_ROWS new
tokens in one C call (methods/quant/native/step.c), where LeanLlama makes ~9 and LeanGemma3 ~15 Python/ctypes calls
per layer.

At one token of SmolLM2-135M (30 layers, 1 thread) those calls cost ~8-10 ms of a 25 ms 4-bit step: ~10 us each of
ctypes, tensor allocation and torch dispatch around products that take a few. `LeanStepLlama` describes the model
to the C library once (`Descriptor`: per layer the norms' weights and epsilons and per projection its kind and
pointers, exactly the tensors its Python path computes with: a float32 Linear's weight, a QuantLinear's bound
4-bit layout and fp16 tables or int8 codes and fp16 scales, held here so they stay alive), and a step is then one
call: embedding gather, every layer (ops.c's glue, q4.c's, q4a8.c's, q4bf.c's (twice for a "q8bf" layer's halves)
and q8.c's products, step.c's float32 product for few rows), final norm, lm_head rows asked for. The rotary tables
are the model's own rotary embedding's (every rope scaling it knows), computed in Python for positions 0..n once
(per step for the dynamic types).

Gemma 3 (`LeanStepGemma3`, over LeanGemma3) adds to each layer of the descriptor its norms after attention and
after the MLP and its per-head query and key norms (LeanGemma3's 1 + w copies), its sliding window (0 for the
full-attention layers, narrowed by a draft's sparse view as on the per-layer path) and which of the two rotary
tables (local, global) it reads; the model gets GELU-tanh as its activation and the final logit soft-cap where the
config has one. The scaled embedding stays the model's module (its output is passed in), so a QuantEmbedding works
unchanged. On Gemma-3-270M (4-bit, 2 threads, benchmarks/bench_decode.py side by side) the per-layer path took
10.67 ms a token and the one-call step 6.90.

It takes the step when every module is one it knows (`step_reason`: float32 Linears without bias, QuantLinears with a
bound 4-bit or 8-bit fast path (a "q4a8" layer takes int8 activations for calls of at most kernels.ACT8_TOKENS rows
inside the step too, and "q4" above, as on its own path; a "q4bf" layer bfloat16 activations at every row count), the
architecture's norms, no hooks) and the call has at most `Descriptor.rows` tokens, fewer than every quantised layer's
crossover (from there the layers' dense path is faster, and LeanLlama takes it); other calls (a long prompt) run
LeanLlama's per-layer path on the same StaticKV. `rows` is STEP_ROWS (256) for SmolLM2-135M and smaller models, scaled
down by a token's multiply-adds for larger ones (at least 16, the step's first limit). Measured on SmolLM2-135M float32
(Zen 4, a whole forward of M new tokens, step against the per-layer path, side by side): 0.54x the time at M = 17, 0.83x
at 113, 0.84x at 128, 0.91x at 192, 0.95x at 256, 1.00x at 384, 1.33x at 1,024 (2 threads; 1 thread: 0.90x at 113, 0.97x
at 256, 0.98x at 320, 1.25x at 1,024): the per-layer path's ~270 Python/torch calls cost ~35 ms more than the one call,
the step's products ~9% more a row than torch's blocked GEMMs (the larger model's crossover scaled from this, not
measured). The descriptor is rebuilt when the kernels' state (kernels.state()) or a module's bound path changes.
BUDGETLM_LEAN_STEP=0 turns the step off.
"""

from __future__ import annotations

import ctypes
import operator
import os
import time

import torch

from budgetlm.decode.lean import CGlue, LeanGemma3, LeanLlama, StaticKV
from budgetlm.hardware.memory import release_freed_heap, rss_bytes

DENSE, Q4, Q8, Q4BF, Q8BF = 0, 1, 2, 3, 4
# new tokens up to which a call is one C call: STEP_ROWS at most, fewer for a model with more multiply-adds a token
# than SmolLM2-135M's 106M (the step's products cost ~9% more a row than torch's GEMMs there, its fixed cost ~35 ms
# less: the crossover falls as a token's work grows); never fewer than MIN_STEP_ROWS (module docstring)
STEP_ROWS = 256
STEP_ROW_MACS = 256 * 106_168_320  # STEP_ROWS at SmolLM2-135M's multiply-adds a token (its 30 layers' projections)
MIN_STEP_ROWS = 16
_ptr = ctypes.c_void_p


class _Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("block", ctypes.c_int64),
                ("group", ctypes.c_int64), ("w", _ptr), ("s", _ptr), ("z", _ptr), ("act8", ctypes.c_int64),
                ("w2", _ptr), ("s2", _ptr), ("z2", _ptr)]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = [("norm1", _ptr), ("norm2", _ptr), ("eps1", ctypes.c_double), ("eps2", ctypes.c_double)] + [
        (name, _Linear) for name in ("q", "k", "v", "o", "gate", "up", "down")
    ] + [(name, _ptr) for name in ("post_attn", "post_mlp", "qnorm", "knorm")] + [
        (name, ctypes.c_double) for name in ("eps_attn", "eps_mlp", "eps_q", "eps_k")
    ] + [("window", ctypes.c_int64), ("rope", ctypes.c_int64)]  # fmt: skip


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "inter",
                                                    "vocab")] + [
        ("scale", ctypes.c_double), ("eps", ctypes.c_double), ("embed", _ptr), ("norm", _ptr),
        ("layer", ctypes.POINTER(_Layer)), ("head", _Linear), ("window", ctypes.c_int64),
        ("sinks", ctypes.c_int64), ("act", ctypes.c_int64), ("softcap", ctypes.c_double),
        ("kv_bf16", ctypes.c_int64)]  # fmt: skip


def step_off() -> bool:
    return os.environ.get("BUDGETLM_LEAN_STEP", "1").strip().lower() in ("0", "false", "no", "off")


def _hooked(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _linear(module: torch.nn.Module):
    """(struct fields, tensors to hold, identity check, crossover) of a projection the step can run, or a reason."""
    from budgetlm.methods.quant import kernels
    from budgetlm.methods.quant.layers import QuantLinear

    if _hooked(module):
        return "forward hooks on a projection"
    if type(module) is torch.nn.Linear:
        w = module.weight
        if module.bias is not None or w.dtype != torch.float32 or not w.is_contiguous():
            return "a Linear with a bias or not float32"
        n, k = w.shape
        return (DENSE, n, k, 0, 0, w.data_ptr(), None, None, 0), (w,), (module._parameters, "weight", w), 1 << 30
    if type(module) is not QuantLinear:
        return f"a {type(module).__name__} projection"
    fast = module._fast_path()
    if fast is None:
        return f"a quantised layer on the {module.path(1)} path (not budgetlm's 4-bit or 8-bit kernel)"
    n, k, kind = module.out_features, module.in_features, module.kernel
    if kind == "q8":
        codes, scales = module.qweight, module.scales
        fields, held = (Q8, n, k, 0, 0, codes.data_ptr(), scales.data_ptr(), None, 0), (codes, scales)
    elif kind == "q8bf" and module._int4 is not None and module._q4 is not None and len(module._q4) == 4:
        hi, lo, (sh, zh, sl, zl) = module._int4[0], module._int4[2], module._q4
        ptrs = (hi.data_ptr(), sh.data_ptr(), zh.data_ptr(), 0, lo.data_ptr(), sl.data_ptr(), zl.data_ptr())
        fields = (Q8BF, n, k, kernels.block_n(), module.group_size, *ptrs)
        held = (hi, lo, sh, zh, sl, zl)
    elif kind in ("q4", "q4a8", "q4bf") and module._int4 is not None and module._q4 is not None:
        packed, (s, z) = module._int4[0], module._q4
        g = module.group_size
        act8 = kernels.ACT8_TOKENS if kind == "q4a8" else 0  # the layer's own rule: q4a8 up to ACT8_TOKENS rows
        code = Q4BF if kind == "q4bf" else Q4  # q4bf: bfloat16 activations at every row count, as on its own path
        fields = (code, n, k, kernels.block_n(), g, packed.data_ptr(), s.data_ptr(), z.data_ptr(), act8)
        held = (packed, s, z)
    else:
        return f"a quantised layer on the {kind} kernel"
    return fields, held, (module.__dict__, "_fast", fast), fast[1]


TRIM_GROWTH = 8 << 20  # bytes of RSS growth while a descriptor is built past which freed heap is released


def _rss() -> int:
    try:
        return rss_bytes()
    except OSError:  # no /proc (not Linux): no glibc to trim either
        return 0


def _projections(layer) -> tuple:
    """A decoder layer's seven projections: q, k, v, o, gate, up, down."""
    att, mlp = layer.self_attn, layer.mlp
    return att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj


class Descriptor:
    """The C description of a model (step.c's step_model) and the tensors its pointers read."""

    def __init__(self, rt: LeanLlama):
        from budgetlm.methods.quant import kernels

        self.state = kernels.state()
        self.held: list = []
        # (dict, key, value): the descriptor is stale when one differs (a module's parameter, bound fast path, or
        # projection replaced); plain dictionaries: ~50 ns a check, not a Module.__getattr__'s microsecond
        self.checks: list = []
        self._checks: tuple | None = None
        self.crossover = 1 << 30
        self.rows = MIN_STEP_ROWS  # calls of up to this many tokens take the step (set below from the model's size)
        self.reason: str | None = None
        rss0 = _rss()
        gemma = isinstance(rt, LeanGemma3)
        if gemma:
            rt.refresh_norms()  # a replaced norm weight (what made this descriptor stale) gets its 1 + w copy first
        layers = (_Layer * len(rt.layers))()
        for i, y in enumerate(rt.layers):
            att, mlp = y.self_attn, y.mlp
            if gemma:  # Gemma's norms: the runtime's 1 + w copies (the modules' own weights checked for staleness)
                modules = (y.input_layernorm, y.pre_feedforward_layernorm, y.post_attention_layernorm,
                           y.post_feedforward_layernorm, att.q_norm, att.k_norm)  # fmt: skip
                w_in, w_pa, w_pf, w_ff, w_q, w_k = rt.norms[i]
                norms = (w_in, w_pf, w_pa, w_ff, w_q, w_k)
            else:
                modules = (y.input_layernorm, y.post_attention_layernorm)
                norms = tuple((n.weight, n.variance_epsilon) for n in modules)
            if any(_hooked(p) for p in (att, mlp, *modules)):
                self.reason = "forward hooks"
                return
            ptrs = [self._norm(module, w) for module, (w, _) in zip(modules, norms)]
            epsilons = [eps for _, eps in norms]
            layers[i].norm1, layers[i].norm2, layers[i].eps1, layers[i].eps2 = *ptrs[:2], *epsilons[:2]
            if gemma:
                layers[i].post_attn, layers[i].post_mlp, layers[i].qnorm, layers[i].knorm = ptrs[2:]
                layers[i].eps_attn, layers[i].eps_mlp, layers[i].eps_q, layers[i].eps_k = epsilons[2:]
                sliding = rt.types[i] == "sliding_attention"
                layers[i].window = rt.window if sliding else 0
                layers[i].rope = rt.rope_kinds.index(rt.types[i])
            for name, module in zip(("q", "k", "v", "o", "gate", "up", "down"), _projections(y)):
                if not self._linear(getattr(layers[i], name), module):
                    return
                parent = att if name in ("q", "k", "v", "o") else mlp
                self.checks.append((parent._modules, f"{name}_proj", module))
        macs = sum(m.in_features * m.out_features for y in rt.layers for m in _projections(y))
        self.rows = max(MIN_STEP_ROWS, min(STEP_ROWS, STEP_ROW_MACS // max(1, macs)))
        md = _Model()
        md.layers, md.hidden, md.heads = len(rt.layers), rt.layers[0].self_attn.q_proj.in_features, rt.heads
        md.kv_heads, md.head_dim, md.inter = rt.kv_heads, rt.head_dim, rt.layers[0].mlp.gate_proj.out_features
        md.scale = rt.layers[0].self_attn.scaling
        if gemma:
            md.norm, md.eps = self._norm(rt.norm, rt.final[0]), rt.final[1]
            md.softcap = float(rt.softcap or 0.0)
            act = getattr(rt.model.config, "hidden_activation", None)
            if act != "gelu_pytorch_tanh":
                self.reason = self.reason or f"activation {act} (the step knows SiLU and gelu_pytorch_tanh)"
            md.act = 1
        else:
            md.norm, md.eps = self._norm(rt.norm, rt.norm.weight), rt.norm.variance_epsilon
        if len({y.self_attn.scaling for y in rt.layers}) > 1:
            self.reason = self.reason or "layers with different attention scales"
        embed = rt.embed
        plain = type(embed) is torch.nn.Embedding and not _hooked(embed) and embed.max_norm is None
        if plain and embed.weight.dtype == torch.float32 and embed.weight.is_contiguous():
            md.embed, md.vocab = embed.weight.data_ptr(), embed.weight.shape[0]
            self.held.append(embed.weight)
            self.checks.append((embed._parameters, "weight", embed.weight))
        if not self._linear(md.head, rt.head):
            return
        md.layer = layers
        self.layers, self.md, self.address = layers, md, ctypes.addressof(md)
        if rt.head_dim > 1024:
            self.reason = self.reason or "a head dimension over 1024"
        # the layers' one-time work above (kernel probes over ~40 MB of cold copies, codes repacked for their kernel)
        # freed blocks glibc keeps mapped: give them back, or a 4-bit model's RSS keeps ~2x its codes' bytes (only
        # where the build grew the RSS: a rebuild that did no such work skips malloc_trim's ~10 ms)
        if _rss() - rss0 > TRIM_GROWTH:
            release_freed_heap()

    def _norm(self, norm, w: torch.Tensor) -> int:
        """The address of the weight `w` the step multiplies by for `norm` (its own, or Gemma's 1 + w copy)."""
        if w.dtype != torch.float32 or not w.is_contiguous():
            self.reason = self.reason or "a norm weight not float32"
        self.held.append(w)
        self.checks.append((norm._parameters, "weight", norm.weight))
        return w.data_ptr()

    def _linear(self, dst: _Linear, module) -> bool:
        got = _linear(module)
        if isinstance(got, str):
            self.reason = got
            return False
        fields, held, check, cross = got
        for (name, _), value in zip(_Linear._fields_, fields):
            setattr(dst, name, value)
        self.held.extend(held)
        self.checks.append(check)
        self.crossover = min(self.crossover, cross)
        return True

    def current(self, state) -> bool:
        if state != self.state:
            return False
        if self._checks is None:  # the checks as three lists: compared by C-level iteration (~30 ns each)
            self._checks = tuple(map(list, zip(*self.checks))) if self.checks else ([], [], [])
        dicts, keys, values = self._checks
        return all(map(operator.is_, map(dict.get, dicts, keys), values))


class _OneCallStep:
    """The one-call step over a lean runtime's forward (LeanLlama's or LeanGemma3's, the next class in the MRO: the
    calls the step does not take run there, on the same StaticKV)."""

    def _init_step(self) -> None:
        self.label = "lean-c (one C call per step)"
        from budgetlm.methods.quant import native

        self.lib, self.simd = native.library(), native.simd()
        self.heads = self.layers[0].self_attn.q_proj.out_features // self.head_dim
        self.desc: Descriptor | None = None
        # the rotary tables: Llama's one, Gemma's per layer type (rope_kinds: the types, in the order the step's
        # `rope` index counts them)
        self.rope_kinds = sorted(set(self.types)) if isinstance(self, LeanGemma3) else [None]
        kinds = getattr(self.rotary, "rope_type", "default")
        kinds = list(kinds.values()) if isinstance(kinds, dict) else [kinds]
        self.dynamic = any("dynamic" in k or k == "longrope" for k in kinds)  # tables depend on the call's positions
        self.tables: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.scratch = torch.empty(0)
        self._kv: dict[int, tuple] = {}  # id(cache.keys): (keys, values, capacity, key pointers, value pointers)
        self.descriptor()  # built now (the layers' kernel probes run here, not in the first timed step)

    def descriptor(self) -> Descriptor:
        """The model's current description (rebuilt when the kernels' state or a module's path changed)."""
        from budgetlm.methods.quant import kernels

        state = kernels.state()
        if self.desc is None or not self.desc.current(state):
            self.desc = Descriptor(self)
            if self.desc.reason is None:
                floats = self.lib.lean_step_scratch(ctypes.byref(self.desc.md), self.desc.rows)
                self.scratch = torch.empty(floats)
        return self.desc

    def step_reason(self) -> str | None:
        """Why a step cannot be one call here (None: it can, for fewer tokens than `descriptor().crossover`)."""
        if step_off():
            return "BUDGETLM_LEAN_STEP=0"
        return self.descriptor().reason

    def _table(self, kind, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probe = torch.empty(1, 1, self.head_dim)
        args = (probe, positions.unsqueeze(0)) + (() if kind is None else (kind,))
        cos, sin = self.rotary(*args)
        return cos[0].float().contiguous(), sin[0].float().contiguous()

    def _rope(self, start: int, end: int) -> tuple[torch.Tensor, ...]:
        """cos, sin [end - start, head_dim] contiguous float32 of positions start..end, of the first and of the last
        rotary table (the model's rotary embedding; the same table twice where the model has one)."""
        if self.dynamic:
            tables = [self._table(kind, torch.arange(start, end)) for kind in self.rope_kinds]
            return (*tables[0], *tables[-1])
        if not self.tables or end > self.tables[0][0].shape[0]:
            n = max(end, 2 * (self.tables[0][0].shape[0] if self.tables else 0), 256)
            self.tables = [self._table(kind, torch.arange(n)) for kind in self.rope_kinds]
        first, last = self.tables[0], self.tables[-1]
        return first[0][start:end], first[1][start:end], last[0][start:end], last[1][start:end]

    def _kv_pointers(self, cache: StaticKV) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 tensors of the cache's per-layer key and value buffer addresses (kept while its buffers are: they
        change only when `reserve` grows them, which changes the capacity)."""
        got = self._kv.get(id(cache.keys))
        if got is None or got[0] is not cache.keys or got[1] is not cache.values or got[2] != cache.capacity:
            if len(self._kv) >= 8:
                self._kv.clear()
            ptrs = [torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64) for ts in (cache.keys, cache.values)]
            got = self._kv[id(cache.keys)] = (cache.keys, cache.values, cache.capacity, *ptrs)
        return got[3], got[4]

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, start: int, cache: StaticKV, keep: int) -> torch.Tensor:
        m = ids.shape[1]
        desc = self.descriptor()
        if m > desc.rows or m >= desc.crossover or desc.reason is not None or step_off() or ids.shape[0] != 1:
            return super().__call__(ids, start, cache, keep)
        m, end, _ = self._begin(ids, start, cache)
        cos, sin, cos2, sin2 = self._rope(start, end)
        ids = ids.to(torch.int64).contiguous()
        h_in = 0
        if not desc.md.embed:
            h = self.embed(ids).float().contiguous()
            h_in = h.data_ptr()
        rows = min(keep, m) if keep else m
        desc.md.window, desc.md.sinks = self.sparse
        desc.md.kv_bf16 = cache.keys[0].dtype == torch.bfloat16
        logits = torch.empty(1, rows, desc.md.head.n)
        keys, values = self._kv_pointers(cache)
        err = self.lib.lean_step(desc.address, ids.data_ptr(), h_in, m, start, rows, keys.data_ptr(),
                                 values.data_ptr(), cache.capacity, cos.data_ptr(), sin.data_ptr(),
                                 cos2.data_ptr(), sin2.data_ptr(), self.scratch.data_ptr(), logits.data_ptr(),
                                 torch.get_num_threads(), self.simd)  # fmt: skip
        if err == 3:
            raise IndexError(f"lean runtime: a token id outside the vocabulary of {desc.md.vocab}")
        if err == 2:
            raise MemoryError("lean runtime: no memory for the attention scores")
        if err:
            raise RuntimeError(f"lean runtime: the one-call step failed (code {err})")
        cache.length = end
        return logits.to(self.dtype)


class LeanStepLlama(_OneCallStep, LeanLlama):
    """LeanLlama whose calls of 1..Descriptor.rows tokens run as one C call (module docstring)."""

    def __init__(self, model: torch.nn.Module, glue: CGlue | None = None):
        LeanLlama.__init__(self, model, glue)
        self._init_step()


class LeanStepGemma3(_OneCallStep, LeanGemma3):
    """LeanGemma3 whose calls of 1..Descriptor.rows tokens run as one C call (module docstring)."""

    def __init__(self, model: torch.nn.Module, glue: CGlue | None = None):
        LeanGemma3.__init__(self, model, glue)
        self._init_step()


def _classes(model: torch.nn.Module) -> tuple[type, type]:
    """(the per-layer lean runtime, its one-call step) of the model's architecture."""
    if type(model).__name__ == "Gemma3ForCausalLM":
        return LeanGemma3, LeanStepGemma3
    return LeanLlama, LeanStepLlama


def step_runtime(model: torch.nn.Module) -> LeanLlama:
    """LeanStepLlama where its one-call step can run the model now, else LeanLlama with the reason in `no_step`.
    Where only torch's kernels (chosen by the per-layer probes) keep the step from running, the two ways are timed
    on this model (`own_kernels_pay`) and the faster is kept for the process; the label or `no_step` says so."""
    from budgetlm.methods.quant import kernels

    lean_cls, step_cls = _classes(model)
    rt = lean_cls(model)
    if step_off():
        rt.no_step = "BUDGETLM_LEAN_STEP=0"
    elif not isinstance(rt.glue, CGlue):
        rt.no_step = "no C glue (a model not float32, BUDGETLM_LEAN_C=0 or the library not built)"
    else:
        step = step_cls(model, rt.glue)
        rt.no_step = step.step_reason()
        if rt.no_step is None:
            return step
        if not kernels.own_preferred() and kernels.enabled() and (timed := own_kernels_pay(model, rt)) is not None:
            layers, one_call = timed
            said = f"one-call step on budgetlm's kernels {one_call:.1f} ms, per layer on torch's {layers:.1f} ms"
            if one_call < layers:
                step = step_cls(model, rt.glue)
                if step.step_reason() is None:
                    step.label += f"; timed on this model: {said}"
                    return step
            rt.no_step += f" (timed on this model: {said})"
    return rt


# model signature -> (per-layer ms, one-call ms) of own_kernels_pay, once per process
_timed: dict[tuple, tuple[float, float]] = {}


def own_kernels_pay(model: torch.nn.Module, rt: LeanLlama, steps: int = 6) -> tuple[float, float] | None:
    """(per-layer ms, one-call ms) of a one-token decode step of this model on the kernels the per-layer probes
    chose (torch's int4 / int8 / int4x2: their single products time faster on some hosts, but they leave every layer
    to Python) and on budgetlm's own in the one-call step; None where the step cannot run on those either. Timed
    here, `steps` one-token steps after an 8-token prompt, per way twice (interleaved, the faster of the two), once
    per process, model shape, grids and thread count. Where the step is faster, kernels.prefer_own_kernels(True)
    is set for the process: every quantised layer then takes "q4" / "q8"."""
    from budgetlm.methods.quant import kernels

    kernels.prefer_own_kernels(True)
    try:
        if _classes(model)[1](model, rt.glue).step_reason() is not None:
            return None
    finally:
        kernels.prefer_own_kernels(False)
    cfg = model.config
    grids = sorted({(m.bits, str(m.group_size)) for m in model.modules() if hasattr(m, "_fast_path")})
    key = (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size,
           tuple(grids), torch.get_num_threads())  # fmt: skip
    if key not in _timed:
        ways: dict[str, list[float]] = {"layers": [], "step": []}
        with torch.no_grad():
            for way in ("layers", "step", "step", "layers"):  # two switches of the layers' kernels, not three
                kernels.prefer_own_kernels(way == "step")
                runtime = _classes(model)[1](model, rt.glue) if way == "step" else rt
                ways[way].append(_step_ms(runtime, steps, cfg.vocab_size))
        _timed[key] = (min(ways["layers"]), min(ways["step"]))
    layers, one_call = _timed[key]
    kernels.prefer_own_kernels(one_call < layers)
    return layers, one_call


def _step_ms(runtime, steps: int, vocab: int) -> float:
    """ms per one-token step after an 8-token prompt (untimed: the first calls after a kernel switch repack)."""
    cache = runtime.new_cache()
    runtime(torch.arange(1, 9).remainder(vocab).unsqueeze(0), 0, cache, 1)
    token = torch.tensor([[3 % vocab]])
    runtime(token, 8, cache, 1)
    t0 = time.perf_counter()
    for i in range(steps):
        runtime(token, 9 + i, cache, 1)
    return (time.perf_counter() - t0) * 1000 / steps

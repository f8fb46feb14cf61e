"""Layer-by-layer calibration, shared by every method that needs activations (GPTQ, AWQ, Lo-Bi, Wanda,
SparseGPT, ShortGPT).

The model never needs two copies in memory and never runs whole on all calibration text at once:
1. the calibration token ids are embedded and the hidden states entering decoder layer 0 are captured
   (a pre-hook stops the forward there); the keyword arguments each decoder layer receives (attention mask,
   rotary position embeddings, which differ per layer for models with local and global attention) are
   captured once from one forward of a batch in which every layer passes its input through (they are made
   before the first layer runs);
2. for each decoder layer in order, the method observes the inputs of the modules it changes (`collect`), changes
   the layer, and the *changed* layer's outputs become the next layer's inputs (`advance`), so each layer is
   calibrated on the activations the compressed model really produces.

    cal = LayerwiseCalibration(handle.model, ctx.calibration(handle.tokenizer))
    for i, layer in cal.layers():
        stats = cal.collect(layer, {"q": layer.self_attn.q_proj, ...}, HessianStat)
        ...change the layer...
        cal.advance(layer)          # feed the changed layer's outputs forward (skip for the last layer)

A method that changes a sub-layer from the inputs it really receives once the sub-layers before it are changed
(GPTQ's true-sequential order) can do it in one pass: `Lockstep` runs the batches through the layer side by side,
each batch pausing where a module calls `pause()` until every batch has paused there; the method then sees the
inputs of all batches, changes the module, and resumes them (the layer runs once instead of once per sub-layer).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator

import greenlet
import torch
from torch import nn

from budgetlm.errors import ConfigError, ModelError
from budgetlm.hardware.memory import mapped_large_buffers, release_freed_heap
from budgetlm.progress import Progress


class _Stop(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's ModuleList of transformer blocks (Llama, Gemma, Qwen, Mistral, ... layouts)."""
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "model.decoder.layers"):
        mod = model
        try:
            for part in path.split("."):
                mod = getattr(mod, part)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod):
            return mod
    raise ModelError(
        f"cannot find the decoder layers of {type(model).__name__}; layer-by-layer calibration supports "
        "decoder-only models with a model.layers list (Llama, Gemma, Qwen, Mistral)"
    )


def layer_prefix(model: nn.Module, index: int) -> str:
    """The module-name prefix of decoder layer `index`, e.g. 'model.layers.3'."""
    target = decoder_layers(model)[index]
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise ModelError(f"decoder layer {index} is not a submodule of the model")


def require_calibration(tokens: torch.Tensor | None, method: str) -> torch.Tensor:
    if tokens is None or tokens.numel() == 0 or tokens.shape[0] == 0:
        raise ConfigError(
            f"method '{method}' needs calibration text but got none; set n_calibration >= 1 "
            "(e.g. calibration: 64 in the recipe) or choose a data-free method such as rtn"
        )
    return tokens


class LayerwiseCalibration:
    """Inputs of each decoder layer on calibration text, advanced layer by layer through the changed model."""

    def __init__(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        batch_size: int = 8,
        method: str = "calibration",
        compute_dtype: torch.dtype | None = None,
        progress: bool = False,
        title: str | None = None,
    ):
        tokens = require_calibration(tokens, method)
        self.model = model
        self.progress, self.title = progress, title or method  # a bar titled `title` while layers() runs
        self._bar: Progress | None = None
        # compute_dtype (e.g. torch.bfloat16): the layer passes run their matmuls under CPU autocast in that
        # dtype (activations between layers stay in the model's dtype); much faster where the CPU runs bf16
        # natively (AMX, AVX-512 bf16), at the cost of rounding the activations the statistics are taken from
        self.compute_dtype = compute_dtype
        self.blocks = decoder_layers(model)
        self.batches = list(torch.split(tokens, batch_size))
        self.n_tokens = tokens.numel()
        self.dtype = next(model.parameters()).dtype
        self.inputs: list[torch.Tensor] = []
        self._kwargs: dict[tuple[int, int], dict] = {}  # (layer, batch size) -> kwargs
        self._index = 0  # the decoder layer the current inputs enter
        self._capture()

    @torch.no_grad()
    def _capture(self) -> None:
        recorded: dict[int, dict] = {}

        def record(i):
            def hook(_mod, args, kwargs):
                kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "use_cache")}
                kw["use_cache"] = False
                recorded[i] = kw
                if i == 0:
                    self._current = args[0] if args else kwargs["hidden_states"]
                if stop_at is not None and i >= stop_at:
                    raise _Stop

            return hook

        def passthrough(*args, **kwargs):
            return args[0] if args else kwargs["hidden_states"]

        # the layers' kwargs (masks, rotary tables) are made before the first layer runs and do not depend on its
        # outputs, so while capturing every layer passes its input through instead of computing
        handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        for b in self.blocks:
            b.forward = passthrough
        seen_sizes: set[int] = set()
        try:
            for batch in self.batches:
                bs = batch.shape[0]
                # first batch of a size: run to the last block to record every layer's kwargs, stop before the
                # head (its logits would cost hundreds of MB); later batches stop at layer 0
                stop_at = len(self.blocks) - 1 if bs not in seen_sizes else 0
                recorded.clear()
                try:
                    self.model(input_ids=batch, use_cache=False)
                except _Stop:
                    pass
                self.inputs.append(self._current)
                if bs not in seen_sizes:
                    seen_sizes.add(bs)
                    for i, kw in recorded.items():
                        self._kwargs[(i, bs)] = kw
        finally:
            for h in handles:
                h.remove()
            for b in self.blocks:
                del b.forward
            self._current = None

    def kwargs(self, index: int, batch_size: int) -> dict:
        return self._kwargs[(index, batch_size)]

    def layers(self, last: int | None = None) -> Iterator[tuple[int, nn.Module]]:
        """(index, layer) up to layer `last` (default: all); the caller changes the layer and calls `advance`
        before the next one (a layer counts as done, for progress, when the next one is asked for). Between layers
        the heap freed by the last one is returned to the OS (else the RSS creeps up layer by layer), after
        collecting the young generations only: cycles made while calibrating are young, and a full collection of
        a process holding a loaded model, tokenizer and libraries takes 0.3-0.4 s, 10 s over 30 layers. While the
        layers run, buffers of 1 MiB and more are mapped one by one (hardware.memory.mapped_large_buffers), so the
        activations a pass frees leave the RSS at once instead of as holes in the heap."""
        n = len(self.blocks) if last is None else last + 1
        with mapped_large_buffers(), Progress(self.title, n, enabled=self.progress, throttled=True) as bar:
            self._bar = bar
            try:
                for i, layer in enumerate(self.blocks[:n]):
                    if i:
                        gc.collect(1)
                        release_freed_heap()
                    self._index = i
                    bar.status(f"layer {i + 1}/{n}", line=False)  # off a terminal: the method's own steps
                    yield i, layer
                    bar.advance(f"layer {i + 1}/{n} done")
            finally:
                self._bar = None

    def status(self, text: str) -> None:
        """Say what is being done to the current layer (e.g. "column sweep"): "gptq: layer 7/30: column sweep"."""
        if self._bar is not None:
            self._bar.status(f"layer {self._index + 1}/{self._bar.total}: {text}")

    def compute(self) -> contextlib.AbstractContextManager:
        """The context the layer passes run in: autocast to compute_dtype, or nothing."""
        if self.compute_dtype is None or self.compute_dtype == self.dtype:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.compute_dtype)

    def layer_output(self, layer: nn.Module, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """`layer` (decoder layer `index`, default: the current one) on one batch, in the model's dtype (call it
        inside `compute()`)."""
        index = self._index if index is None else index
        y = layer(x, **self.kwargs(index, x.shape[0]))
        y = y[0] if isinstance(y, tuple) else y
        return y.to(self.dtype)

    @torch.no_grad()
    def run(self, layer: nn.Module, index: int | None = None) -> list[torch.Tensor]:
        """The outputs of `layer` (decoder layer `index`, default: the current one) on the current inputs."""
        with self.compute():
            return [self.layer_output(layer, x, index) for x in self.inputs]

    @torch.no_grad()
    def collect(self, layer: nn.Module, modules: dict[str, nn.Module], stat: Callable[[], InputStat]) -> dict:
        """Run the current inputs through `layer`, feeding every named module's input to a fresh `stat()`."""
        stats = {name: stat() for name in modules}
        handles = [
            mod.register_forward_pre_hook(lambda _m, args, _n=name: stats[_n].add(args[0]))
            for name, mod in modules.items()
        ]
        try:
            self.run(layer)
        finally:
            for h in handles:
                h.remove()
        return stats

    @torch.no_grad()
    def capture_inputs(self, layer: nn.Module, module: nn.Module) -> tuple[list[torch.Tensor], list[dict]]:
        """The positional input and keyword arguments `module` (inside `layer`) receives, per batch."""
        xs, kws = [], []

        def hook(_m, args, kwargs):
            xs.append(args[0] if args else next(iter(kwargs.values())))
            kws.append(dict(kwargs))

        h = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.run(layer)
        finally:
            h.remove()
        return xs, kws

    @torch.no_grad()
    def advance(self, layer: nn.Module) -> None:
        """Replace the inputs by the (changed) current layer's outputs: the next layer's inputs."""
        self.inputs = self.run(layer)


class LockstepError(RuntimeError):
    """The batches of a lockstep run did not pause at the same points (a layer whose call pattern depends on
    its inputs); the caller falls back to separate passes."""


class Lockstep:
    """One pass of the current calibration inputs through a decoder layer, the batches side by side.

    Each batch runs the layer in its own greenlet (a coroutine on this thread: the same torch thread pool, no
    extra OS threads). Code inside the layer, typically a wrapper module around a target, calls `pause(tag)`:
    the running batch stops there and the next one starts or resumes; once every unfinished batch has paused at
    the same tag, `on_pause(tag)` runs (e.g. quantise that module from the inputs all batches fed it) and the
    batches resume in order. `run` returns the layer's outputs per batch, which become the next layer's inputs
    (the lockstep pass is also the layer's `advance`). Memory: every batch holds its live activations while
    paused (at a down_proj pause: the residual, the MLP input and the intermediate activations), more than a
    two-pass scheme's inputs and outputs (measured for GPTQ on SmolLM2 with 16k tokens: +0.52x instead of
    +0.36-0.41x the fp32 model in peak RSS).
    """

    def __init__(self, cal: LayerwiseCalibration, layer: nn.Module) -> None:
        self.cal, self.layer = cal, layer
        self.batch = -1  # the batch running now
        self._main: greenlet.greenlet | None = None

    def pause(self, tag: object) -> None:
        """Suspend the running batch at `tag` until every batch got there and `on_pause(tag)` ran."""
        if self._main is None or greenlet.getcurrent() is self._main:
            raise LockstepError("pause() called outside a lockstep run")
        self._main.switch(tag)

    @torch.no_grad()
    def run(self, on_pause: Callable[[object], None]) -> list[torch.Tensor]:
        """Run every batch through the layer (on_pause at each common pause); the outputs become the inputs.
        On an error the inputs are left as they were."""
        cal, index = self.cal, self.cal._index

        def forward(x: torch.Tensor) -> torch.Tensor:
            return cal.layer_output(self.layer, x, index)

        self._main = greenlet.getcurrent()
        runs = [greenlet.greenlet(forward) for _ in cal.inputs]
        outputs: list[torch.Tensor | None] = [None] * len(runs)
        pending = [(b, (x,)) for b, x in enumerate(cal.inputs)]
        try:
            while pending:
                tags = {}
                for b, args in pending:
                    self.batch = b
                    with cal.compute():  # autocast is per thread: on while a batch runs, off in on_pause
                        out = runs[b].switch(*args)
                    if runs[b].dead:
                        outputs[b] = out
                    else:
                        tags[b] = out
                if not tags:
                    break
                if len(tags) < len(runs) or len({repr(t) for t in tags.values()}) > 1:
                    raise LockstepError(
                        f"calibration batches paused at different points of decoder layer {index}: "
                        f"{sorted({repr(t) for t in tags.values()})} ({len(runs) - len(tags)} finished)"
                    )
                on_pause(next(iter(tags.values())))
                pending = [(b, ()) for b in sorted(tags)]
        finally:
            self._main, self.batch = None, -1
            for g in runs:
                if g:  # started and suspended: unwind it
                    g.throw(greenlet.GreenletExit)
        cal.inputs = outputs
        return outputs


class InputStat:
    """Accumulates a statistic of a module's inputs over calibration batches."""

    def add(self, x: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class HessianStat(InputStat):
    """H = (2/n) Σ x xᵀ over the n calibration tokens (GPTQ, SparseGPT), kept as that running mean.

    H is symmetric, so for wide inputs only its upper block triangle is accumulated (blocks of `block` features:
    (k+1)/2k of the full product's work for k blocks); its upper triangle is mirrored when H is read."""

    block = 384  # inputs wider than this are accumulated in blocks of this many features

    def __init__(self) -> None:
        self._H: torch.Tensor | None = None
        self._mirrored = True
        self.n = 0

    @torch.autocast("cpu", enabled=False)  # called from inside layer passes, which may run under autocast
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        d, m = x.shape[1], x.shape[0]
        if self._H is None:
            self._H = torch.zeros(d, d)
        beta = self.n / (self.n + m)  # the running mean's old part, rescaled as tokens come in
        self.n += m
        alpha = 2 / self.n
        self._mirrored = False
        if d <= self.block:
            self._H.addmm_(x.T, x, beta=beta, alpha=alpha)
            return
        edges = list(range(0, d, self.block)) + [d]
        for a0, a1 in zip(edges, edges[1:]):
            xa = x[:, a0:a1].T
            for b0, b1 in zip(edges, edges[1:]):
                if b0 >= a0:
                    self._H[a0:a1, b0:b1].addmm_(xa, x[:, b0:b1], beta=beta, alpha=alpha)

    @property
    def H(self) -> torch.Tensor | None:
        """H, exactly symmetric: the upper triangle as accumulated, mirrored below the diagonal (a BLAS need not
        round the two halves of a product XᵀX alike: AMD's path did not)."""
        if not self._mirrored:
            H, d = self._H, self._H.shape[0]
            for a0 in range(0, d, self.block):
                a1 = min(a0 + self.block, d)
                diag = H[a0:a1, a0:a1]
                low = torch.tril_indices(a1 - a0, a1 - a0, -1)
                diag[low[0], low[1]] = diag[low[1], low[0]]
                H[a1:, a0:a1] = H[a0:a1, a1:].T  # each block row's right part, below it
            self._mirrored = True
        return self._H


class NormStat(InputStat):
    """Per input feature: Σ x² (so ‖X_j‖₂ = sqrt) and Σ |x| over tokens (Wanda, AWQ), and the token count."""

    def __init__(self) -> None:
        self.sq: torch.Tensor | None = None
        self.abs: torch.Tensor | None = None
        self.n = 0

    @torch.autocast("cpu", enabled=False)
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.sq is None:
            self.sq = torch.zeros(x.shape[1])
            self.abs = torch.zeros(x.shape[1])
        self.sq += x.pow(2).sum(0)
        self.abs += x.abs().sum(0)
        self.n += x.shape[0]

    @property
    def l2(self) -> torch.Tensor:
        return self.sq.sqrt()

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs / max(self.n, 1)


def linears_in(layer: nn.Module, prefix: str, select: Callable[[str], bool] | None = None) -> dict[str, nn.Linear]:
    """nn.Linear modules inside a decoder layer by full model name (prefix + '.' + local name)."""
    out = {}
    for local, mod in layer.named_modules():
        if isinstance(mod, nn.Linear):
            full = f"{prefix}.{local}"
            if select is None or select(full):
                out[full] = mod
    return out

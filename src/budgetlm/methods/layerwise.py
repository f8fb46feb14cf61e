"""The layer-by-layer loop shared by the methods that compress a decoder layer's Linears from their input
Hessians (gptq, sparsegpt): which targets sit in which decoder layer (assign_layers; wanda uses it too), then per
layer the Hessian pass (methods/hessians.py), the method's group compressor on each shared-input group, and the
pass that feeds the compressed layer's outputs to the next layer, with the compressed Linears replaced by exact
stand-ins meanwhile; or, with `true_sequential`, all of it in one lockstep pass of the batches (_OnePass, _Gate).
The compressors (what a group becomes) belong to the methods.

The two orders, in gptq's terms. By default (the GPTQ paper's order) every Hessian of a layer comes from the layer
as it is (one Hessian pass), then an advance pass feeds the quantised layer's outputs on (two passes per layer).
With `true_sequential: true` (the order of the GPTQ code's --true-sequential option) each input group is quantised
from the inputs it receives once the groups before it are quantised: q/k/v from the layer's inputs, o from the
quantised attention, gate/up after o, down after gate/up. This costs one pass over the calibration batches per
layer: the batches run through the layer in lockstep (calibration.Lockstep; _OnePass pauses each batch at a target
until all batches have fed its Hessian, quantises it, and lets them on), and the pass's outputs are the quantised
layer's, the next layer's inputs. It is faster and more accurate (SmolLM2 4-bit g64: KL 0.130 instead of 0.142) but
holds every batch's live activations at the deepest pause: +0.52x the fp32 model in RSS instead of +0.36-0.41x for
the two passes (64 x 256 tokens), which is why it is not the default (the issue's budget is +0.5x).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable

import torch

from budgetlm.errors import ConfigError
from budgetlm.hardware.memory import release_freed_heap
from budgetlm.methods.base import MethodConfig, StepContext, select_linears, set_module
from budgetlm.methods.calibration import HessianStat, LayerwiseCalibration, Lockstep, LockstepError, decoder_layers
from budgetlm.methods.hessians import HessianPasses
from budgetlm.models.handle import ModelHandle


def assign_layers(
    model: torch.nn.Module, targets: list[tuple[str, torch.nn.Linear]], method: str
) -> list[tuple[str, dict]]:
    """Per decoder layer, (its module-name prefix, {name: Linear} of the targets inside it); a target outside
    every decoder layer is a one-line ConfigError (the Hessians are collected decoder layer by layer)."""
    blocks = decoder_layers(model)
    index = {id(b): i for i, b in enumerate(blocks)}
    prefix = [""] * len(blocks)
    for name, mod in model.named_modules():
        if id(mod) in index:
            prefix[index[id(mod)]] = name
    per_layer: list[tuple[str, dict]] = [(p, {}) for p in prefix]
    outside = []
    for name, lin in targets:
        for p, mods in per_layer:
            if name.startswith(p + "."):
                mods[name] = lin
                break
        else:
            outside.append(name)
    if outside:
        shown = ", ".join(outside[:3]) + (f", ... ({len(outside)} in all)" if len(outside) > 3 else "")
        raise ConfigError(
            f"method '{method}' calibrates the decoder layers one by one, but targets {shown} outside them; add them "
            f"to ignore (e.g. ignore: [lm_head, '*.lm_head', {outside[0]!r}]) or change them in another step"
        )
    return per_layer


# A group compressor: given one shared-input group of names, the {name: Linear} still to compress and the
# Hessians, returns {name: (stand_in, final)}: `stand_in` computes exactly what `final` computes and serves the
# later passes over the layer and its `advance` (cheaper than e.g. unpacking codes per batch); `final` is
# installed once the layer is done.
GroupCompressor = Callable[[list[str], dict, dict], dict[str, tuple[torch.nn.Module, torch.nn.Module]]]


class _Gate(torch.nn.Module):
    """Stands in for a target Linear during a one-pass (lockstep) calibration of its decoder layer: its calls go
    to the layer's _OnePass, which pauses the batch until the Linear can be compressed. Attributes other than
    forward (weight, in_features, ...) are the original Linear's."""

    def __init__(self, name: str, original: torch.nn.Module, sequencer: _OnePass) -> None:
        super().__init__()
        self.__dict__["_gate"] = (name, original, sequencer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name, _, sequencer = self.__dict__["_gate"]
        return sequencer.arrive(name, x)

    def __getattr__(self, attr: str):
        gate = self.__dict__.get("_gate")
        if gate is None:
            raise AttributeError(attr)
        return getattr(gate[1], attr)


class _OnePass:
    """GPTQ's true-sequential order in one pass of the calibration batches through a decoder layer.

    Each target is replaced by a _Gate. A batch reaching a target not yet compressed adds its input to that
    target's Hessian and pauses (calibration.Lockstep); when every batch has paused there, the target is
    compressed from the Hessian of all of them, together with the targets predicted to share its input (the
    input groups seen in the previous layer, by local name: q/k/v, gate/up), and the batches go on through the
    compressed stand-ins. A target called with the very tensor an earlier target paused on shares that Hessian.
    Every later call of a grouped target is checked to get its owner's tensor; a wrong prediction raises
    LockstepError (the caller restores the layer and redoes it without predictions). The pass's outputs are the
    compressed layer's, so no separate advance pass is needed."""

    def __init__(self, cal, model, layer, prefix: str, remaining: dict, compress: GroupCompressor, plan) -> None:
        self.lock = Lockstep(cal, layer)
        self.model, self.prefix, self.remaining, self.compress = model, prefix, remaining, compress
        self.plan: dict[str, list[str]] | None = plan  # local name -> local names of its input group
        self.stand_in: dict[str, torch.nn.Module] = {}
        self.final: dict[str, torch.nn.Module] = {}
        self.owner: dict[str, str] = {}  # name -> the name whose pause collected the Hessian it used
        self.hessians: dict[str, torch.Tensor] = {}  # owner -> H
        self.stats: dict[str, HessianStat] = {}
        self.slot: dict[int, tuple[weakref.ref, str]] = {}  # batch -> (tensor, owner) of its last pause
        self.groups: dict[str, list[str]] = {}  # owner -> its input group, in call order
        self.seconds = {"hessians": 0.0, "compress": 0.0}

    def local(self, name: str) -> str:
        return name[len(self.prefix) + 1 :]

    def arrive(self, name: str, x: torch.Tensor) -> torch.Tensor:
        b = self.lock.batch
        slot = self.slot.get(b)
        paused_on = None if slot is None else slot[0]()
        if name in self.stand_in:
            owner = self.owner[name]
            if owner != name and (paused_on is not x or slot[1] != owner):
                raise LockstepError(f"{name} was compressed with {owner}'s Hessian but is fed another tensor")
            return self.stand_in[name](x)
        if paused_on is x:  # the tensor an earlier target paused on: share its Hessian
            with torch.autocast("cpu", enabled=False):  # compress in full precision even inside a bf16 pass
                self._compress([name], slot[1])
            return self.stand_in[name](x)
        t0 = time.perf_counter()
        self.stats.setdefault(name, HessianStat()).add(x)
        self.seconds["hessians"] += time.perf_counter() - t0
        self.slot[b] = (weakref.ref(x), name)  # weak: a finished batch's last input is freed at once
        self.lock.pause(name)
        return self.stand_in[name](x)

    def on_pause(self, name: str) -> None:
        self.hessians[name] = self.stats.pop(name).H
        group = [name]
        if self.plan is not None:
            partners = self.plan.get(self.local(name), ())
            group += [n for n in self.remaining if n != name and n not in self.stand_in and self.local(n) in partners]
        self._compress(group, name)

    def _compress(self, group: list[str], owner: str) -> None:
        t0 = time.perf_counter()
        H = self.hessians.get(owner)
        new = self.compress(group, self.remaining, {n: H for n in group} if H is not None else {})
        for n, (stand_in, final) in new.items():
            self.stand_in[n], self.final[n], self.owner[n] = stand_in, final, owner
        self.groups.setdefault(owner, []).extend(group)
        self.seconds["compress"] += time.perf_counter() - t0

    def run(self) -> tuple[dict[str, torch.nn.Module], list[str]]:
        """Compress the layer in one pass; returns ({name: final module}, names never called). The inputs of
        the calibration become this layer's outputs. On LockstepError the layer's targets are restored."""
        for n, mod in self.remaining.items():
            set_module(self.model, n, _Gate(n, mod, self))
        try:
            self.lock.run(self.on_pause)
        except BaseException:
            for n, mod in self.remaining.items():
                set_module(self.model, n, mod)
            raise
        finally:
            self.slot.clear()  # the batches' tensors
            self.stats.clear()
        never = [n for n in self.remaining if n not in self.final]
        for n in never:
            self._compress([n], n)  # no Hessian: H = I
        for n, final in self.final.items():
            set_module(self.model, n, final)
        return dict(self.final), never

    @torch.no_grad()
    def probe(self) -> dict[str, list[str]]:
        """The input groups of the layer as it is, by local name, from one batch run without pausing: the
        prediction for the first layer (later layers take the groups the previous one showed)."""
        seen: list[tuple[torch.Tensor, list[str]]] = []

        def hook(name):
            def record(_m, args):
                hit = next((names for t, names in seen if t is args[0]), None)
                if hit is None:
                    seen.append((args[0], [name]))
                else:
                    hit.append(name)

            return record

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in self.remaining.items()]
        try:
            with self.lock.cal.compute():
                self.lock.cal.layer_output(self.lock.layer, self.lock.cal.inputs[0])
        finally:
            for h in handles:
                h.remove()
        return {self.local(n): [self.local(m) for m in g] for _, g in seen for n in g}

    def learnt_plan(self) -> dict[str, list[str]]:
        """The input groups seen, by local name: the prediction for the next layer."""
        return {self.local(n): [self.local(m) for m in g] for g in self.groups.values() for n in g}


@torch.no_grad()
def compress_layerwise(
    handle: ModelHandle,
    cfg: MethodConfig,
    ctx: StepContext,
    compress: GroupCompressor,
    check: Callable[[list[tuple[str, torch.nn.Linear]]], None] | None = None,
    true_sequential: bool = False,
    compute_dtype: torch.dtype | None = None,
    after_last: Callable[[LayerwiseCalibration], None] | None = None,
) -> tuple[list[str], dict[str, float]]:
    """The layer-by-layer Hessian loop shared by GPTQ and SparseGPT over the Linears `cfg` targets (`check`
    validates them before anything changes). Per decoder layer:
    - `true_sequential` (one pass, _OnePass): the batches run through the layer in lockstep; each input group is
      compressed from the inputs it receives once the groups before it are compressed, and the pass's outputs
      feed the next layer. If the batches of a layer do not pause alike (an input-dependent call pattern), that
      layer falls back to separate passes, one per input group.
    - otherwise: one Hessian pass collects every group's Hessian from the layer as it is (gptq's shared-input
      passes), `compress` replaces each group, and an advance pass feeds the changed layer's outputs forward.
    `compute_dtype` (e.g. torch.bfloat16) runs the layer passes under CPU autocast (LayerwiseCalibration).
    `after_last`: the calibration is advanced through every decoder layer (the compressed ones included) and
    `after_last(cal)` gets it, its inputs then being the last layer's outputs (gptq's lm_head Hessian).
    Returns (notes, seconds per phase). A target never called on the calibration text is compressed with H = I."""
    model, method = handle.model, cfg.method_name
    targets = select_linears(model, cfg)
    if check is not None:
        check(targets)
    per_layer = assign_layers(model, targets, method)
    del targets  # hold no reference to a replaced Linear, so its fp32 weight is freed as the step goes
    last = max(i for i, (_, mods) in enumerate(per_layer) if mods)
    if after_last is not None:
        last = len(per_layer) - 1
    cal = LayerwiseCalibration(
        model, ctx.calibration(handle.tokenizer), method=method, compute_dtype=compute_dtype, progress=ctx.progress
    )

    notes: list[str] = []
    never_called: list[str] = []
    seconds = {"hessians": 0.0, method: 0.0, "forward": 0.0}
    passes = HessianPasses()
    plan: dict[str, list[str]] | None = None
    for i, layer in cal.layers(last):
        prefix, remaining = per_layer[i][0], per_layer[i][1]
        per_layer[i] = (prefix, {})
        done: dict[str, torch.nn.Module] | None = None
        if true_sequential and remaining:
            t0, spent = time.perf_counter(), seconds["hessians"] + seconds[method]
            # predicted input groups: the previous layer's, or a probe of this one; then none (each target
            # compressed as it is reached, sharers with the Hessian of the tensor they share)
            cal.status("one pass: hessians and column sweeps")
            for attempt in (plan or "probe", None):
                one = _OnePass(cal, model, layer, prefix, remaining, compress, None)
                one.plan = one.probe() if attempt == "probe" else attempt
                try:
                    done, never = one.run()
                except LockstepError as e:
                    why = str(e)
                    continue
                finally:
                    seconds["hessians"] += one.seconds["hessians"]
                    seconds[method] += one.seconds["compress"]
                plan = one.learnt_plan()
                never_called += never
                remaining.clear()  # the original Linears: free their weights before the next layer
                break
            else:
                notes.append(f"decoder layer {i}: {why}; it was compressed in separate passes")
                plan = None
            one = None
            seconds["forward"] += time.perf_counter() - t0 - (seconds["hessians"] + seconds[method] - spent)
        if done is None:
            done = {}
            while remaining:
                t0 = time.perf_counter()
                cal.status(f"hessians of {len(remaining)} Linears")
                groups, never, hessians = passes.collect(cal, model, layer, prefix, remaining)
                if true_sequential and groups:
                    groups = groups[:1]
                elif never:
                    never_called += never
                    groups += [[n] for n in never]
                release_freed_heap()  # the pass's activations: keep the RSS at the live memory
                t1 = time.perf_counter()
                cal.status("column sweep")
                for group in groups:
                    for n, (stand_in, final) in compress(group, remaining, hessians).items():
                        set_module(model, n, stand_in)  # later passes over this layer see an exact stand-in
                        remaining.pop(n)
                        done[n] = final
                seconds["hessians"] += t1 - t0
                seconds[method] += time.perf_counter() - t1
            if i < last or after_last is not None:
                t0 = time.perf_counter()
                cal.status("forward to the next layer")
                cal.advance(layer)
                seconds["forward"] += time.perf_counter() - t0
            for n, final in done.items():
                set_module(model, n, final)
    if after_last is not None:
        after_last(cal)
    del cal
    if never_called:
        notes.append(f"{', '.join(never_called)} never ran on the calibration text: {method} used H = I for them")
    notes.append(
        "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) + " (the rest: capturing the inputs)"
    )
    return notes, seconds

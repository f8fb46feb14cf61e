"""The Hessian pass of a decoder layer for the methods that calibrate on second-order statistics (gptq, sparsegpt,
through methods/layerwise.py): one pass of the calibration batches through the layer that collects each target
Linear's input Hessian (calibration.HessianStat), computing one Hessian per distinct input tensor, so Linears fed the
same tensor (q/k/v, gate/up in Llama-style blocks) share it and come out as one input group, in the order the layer
calls them. Work saved without changing the result: from the second layer on, the targets the layer called after
all the others (down_proj) are replaced by a stub returning zeros, since only their input is needed; every batch is
checked to call them last, otherwise the pass is redone in full. A target whose sharing pattern changes between
batches gets a Hessian of its own in a second pass.
"""

from __future__ import annotations

import torch

from budgetlm.methods.base import set_module
from budgetlm.methods.calibration import HessianStat


class _SharedInputs:
    """Hands out Hessian stats that compute one H per distinct input tensor: a module called with the very
    tensor another module of the same batch already received (q/k/v, gate/up) follows that module's H."""

    def __init__(self) -> None:
        self.batch = -1
        self.seen: dict[int, tuple[torch.Tensor, _SharedHessian]] = {}
        self.order: list[_SharedHessian] = []
        self.calls: list[tuple[int, int]] = []  # (batch, id(stat)) of every call, in call order

    def stat(self) -> _SharedHessian:
        return _SharedHessian(self)

    def last_called(self, ids: set[int]) -> bool:
        """Whether, in every batch, the stats in `ids` were fed after all the others."""
        seen_last: dict[int, bool] = {}
        for batch, sid in self.calls:
            if sid in ids:
                seen_last[batch] = True
            elif seen_last.get(batch):
                return False
        return True


class _SharedHessian(HessianStat):
    def __init__(self, pool: _SharedInputs) -> None:
        super().__init__()
        self.pool = pool
        self.leader: _SharedHessian | None = None
        self.calls = 0
        self.broken = False  # the sharing pattern changed between batches: collect this one again alone

    def add(self, x: torch.Tensor) -> None:
        pool = self.pool
        if self.calls > pool.batch:  # the first module called in a new batch
            pool.batch = self.calls
            pool.seen.clear()
        pool.calls.append((self.calls, id(self)))
        hit = pool.seen.get(id(x))
        owner = hit[1] if hit is not None and hit[0] is x else None
        if self.calls == 0:
            self.leader = owner or self
            pool.order.append(self)
        elif self.leader is not self and owner is not self.leader:
            self.broken = True
        if self.leader is self:
            super().add(x)
            pool.seen[id(x)] = (x, self)
        self.calls += 1

    @property
    def hessian(self) -> torch.Tensor | None:
        return self.H if self.leader is self else self.leader.H


def _input_groups(stats: dict[str, _SharedHessian]) -> tuple[list[list[str]], list[str]]:
    """Names grouped by shared input, in the order the layer calls them; plus names never called."""
    name_of = {id(st): n for n, st in stats.items()}
    groups: dict[int, list[str]] = {}
    for st in stats[next(iter(stats))].pool.order:
        if st.broken:
            continue
        groups.setdefault(id(st.leader), []).append(name_of[id(st)])
    never = [n for n, st in stats.items() if st.calls == 0]
    return list(groups.values()), never


class _Stub(torch.nn.Module):
    """Stands in for a target Linear that its layer calls after every other target (down_proj in Llama-style
    blocks) during a Hessian pass: only its input is needed, and its output can reach no other target's input,
    so zeros of the right shape do and its matmul is skipped."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


class HessianPasses:
    """One Hessian pass over a decoder layer's calibration inputs for the `remaining` target Linears: the
    Hessian of each, grouped by shared input in call order. The modules the layer called last on the first
    pass (by name within the layer) are stubbed on later passes when that is provably harmless (they are
    called after every other target in every batch); otherwise the pass is redone without stubs."""

    def __init__(self) -> None:
        self.tail: set[str] | None = None  # local names of the last-called input group, learnt once

    def collect(self, cal, model, layer, prefix: str, remaining: dict) -> tuple[list[list[str]], list[str], dict]:
        local = {n: n[len(prefix) + 1 :] for n in remaining}
        stubbed = [n for n in remaining if self.tail and local[n] in self.tail]
        if stubbed:
            result = self._pass(cal, model, layer, remaining, stubbed)
            if result is not None:
                return result
            self.tail = set()  # the call order differs from the first layer's: no more stubs
        result = self._pass(cal, model, layer, remaining, [])
        if self.tail is None and result[0]:
            self.tail = {local[n] for n in result[0][-1]}
        return result

    def _pass(self, cal, model, layer, remaining: dict, stubbed: list[str]):
        pool = _SharedInputs()
        mods = dict(remaining)
        try:
            for n in stubbed:
                mods[n] = _Stub(remaining[n].out_features)
                set_module(model, n, mods[n])
            hs = cal.collect(layer, mods, pool.stat)
        except Exception:
            if not stubbed:
                raise
            return None
        finally:
            for n in stubbed:
                set_module(model, n, remaining[n])
        if stubbed and not pool.last_called({id(hs[n]) for n in stubbed}):
            return None
        groups, never = _input_groups(hs)
        hessians = {n: hs[n].hessian for g in groups for n in g}
        broken = [n for n, st in hs.items() if st.broken]
        if broken:  # the sharing pattern changed between batches: collect those again, one H each
            again = cal.collect(layer, {n: remaining[n] for n in broken}, HessianStat)
            hessians |= {n: st.H for n, st in again.items()}
            groups += [[n] for n in broken]
        return groups, never, hessians

"""Lo-Bi's allocation: given each item's (a Linear's, or an embedding matrix's) sensitivity and stored bytes at
every candidate grid, one candidate per item minimising the total sensitivity within a byte budget: a
multiple-choice knapsack solved exactly by dynamic programming in units of the cost increments' gcd (rounded up to
a coarser unit only above MAX_STATES states), then a greedy fill of the exact leftover budget. Pure numbers: what
the sensitivities and costs are is lobi.py's and lobi_sensitivity.py's.
"""

from __future__ import annotations

import math

import numpy as np

MAX_STATES = 200_000  # DP states (budget units) above which increments are rounded to a coarser unit


def allocate(
    sensitivity: list[list[float]], cost: list[list[int]], budget: int, max_states: int = MAX_STATES
) -> tuple[list[int], str]:
    """Multiple-choice knapsack: one option k per item l minimising Σ sensitivity[l][k] subject to
    Σ cost[l][k] ≤ budget (integer costs). Returns (choice index per item, a note on how it was solved).

    Exact DP over the increments above each item's cheapest option, in units of their gcd; if that needs more
    than `max_states` states the increments are rounded up to a coarser unit (feasible, near-exact). A greedy
    fill then spends the exact leftover budget on the best sensitivity drop per byte (never raising the total
    sensitivity). Ties prefer the solution that spends more of the budget."""
    n = len(cost)
    if n == 0:
        return [], "nothing to allocate"
    sens = [np.asarray(s, dtype=np.float64) for s in sensitivity]
    costs = [np.asarray(c, dtype=np.int64) for c in cost]
    base = [int(c.min()) for c in costs]
    slack = budget - sum(base)
    if slack < 0:
        raise ValueError(f"budget {budget} is below the cheapest allocation {sum(base)}")
    extras = [c - b for c, b in zip(costs, base, strict=True)]
    nonzero = [int(e) for ex in extras for e in ex if e > 0]
    unit = math.gcd(*nonzero) if nonzero else 1
    cap = slack // unit
    how = f"exact DP over {cap + 1} budget states of {unit} B"
    if cap > max_states:
        unit *= -(-cap // max_states)
        cap = slack // unit
        how = f"DP over {cap + 1} states of {unit} B (increments rounded up), then greedy fill"
    units = [-(-e // unit) for e in extras]  # exact when unit is the gcd
    inf = np.inf
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    picks = np.zeros((n, cap + 1), dtype=np.int16)
    for i in range(n):
        new = np.full(cap + 1, inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        for k, (u, s) in enumerate(zip(units[i], sens[i], strict=True)):
            u = int(u)
            if u > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[u:] = dp[: cap + 1 - u] + s
            better = cand < new
            new[better] = cand[better]
            pick[better] = k
        dp, picks[i] = new, pick
    finite = np.isfinite(dp)
    best = dp[finite].min()
    # among (numerically) tied optima, the one that uses the most budget
    tol = 1e-12 * max(abs(best), 1e-300)
    c = int(np.flatnonzero(finite & (dp <= best + tol)).max())
    choice = [0] * n
    for i in range(n - 1, -1, -1):
        k = int(picks[i, c])
        choice[i] = k
        c -= int(units[i][k])
    # greedy fill with the exact leftover budget
    left = budget - sum(int(costs[i][k]) for i, k in enumerate(choice))
    while True:
        best_move, best_rate = None, -1.0
        for i, k in enumerate(choice):
            for k2 in range(len(costs[i])):
                dc = int(costs[i][k2] - costs[i][k])
                ds = float(sens[i][k] - sens[i][k2])  # sensitivity drop
                if dc <= 0 or dc > left or ds < 0:
                    continue
                rate = ds / dc
                if rate > best_rate:
                    best_move, best_rate = (i, k2, dc), rate
        if best_move is None:
            break
        i, k2, dc = best_move
        choice[i] = k2
        left -= dc
    assert sum(int(costs[i][k]) for i, k in enumerate(choice)) <= budget
    return choice, how

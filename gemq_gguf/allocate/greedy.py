"""Greedy repair: turn any choice (a rounded relaxation, a MILP answer a hair over budget) into a
feasible one, then spend the leftover bits where they save the most cost per bit.

Moves are ranked by cost change per bit (a knapsack's greedy order) in a heap; every entry carries
the unit's version so moves made stale by a later move of the same unit are skipped, not searched for.
"""
from __future__ import annotations

import heapq
import itertools

import numpy as np

from .problem import AllocationProblem, cap_bits, paper_rows

_Move = tuple[float, int, int, int]
"""(key, unit, type, unit version when queued): heap entries, smallest key first."""


class _State:
    """Mutable assignment with per-group type counts, so moves can be checked for max-types in O(1).

    Groups are disjoint (validated by AllocationProblem), so each unit has at most one group.
    """

    def __init__(
        self,
        problem: AllocationProblem,
        choice: np.ndarray,
        max_types: int | None,
        locked: set[int] | None = None,
    ) -> None:
        self.p = problem
        self.choice = np.array(choice, dtype=np.int64)
        self.max_types = max_types
        self.bits = problem.bit_matrix
        self.cost = problem.cost
        self.allowed = problem.allowed
        self.locked = locked or set()
        self.version = np.zeros(problem.n_units, dtype=np.int64)
        groups = problem.groups if max_types is not None else []
        self.group = np.full(problem.n_units, -1, dtype=np.int64)
        for gi, g in enumerate(groups):
            self.group[g] = gi
        self.counts = np.zeros((len(groups), problem.n_types), dtype=np.int64)
        m = self.group >= 0
        np.add.at(self.counts, (self.group[m], self.choice[m]), 1)
        self.n_used = (self.counts > 0).sum(axis=1)
        rows = np.arange(problem.n_units)
        self.total_bits = float(self.bits[rows, self.choice].sum())

    def can_move(self, u: int, t: int) -> bool:
        if u in self.locked or not self.allowed[u, t]:
            return False
        g = self.group[u]
        if g < 0 or self.max_types is None or self.counts[g, t] > 0:
            return True
        old = self.choice[u]
        n = self.n_used[g] - (1 if self.counts[g, old] == 1 else 0)
        return bool(n + 1 <= self.max_types)

    def valid_mask(self) -> np.ndarray:
        """can_move for every (unit, type) at once."""
        ok = self.allowed.copy()
        if self.locked:
            ok[list(self.locked)] = False
        m = self.group >= 0
        if self.max_types is None or not m.any():
            return ok
        g = self.group[m]
        present = self.counts[g] > 0  # (n, T)
        alone = self.counts[g, self.choice[m]] == 1
        room = (self.n_used[g] - alone.astype(np.int64) + 1) <= self.max_types
        ok[m] &= present | room[:, None]
        return ok

    def move(self, u: int, t: int) -> None:
        old = int(self.choice[u])
        g = self.group[u]
        if g >= 0:
            self.counts[g, old] -= 1
            if self.counts[g, old] == 0:
                self.n_used[g] -= 1
            if self.counts[g, t] == 0:
                self.n_used[g] += 1
            self.counts[g, t] += 1
        self.total_bits += float(self.bits[u, t] - self.bits[u, old])
        self.choice[u] = t
        self.version[u] += 1


def _move_keys(s: _State, rows: np.ndarray, down: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For units `rows` and every type: (heap key, whether the move goes the wanted way, bits change).

    down: moves that save bits, keyed by cost added per bit saved (cheapest first).
    up: moves that save cost, keyed by -(cost saved per bit spent); -inf when they also save bits.
    """
    cur = s.choice[rows]
    dc = s.cost[rows] - s.cost[rows, cur][:, None]
    db = s.bits[rows] - s.bits[rows, cur][:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        if down:
            wanted, key = db < 0, dc / -db
        else:
            wanted, key = dc < 0, np.where(db > 0, dc / np.where(db > 0, db, 1.0), -np.inf)
    return key, wanted & s.allowed[rows], db


def _moves(s: _State, rows: np.ndarray, key: np.ndarray, mask: np.ndarray) -> list[_Move]:
    """Heap entries for the (row, type) pairs in mask."""
    uu, tt = np.nonzero(mask)
    units = rows[uu]
    return list(zip(key[uu, tt].tolist(), units.tolist(), tt.tolist(), s.version[units].tolist()))


def _heap(s: _State, down: bool, max_db: float = np.inf) -> list[_Move]:
    """All valid moves of the wanted direction that add at most max_db bits, as a heap."""
    rows = np.arange(s.p.n_units)
    key, wanted, db = _move_keys(s, rows, down)
    heap = _moves(s, rows, key, wanted & s.valid_mask() & (db <= max_db))
    heapq.heapify(heap)
    return heap


def _repair_down(s: _State, cap: float) -> bool:
    """Cheapest-per-bit downgrades until the budget holds; False if stuck."""
    if s.total_bits <= cap:
        return True
    heap = _heap(s, down=True)
    while s.total_bits > cap and heap:
        _, u, t, ver = heapq.heappop(heap)
        if ver != s.version[u] or not s.can_move(u, t):
            continue
        s.move(u, t)
        row = np.array([u])
        key, wanted, _ = _move_keys(s, row, down=True)
        for m in _moves(s, row, key, wanted):
            heapq.heappush(heap, m)
    return s.total_bits <= cap


def _fill_up(s: _State, cap: float, rounds: int = 64) -> None:
    """Spend leftover bits on the best cost-saved-per-bit upgrades that still fit.

    Only moves that fit the current slack are queued, and the queue is rebuilt whenever the slack
    halves, so large instances do not pop hundreds of thousands of moves that can no longer fit.
    """
    for _ in range(rounds):
        slack0 = cap - s.total_bits
        heap = _heap(s, down=False, max_db=slack0)
        if not heap:
            return
        moved = False
        while heap:
            _, u, t, ver = heapq.heappop(heap)
            if ver != s.version[u]:
                continue
            step = s.bits[u, t] - s.bits[u, int(s.choice[u])]
            if s.total_bits + step > cap or not s.can_move(u, t):
                continue
            s.move(u, t)
            moved = True
            row = np.array([u])
            key, wanted, db = _move_keys(s, row, down=False)
            # queue only what fits the slack left (or saves bits too)
            for m in _moves(s, row, key, wanted & ((key == -np.inf) | (db <= cap - s.total_bits))):
                heapq.heappush(heap, m)
            if cap - s.total_bits < 0.5 * slack0:
                break  # rebuild a smaller queue
        if not moved:
            return


def _enforce_max_types(problem: AllocationProblem, choice: np.ndarray, max_types: int) -> np.ndarray:
    """For each group over max_types, keep the type subset that costs least without adding bits."""
    choice = choice.copy()
    bits, cost, allowed = problem.bit_matrix, problem.cost, problem.allowed
    for g in problem.groups:
        used = np.unique(choice[g])
        if used.size <= max_types:
            continue
        cur_bits = bits[g, choice[g]]
        best: tuple[float, np.ndarray] | None = None
        for keep in itertools.combinations(used.tolist(), max_types):
            k = np.array(keep)
            b = bits[np.ix_(g, k)]
            c = np.where(allowed[np.ix_(g, k)], cost[np.ix_(g, k)], np.inf)
            ok = b <= cur_bits[:, None] * (1 + 1e-12)
            c_ok = np.where(ok, c, np.inf)
            pick = c_ok.argmin(axis=1)
            # no kept type at or below the current bits: take the smallest kept one
            none = ~np.isfinite(c_ok[np.arange(g.size), pick])
            pick[none] = np.where(np.isfinite(c[none]), b[none], np.inf).argmin(axis=1)
            total = float(c[np.arange(g.size), pick].sum())
            if best is None or total < best[0]:
                best = (total, k[pick])
        assert best is not None
        choice[g] = best[1]
    return choice


def min_bits_choice(problem: AllocationProblem) -> np.ndarray:
    """Lowest-bit allowed type per unit (cheapest cost among ties): the always-feasible start."""
    b = np.where(problem.allowed, problem.bit_matrix, np.inf)
    lo = b.min(axis=1, keepdims=True)
    c = np.where(b <= lo * (1 + 1e-12), problem.cost, np.inf)
    return c.argmin(axis=1)


def greedy_repair(
    problem: AllocationProblem,
    choice: np.ndarray,
    budget_bpw: float,
    max_types: int | None,
    paper_constraint: bool = False,
) -> np.ndarray:
    """Turn a rounded LP point into a feasible choice: max-types, paper rows, budget, then fill slack."""
    cap = cap_bits(problem, budget_bpw)
    if max_types is not None:
        choice = _enforce_max_types(problem, choice, max_types)
    locked: set[int] = set()
    if paper_constraint:
        for idx, t in paper_rows(problem):
            if (choice[idx] == t).any():
                locked.add(int(idx[choice[idx] == t][0]))
                continue
            delta = problem.cost[idx, t] - problem.cost[idx, choice[idx]]
            u = int(idx[np.argmin(delta)])
            choice = choice.copy()
            choice[u] = t
            locked.add(u)
    s = _State(problem, choice, max_types, locked)
    if not _repair_down(s, cap):
        # stuck (max-types or locked units): restart from the narrowest types, always in budget;
        # paper rows may then fail, which the caller's violations() check catches
        s = _State(problem, min_bits_choice(problem), max_types, None)
    _fill_up(s, cap)
    return s.choice

"""`patched_delta` (sampled costs' arithmetic on the sampled rows only) against `expert_delta` on whole matrices
whose unsampled rows are exact, in float64."""
from __future__ import annotations

import itertools

import pytest
import torch

from gemq_gguf.gemq.experts_math import ExpertFn, RowPatch, expert_delta, expert_pass, patched_delta

T, HIDDEN, FFN = 37, 24, 16


def _clamped_glu(gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
    """A GLU that is not act(gate) * up (gpt-oss-like), so the generic path runs."""
    assert gate is not None
    g = gate.clamp(max=0.7)
    return g * torch.sigmoid(1.702 * g) * (up.clamp(-0.7, 0.7) + 1)


def _fns(gen: torch.Generator) -> dict[str, ExpertFn]:
    silu = torch.nn.functional.silu
    bias = {p: torch.randn(n, generator=gen, dtype=torch.float64) for p, n in (("gate", FFN), ("up", FFN), ("down", HIDDEN))}
    return {"swiglu": ExpertFn(glu=lambda g, u: silu(g) * u, act=silu, bias={}, finish=None),
            "swiglu-bias": ExpertFn(glu=lambda g, u: silu(g) * u, act=silu, bias=bias, finish=None),
            "clamped-bias": ExpertFn(glu=_clamped_glu, act=None, bias=bias, finish=None)}


def _setup(seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Generator]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, HIDDEN, generator=gen, dtype=torch.float64)
    w = {"gate": torch.randn(FFN, HIDDEN, generator=gen, dtype=torch.float64) / 4,
         "up": torch.randn(FFN, HIDDEN, generator=gen, dtype=torch.float64) / 4,
         "down": torch.randn(HIDDEN, FFN, generator=gen, dtype=torch.float64) / 4}
    q = {p: v + 0.05 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for p, v in w.items()}
    return x, w, q, gen


def _rows(gen: torch.Generator, n: int, m: int) -> torch.Tensor:
    return torch.sort(torch.randperm(n, generator=gen)[:m]).values


COMBOS = [c for k in (1, 2, 3) for c in itertools.combinations(("gate", "up", "down"), k)]


@pytest.mark.parametrize("fn_name", ["swiglu", "swiglu-bias", "clamped-bias"])
@pytest.mark.parametrize("combo", COMBOS, ids="+".join)
def test_patched_delta_is_the_dense_delta_on_the_changed_rows(fn_name: str, combo: tuple[str, ...]) -> None:
    x, w, q, gen = _setup(len(combo))
    fn = _fns(gen)[fn_name]
    base = expert_pass(x, w, fn)
    patches, dense = {}, {}
    for p in combo:
        rows = _rows(gen, w[p].shape[0], 5 if p != "down" else 7)
        patches[p] = RowPatch(rows, q[p][rows])
        dense[p] = w[p].clone()
        dense[p][rows] = q[p][rows]
    want = expert_delta(base, dense)
    got, out = patched_delta(base, patches)
    if combo == ("down",):  # only the sampled output rows change: the others are exactly 0
        assert out is not None and torch.equal(out, patches["down"].rows)
        assert torch.count_nonzero(want[:, [i for i in range(HIDDEN) if i not in set(out.tolist())]]) == 0
        want = want[:, out]
    else:
        assert out is None
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert want.abs().max() > 1e-3  # the patches change the output


def test_patched_delta_with_every_row_is_the_whole_matrix_delta() -> None:
    x, w, q, gen = _setup(7)
    base = expert_pass(x, w, _fns(gen)["swiglu"])
    patches = {p: RowPatch(torch.arange(w[p].shape[0]), q[p]) for p in w}
    got, out = patched_delta(base, patches)
    assert out is None and torch.allclose(got, expert_delta(base, q), rtol=1e-10, atol=1e-12)


def test_patched_delta_refuses_a_post_expert_norm() -> None:
    x, w, q, _ = _setup(3)
    fn = ExpertFn(glu=lambda g, u: torch.nn.functional.silu(g) * u, act=None, bias={}, finish=lambda y: y / y.norm())
    with pytest.raises(ValueError, match="norm"):
        patched_delta(expert_pass(x, w, fn), {"down": RowPatch(torch.arange(2), q["down"][:2])})

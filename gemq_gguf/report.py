"""Reports of an allocation: terminal table, JSON file, heatmap PNG.

Everything is a pure function of an `Allocation` (self-contained: units, types, costs, bits) plus
optional free-form extras the caller adds (never-routed experts, file size, whole-file bpw...),
so the CLI can print the same numbers it writes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from gemq_gguf.allocate import Allocation, bpw_of, granularity
from gemq_gguf.allocate.joint import TensorChoice
from gemq_gguf.errors import GemqError

PROJ_ORDER = {"gate": 0, "up": 1, "gate_up": 2, "down": 3}
HEATMAP_DPI = 100


@dataclass(frozen=True)
class LayerRow:
    """Per-layer summary: units per type, bits, params, predicted cost."""

    layer: int
    counts: dict[str, int]
    params: float
    bits: float
    cost: float

    @property
    def bpw(self) -> float:
        return self.bits / self.params

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "units_per_type": dict(self.counts),
            "params": self.params,
            "bits": self.bits,
            "bpw": self.bpw,
            "predicted_cost": self.cost,
        }


def type_order(alloc: Allocation) -> list[int]:
    """Type indices sorted by bits per weight (narrowest first), ties by name."""
    bpw = type_bpws(alloc)
    return sorted(range(len(alloc.types)), key=lambda i: (bpw[i], alloc.types[i]))


def type_bpws(alloc: Allocation) -> np.ndarray:
    """bpw per type: stored in the allocation, else ggml's own, else measured from the units."""
    if alloc.type_bpw is not None:
        return np.asarray(alloc.type_bpw, dtype=np.float64)
    out = np.empty(len(alloc.types))
    for i, t in enumerate(alloc.types):
        try:
            out[i] = bpw_of([t])[0]
        except GemqError:
            m = alloc.type_index == i
            out[i] = alloc.unit_bits[m].sum() / alloc.unit_params[m].sum() if m.any() else np.inf
    return out


def layer_rows(alloc: Allocation) -> list[LayerRow]:
    """One row per layer, in layer order."""
    layers = np.array([u[0] for u in alloc.units], dtype=np.int64)
    rows = []
    for layer in np.unique(layers):
        m = layers == layer
        counts = {alloc.types[i]: int((alloc.type_index[m] == i).sum()) for i in type_order(alloc)}
        rows.append(
            LayerRow(
                layer=int(layer),
                counts=counts,
                params=float(alloc.unit_params[m].sum()),
                bits=float(alloc.unit_bits[m].sum()),
                cost=float(alloc.unit_cost[m].sum()),
            )
        )
    return rows


def type_totals(alloc: Allocation) -> dict[str, dict[str, float]]:
    """Per type: units, share of routed-expert weights, predicted cost."""
    total_params = alloc.total_params
    out = {}
    for i in type_order(alloc):
        m = alloc.type_index == i
        out[alloc.types[i]] = {
            "units": int(m.sum()),
            "weight_share": float(alloc.unit_params[m].sum() / total_params),
            "predicted_cost": float(alloc.unit_cost[m].sum()),
        }
    return out


def _fmt_cost(x: float) -> str:
    return f"{x:.3g}"


def allocation_table(alloc: Allocation) -> Table:
    """Rich table: per layer, units per type (narrowest first; types nobody got are left out and
    named in the caption), layer bpw, predicted cost and its share; a totals row."""
    gran = granularity(alloc.units)
    unit_word = {"expert": "experts", "expert-proj": "expert-projections", "tensor": "tensors"}[gran]
    gap = "n/a" if np.isnan(alloc.gap) else f"{alloc.gap:.1e}"
    title = (
        f"{alloc.strategy} ({gran}): {alloc.bpw:.4f} bpw of {alloc.budget_bpw:g} budget, "
        f"predicted loss increase {_fmt_cost(alloc.total_cost)}"
    )
    used = set(alloc.type_index.tolist())
    order = [i for i in type_order(alloc) if i in used]
    unused = [alloc.types[i] for i in type_order(alloc) if i not in used]
    caption = f"cells: {unit_word} per type; solver {alloc.method}, {alloc.status}, gap {gap}, {alloc.seconds:.2f} s"
    if unused:
        caption += f"; unused: {', '.join(unused)}"
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1))
    table.add_column("layer", justify="right", no_wrap=True)
    for i in order:
        table.add_column(alloc.types[i], justify="right", no_wrap=True)
    for name in ("bpw", "cost", "share"):
        table.add_column(name, justify="right", no_wrap=True)
    total_cost = alloc.total_cost
    for r in layer_rows(alloc):
        share = r.cost / total_cost if total_cost > 0 else 0.0
        table.add_row(
            str(r.layer),
            *[str(r.counts[alloc.types[i]]) if r.counts[alloc.types[i]] else "·" for i in order],
            f"{r.bpw:.3f}",
            _fmt_cost(r.cost),
            f"{100 * share:.1f}%",
        )
    totals = type_totals(alloc)
    table.add_section()
    table.add_row(
        "all",
        *[str(totals[alloc.types[i]]["units"]) for i in order],
        f"{alloc.bpw:.3f}",
        _fmt_cost(total_cost),
        "100%",
        style="bold",
    )
    return table


def extras_lines(extras: Mapping[str, Any] | None, max_items: int = 12) -> list[str]:
    """One printable line per extra section (long lists are shortened; the JSON has them in full)."""
    lines = []
    for key, val in (extras or {}).items():
        if isinstance(val, (list, tuple)):
            shown = ", ".join(str(v) for v in val[:max_items])
            more = f" … (+{len(val) - max_items})" if len(val) > max_items else ""
            lines.append(f"{key} ({len(val)}): {shown}{more}")
        elif isinstance(val, Mapping):
            lines.append(f"{key}: " + ", ".join(f"{k}={v}" for k, v in val.items()))
        else:
            lines.append(f"{key}: {val}")
    return lines


def print_allocation(
    alloc: Allocation, extras: Mapping[str, Any] | None = None, console: Console | None = None
) -> None:
    """Print the table and the extras to the terminal."""
    console = console or Console()
    console.print(allocation_table(alloc))
    for line in extras_lines(extras):
        console.print(line, highlight=False)


def report_dict(alloc: Allocation, extras: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """JSON-ready report: every unit's type and cost, totals, solver stats, per-layer rows, extras."""
    d = alloc.to_dict()
    d["granularity"] = granularity(alloc.units)
    d["layers"] = [r.to_dict() for r in layer_rows(alloc)]
    d["type_totals"] = type_totals(alloc)
    for key, val in (extras or {}).items():
        if key in d:
            raise ValueError(f"extra section {key!r} would overwrite a report field")
        d[key] = val
    return d


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(path: str | Path, alloc: Allocation, extras: Mapping[str, Any] | None = None) -> Path:
    """Write the report; returns the path."""
    path = Path(path)
    path.write_text(json.dumps(report_dict(alloc, extras), indent=1, default=_json_default) + "\n")
    return path


def read_json(path: str | Path) -> tuple[Allocation, dict[str, Any]]:
    """Load a report: the allocation and the full dict (extras included)."""
    d = json.loads(Path(path).read_text())
    return Allocation.from_dict(d), d


# ----------------------------------------------------------------------------- heatmap


def heatmap_panels(alloc: Allocation) -> list[tuple[str, list[int], list[str], np.ndarray]]:
    """(panel title, layer ids, column labels, grid of type indices with -1 = no unit) per panel.

    expert: one panel layer x expert; expert-proj: one panel per projection; tensor: layer x proj.
    """
    layers = sorted({u[0] for u in alloc.units})
    lpos = {l: i for i, l in enumerate(layers)}
    gran = granularity(alloc.units)
    if gran == "tensor":
        projs = sorted({str(u[2]) for u in alloc.units}, key=lambda p: (PROJ_ORDER.get(p, 9), p))
        ppos = {p: i for i, p in enumerate(projs)}
        grid = np.full((len(layers), len(projs)), -1, dtype=np.int64)
        for u, t in zip(alloc.units, alloc.type_index):
            grid[lpos[u[0]], ppos[str(u[2])]] = t
        return [("tensor (all experts of a layer-projection)", layers, projs, grid)]
    projs_all = sorted({u[2] for u in alloc.units}, key=lambda p: (PROJ_ORDER.get(str(p), 9), str(p)))
    panels = []
    for proj in projs_all:
        sel = [(u, t) for u, t in zip(alloc.units, alloc.type_index) if u[2] == proj]
        experts = sorted({int(u[1]) for u, _ in sel if u[1] is not None})
        epos = {e: i for i, e in enumerate(experts)}
        grid = np.full((len(layers), len(experts)), -1, dtype=np.int64)
        for u, t in sel:
            if u[1] is not None:
                grid[lpos[u[0]], epos[int(u[1])]] = t
        title = "experts (gate/up/down share a type)" if proj is None else f"{proj}_proj"
        panels.append((title, layers, [str(e) for e in experts], grid))
    return panels


def heatmap_figsize(alloc: Allocation) -> tuple[float, float]:
    """Figure size in inches: grows with the grid, clamped so huge models still render legibly."""
    panels = heatmap_panels(alloc)
    n_layers = len(panels[0][1])
    n_cols = max(len(p[2]) for p in panels)
    width = float(np.clip(2.0 + 0.05 * n_cols, 6.0, 20.0)) + 2.2  # + legend
    panel_h = float(np.clip(0.8 + 0.14 * n_layers, 2.5, 12.0))
    return width, panel_h * len(panels) + 1.1  # + title and bottom labels


def heatmap_size(alloc: Allocation, dpi: int = HEATMAP_DPI) -> tuple[int, int]:
    """Pixel size (width, height) of the PNG `plot_heatmap` writes."""
    w, h = heatmap_figsize(alloc)
    return int(round(w * dpi)), int(round(h * dpi))


def tensor_section(tensors: TensorChoice) -> dict[str, Any]:
    """The report's non-expert tensors of a whole-file allocation: each one's type, bits, predicted loss
    increase (cost), and the totals."""
    return {"tensors": tensors.rows(), "bits": tensors.total_bits, "params": tensors.total_params,
            "bpw": tensors.total_bits / max(tensors.total_params, 1.0),
            "predicted_loss_increase": float(tensors.cost.sum())}


def tensor_panel(tensors: TensorChoice, types: list[str]) -> tuple[str, list[int], list[str], np.ndarray]:
    """The heatmap strip of the non-expert tensors: layer x tensor kind (attn_q, ffn_down_shexp, ...;
    token_embd and output on the row of layer -1), cells = index into `types`, -1 = no such tensor."""
    def kind(name: str) -> str:
        parts = name.removesuffix(".weight").split(".")
        return ".".join(parts[2:]) if parts[0] == "blk" else ".".join(parts)
    layers = sorted({int(r["layer"]) for r in tensors.rows()})
    kinds = sorted({kind(n) for n in tensors.names}, key=lambda k: (k in ("token_embd", "output"), k))
    lpos, kpos, tpos = ({v: i for i, v in enumerate(x)} for x in (layers, kinds, types))
    grid = np.full((len(layers), len(kinds)), -1, dtype=np.int64)
    for r in tensors.rows():
        grid[lpos[int(r["layer"])], kpos[kind(r["name"])]] = tpos[r["type"]]
    return "non-expert tensors (layer -1: token_embd, output)", layers, kinds, grid


def plot_heatmap(
    alloc: Allocation, path: str | Path, title: str | None = None, dpi: int = HEATMAP_DPI,
    tensors: TensorChoice | None = None,
) -> Path:
    """Layer x expert map colored by type (ordered by bpw, legend with counts); one panel per
    projection at expert-proj granularity, and with `tensors` (a whole-file allocation) a strip of the
    non-expert tensors per layer. Uses the Agg canvas directly: no pyplot, no global state."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    extra = [] if tensors is None else sorted({t for t in tensors.types if t not in alloc.types})
    types = list(alloc.types) + extra
    bpw = np.concatenate([type_bpws(alloc), bpw_of(extra)]) if extra else type_bpws(alloc)
    order = sorted(range(len(types)), key=lambda i: (bpw[i], types[i]))
    rank = np.empty(len(types), dtype=np.int64)
    rank[order] = np.arange(len(order))
    n_t = len(order)
    cmap_src = matplotlib.colormaps["viridis"]
    colors = [cmap_src(x) for x in np.linspace(0.0, 1.0, max(n_t, 2))][:n_t]
    cmap = ListedColormap(colors).with_extremes(bad=(0.88, 0.88, 0.88, 1.0))
    norm = BoundaryNorm(np.arange(n_t + 1) - 0.5, n_t)

    panels = heatmap_panels(alloc)
    w_fig, h_fig = heatmap_figsize(alloc)
    counts = np.bincount(alloc.type_index, minlength=len(types))
    if tensors is not None:
        h_fig += (h_fig - 1.1) / len(panels) + 0.8  # + the strip's turned labels
        panels.append(tensor_panel(tensors, types))
        counts += np.bincount(panels[-1][3][panels[-1][3] >= 0], minlength=len(types))
    fig = Figure(figsize=(w_fig, h_fig), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (ptitle, layers, cols, grid) in zip(axes, panels):
        img = np.where(grid >= 0, rank[np.maximum(grid, 0)], -1).astype(float)
        img = np.ma.masked_less(img, 0)
        ax.imshow(img, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        ax.set_title(ptitle, fontsize=9)
        ax.set_ylabel("layer")
        is_tensors = tensors is not None and ax is axes[-1]
        ax.set_xlabel("tensor" if is_tensors else "projection" if granularity(alloc.units) == "tensor" else "expert")
        ystep = max(1, len(layers) // 16)
        ax.set_yticks(range(0, len(layers), ystep), [str(l) for l in layers[::ystep]], fontsize=7)
        xstep = max(1, len(cols) // 32)
        turn = {"rotation": 60, "ha": "right"} if is_tensors else {}
        ax.set_xticks(range(0, len(cols), xstep), cols[::xstep], fontsize=7, **turn)
    handles = [
        Patch(color=colors[r], label=f"{types[i]} ({bpw[i]:.4g} bpw): {counts[i]}")
        for r, i in enumerate(order)
    ]
    fig.legend(handles=handles[::-1], loc="center right", fontsize=8, frameon=False, title="type (widest on top)")
    fig.suptitle(
        title
        or f"{alloc.strategy}: {alloc.bpw:.3f} bpw (budget {alloc.budget_bpw:g}), "
        f"predicted loss increase {alloc.total_cost:.4g}",
        fontsize=10,
    )
    w_in, h_in = fig.get_size_inches()
    bottom = 0.5 if tensors is None else 1.3
    fig.subplots_adjust(left=0.6 / w_in, right=1 - 2.4 / w_in, top=1 - 0.55 / h_in, bottom=bottom / h_in, hspace=0.5)
    path = Path(path)
    fig.savefig(path, dpi=dpi, format="png")
    return path

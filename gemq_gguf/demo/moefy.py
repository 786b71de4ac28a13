"""MoEfication of a dense SwiGLU Llama: neuron partition, linear routers, down-projection refit.

1. Partition. In every layer the I FFN neurons are split into E equal groups by balanced spherical k-means on their
   |activation| profiles over calibration tokens (neurons that fire together end up in the same expert). Expert e
   is the slice of gate_proj / up_proj rows and down_proj columns of group e: the experts are real weights.
2. Routers. Per layer a bias-free linear router (hidden -> E, as in Mixtral) is trained layer-locally on the dense
   model's FFN inputs with a listwise softmax cross-entropy against the normalised contribution norms
   ||down_g(act_g(x))|| of the groups: it learns to rank the groups by how much they matter for each token.
3. Scale. Mixtral renormalises the top-K softmax weights to sum to 1 while the dense FFN is the plain sum of its
   groups, so each router is scaled per layer (per K) so that on 90% of calibration tokens every renormalised top-K
   weight is within +-15% of 1/K, and the refit below absorbs the factor K (top-K selection ignores the scale).
4. Refit. Dropping E-K of the E groups per token is lossy, so each layer's down projection is refitted by ridge
   regression (pulled toward K x the dense weights) so that the routed sparse FFN, exactly as Mixtral computes it,
   best reproduces the dense FFN output on the calibration tokens. gate/up (w1/w3) stay exact dense slices.

Everything works on the unpadded dense model (see pad.py for the padding, applied at the very end).
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

TRAIN_TOKENS = 8192  # calibration tokens (sampled) per layer for the partition and the router


def _progress(it, **kw):
    from tqdm.auto import tqdm
    return tqdm(it, **kw)


# ----------------------------------------------------------------------------------------------------------------
# 1. Partition
# ----------------------------------------------------------------------------------------------------------------
def balanced_assign(S: np.ndarray, cap: int) -> np.ndarray:
    """Assign each row of the score matrix S [n, E] to a column, exactly cap rows per column (n = E * cap):
    in rounds, every unassigned row bids for its best non-full column and an over-subscribed column keeps its
    highest-scoring bidders."""
    n, E = S.shape
    if n != E * cap:
        raise ValueError(f"{n} rows do not fill {E} columns of {cap}")
    assign, room = np.full(n, -1), np.full(E, cap)
    while (assign < 0).any():
        un = np.where(assign < 0)[0]
        Su = S[un].copy()
        Su[:, room == 0] = -np.inf
        best = Su.argmax(1)
        for e in np.unique(best):
            cand = un[best == e]
            if len(cand) > room[e]:
                cand = cand[np.argsort(-S[cand, e], kind="stable")[:room[e]]]
            assign[cand] = e
            room[e] -= len(cand)
    return assign


def balanced_kmeans(X: np.ndarray, E: int, iters: int = 25, seed: int = 0) -> np.ndarray:
    """Spherical k-means with equal cluster sizes on the rows of X. Returns labels [n]."""
    X = X / (np.linalg.norm(X, axis=1, keepdims=True) + 1e-8)
    C = X[np.random.RandomState(seed).choice(len(X), E, replace=False)]
    labels = None
    for _ in range(iters):
        new = balanced_assign(X @ C.T, len(X) // E)
        if labels is not None and (new == labels).all():
            break
        labels = new
        C = np.stack([X[labels == e].mean(0) for e in range(E)])
        C /= np.linalg.norm(C, axis=1, keepdims=True) + 1e-8
    return labels


def ffn_act(mlp, h: torch.Tensor) -> torch.Tensor:
    return F.silu(mlp.gate_proj(h)) * mlp.up_proj(h)


@torch.no_grad()
def coactivation_partition(act: torch.Tensor, E: int, seed: int) -> np.ndarray:
    """[E, I/E] sorted neuron indices: balanced k-means of the neurons' |activation| profiles act [N, I]."""
    labels = balanced_kmeans(act.abs().T.double().cpu().numpy(), E, seed=seed)
    return np.stack([np.where(labels == e)[0] for e in range(E)])


# ----------------------------------------------------------------------------------------------------------------
# 2-3. Routers
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def group_contribution_norms(act: torch.Tensor, down: torch.Tensor, groups: np.ndarray) -> torch.Tensor:
    """c [N, E] = || down[:, g] @ act[:, g] || for every neuron group g (act [N, I], down [hidden, I])."""
    return torch.stack([F.linear(act[:, g], down[:, g]).norm(dim=-1)
                        for g in torch.from_numpy(np.asarray(groups, dtype=np.int64))], 1)


def train_router(h: torch.Tensor, c: torch.Tensor, steps: int = 100, lr: float = 1e-2, seed: int = 0) -> torch.Tensor:
    """Bias-free linear router W [E, hidden]: full-batch Adam on softmax cross-entropy against c / sum(c)."""
    target = c / c.sum(1, keepdim=True)
    W0 = torch.randn(c.shape[1], h.shape[1], generator=torch.Generator().manual_seed(seed)) * 1e-3
    W = torch.nn.Parameter(W0.to(h.device))
    opt = torch.optim.Adam([W], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = -(target * F.log_softmax(h @ W.T, 1)).sum(1).mean()
            loss.backward()
            opt.step()
    return W.detach()


def router_scale(logits: torch.Tensor, K: int, max_dev: float = 0.15, q: float = 0.9) -> float:
    """Largest s such that, for a fraction q of tokens, all K renormalised top-K softmax weights of s * logits are
    within max_dev (relative) of 1/K. Bisection; the deviation grows monotonically with s."""
    top = logits.topk(K, 1).values.double()

    def dev(s: float) -> float:
        return torch.quantile((K * torch.softmax(s * top, 1) - 1).abs().max(1).values, q).item()

    lo, hi = 0.0, 1.0
    while dev(hi) < max_dev and hi < 1e6:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if dev(mid) < max_dev else (lo, mid)
    return lo


@torch.no_grad()
def train_layer(mlp, h: torch.Tensor, E: int, top_ks=(2, 3, 4), max_dev: float = 0.15, seed: int = 0,
                n_tok: int = TRAIN_TOKENS):
    """Partition + router of one layer from its dense FFN inputs h [N, hidden], on n_tok tokens sampled from h.
    Returns (groups [E, I/E], unscaled router [E, hidden], {K: scale}, {K: recall}) where recall = overlap of the
    router's top-K with the oracle top-K (by contribution norm) on these tokens."""
    idx = torch.from_numpy(np.random.RandomState(seed).choice(len(h), min(n_tok, len(h)), replace=False))
    h = h[idx]
    act = ffn_act(mlp, h)
    groups = coactivation_partition(act, E, seed=seed)
    c = group_contribution_norms(act, mlp.down_proj.weight, groups)
    del act
    W = train_router(h, c, seed=seed)
    logits = h @ W.T
    scale, recall = {}, {}
    for K in top_ks:
        scale[K] = router_scale(logits, K, max_dev)
        hit = torch.zeros_like(c).scatter_(1, logits.topk(K, 1).indices, 1.0) * \
            torch.zeros_like(c).scatter_(1, c.topk(K, 1).indices, 1.0)
        recall[K] = hit.sum(1).mean().item() / K
    return groups, W.float().cpu().contiguous(), scale, recall


def _new_res(top_ks) -> dict:
    return {"experts": [], "router": [], "scale": {k: [] for k in top_ks}, "recall": {k: [] for k in top_ks}}


def _append(res: dict, groups, W, scale, recall) -> None:
    res["experts"].append(groups)
    res["router"].append(W)
    for K in res["scale"]:
        res["scale"][K].append(scale[K])
        res["recall"][K].append(recall[K])


@torch.no_grad()
def train_routers(model, H: list[torch.Tensor], E: int, top_ks=(2, 3, 4), max_dev: float = 0.15,
                  seed: int = 0, progress: bool = True) -> dict:
    """Layer-local MoEfication on the dense model's FFN inputs H (list over layers of [N, hidden]).
    Returns {"experts": [L x [E, I/E]], "router": [L x [E, hidden]] (unscaled), "scale": {K: [L floats]},
    "recall": {K: [L floats]}}."""
    res = _new_res(top_ks)
    layers = list(enumerate(model.model.layers))
    for l, layer in _progress(layers, desc="partition + routers", unit="layer", disable=not progress):
        _append(res, *train_layer(layer.mlp, H[l], E, top_ks, max_dev, seed + l))
    return res


def routers_for(res: dict, K: int) -> list[torch.Tensor]:
    """The Mixtral router matrices (scaled for top-K) of every layer."""
    if K not in res["scale"]:
        raise ValueError(f"the routers file has scales for top-k {sorted(res['scale'])}, not {K}")
    return [(W * s).float() for W, s in zip(res["router"], res["scale"][K])]


def save_routers(path: str | os.PathLike, res: dict, meta: dict) -> None:
    from safetensors.torch import save_file
    t = {}
    for l, (g, W) in enumerate(zip(res["experts"], res["router"])):
        t[f"layers.{l}.experts"] = torch.from_numpy(np.asarray(g, dtype=np.int16))  # [E, I/E] neuron ids
        t[f"layers.{l}.router"] = W.float().contiguous()                            # [E, hidden], unscaled
    md = {**meta, "scale": {str(k): v for k, v in res["scale"].items()},
          "recall": {str(k): v for k, v in res["recall"].items()}}
    tmp = f"{path}.tmp"
    save_file(t, tmp, metadata={k: json.dumps(v) for k, v in md.items()})
    os.replace(tmp, path)


def load_routers(path: str | os.PathLike) -> tuple[dict, dict]:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        L = len([k for k in f.keys() if k.endswith(".router")])
        res = {"experts": [f.get_tensor(f"layers.{l}.experts").long().numpy() for l in range(L)],
               "router": [f.get_tensor(f"layers.{l}.router") for l in range(L)],
               "scale": {int(k): v for k, v in meta["scale"].items()},
               "recall": {int(k): v for k, v in meta.get("recall", {}).items()}}
    return res, meta


# ----------------------------------------------------------------------------------------------------------------
# The routed FFN on the dense weights (reference) and the refit
# ----------------------------------------------------------------------------------------------------------------
def neuron_expert(groups: np.ndarray) -> torch.Tensor:
    """[I]: the expert of each FFN neuron."""
    E, g = groups.shape
    ne = torch.empty(E * g, dtype=torch.long)
    ne[torch.from_numpy(np.asarray(groups, dtype=np.int64)).reshape(-1)] = torch.arange(E).repeat_interleave(g)
    return ne


def mixtral_weights(h: torch.Tensor, router: torch.Tensor, K: int) -> torch.Tensor:
    """[N, E]: Mixtral's expert weights (softmax, top-K, renormalised to sum 1; 0 for unrouted experts)."""
    probs = torch.softmax(F.linear(h, router).float(), -1)
    w, idx = probs.topk(K, -1)
    return torch.zeros_like(probs).scatter_(-1, idx, w / w.sum(-1, keepdim=True))


class MoEFFN(torch.nn.Module):
    """Mixtral's sparse block expressed on the dense weights: out = sum_e w_e(x) * W2_e act_e(x), with W2 = `down`
    (the refitted [hidden, I] matrix, or K x the dense down_proj). Used for calibration, evaluation and as the
    reference the checkpoint must reproduce."""

    def __init__(self, mlp, groups: np.ndarray, router: torch.Tensor, K: int, down: torch.Tensor | None = None):
        super().__init__()
        self.mlp, self.router, self.K = mlp, router, K
        self.down = mlp.down_proj.weight * K if down is None else down
        self.neuron_expert = neuron_expert(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, x.shape[-1])
        z = ffn_act(self.mlp, h) * mixtral_weights(h, self.router, self.K)[:, self.neuron_expert]
        return F.linear(z, self.down).reshape(x.shape)


def _routed_features(act: torch.Tensor, h: torch.Tensor, groups, router: torch.Tensor, K: int):
    """Z [N, E, g] = act(h) of each expert's neurons times its Mixtral weight (0 for unrouted experts), and the
    routing mask [N, E]."""
    G = torch.from_numpy(np.asarray(groups, dtype=np.int64))
    w = mixtral_weights(h, router, K)
    return act[:, G] * w[:, :, None], w > 0


def _accumulate(A: torch.Tensor, B: torch.Tensor, Z: torch.Tensor, routed: torch.Tensor, Y: torch.Tensor) -> None:
    """A += Z^T Z, B += Z^T Y in expert-major neuron order, skipping the zero blocks of unrouted experts."""
    N, E, g = Z.shape
    Zf = Z.reshape(N, E * g)
    for e in range(E):
        rows = routed[:, e].nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        Ze = Z[rows, e]                                    # [n_e, g]
        A[e * g:(e + 1) * g] += (Ze.T @ Zf[rows]).double()  # row block e of Z^T Z
        B[e * g:(e + 1) * g] += (Ze.T @ Y[rows]).double()


@torch.no_grad()
def refit_layer(mlp, h: torch.Tensor, groups, router: torch.Tensor, K: int, lam: float = 0.1,
                target: torch.Tensor | None = None, chunk: int = 4096) -> torch.Tensor:
    """The [hidden, I] down projection D' (Mixtral's w2 of all experts side by side) minimising
        ||Z D'^T - Y||^2 + lam * mean(diag(Z^T Z)) * ||D' - K D||^2,   Z = act(h) * w_expert(h)[neuron]
    over the FFN inputs h; Y = target, or the dense FFN output D act(h) when target is None."""
    G = torch.from_numpy(np.asarray(groups, dtype=np.int64)).reshape(-1)  # expert-major neuron order
    D = mlp.down_proj.weight
    I = D.shape[1]
    A = torch.zeros(I, I, dtype=torch.float64, device=D.device)
    B = torch.zeros(I, D.shape[0], dtype=torch.float64, device=D.device)
    for i in range(0, len(h), chunk):
        hc = h[i:i + chunk]
        a = ffn_act(mlp, hc)
        Z, routed = _routed_features(a, hc, groups, router, K)
        y = F.linear(a, D) if target is None else target[i:i + chunk]
        _accumulate(A, B, Z, routed, y)
    return _solve_down(A, B, D, G, K, lam)


def _solve_down(A, B, D, G, K, lam):
    reg = lam * A.diagonal().mean()
    I = A.shape[0]
    prior = (D[:, G].double() * K).T
    sol = torch.linalg.solve(A + reg * torch.eye(I, dtype=torch.float64, device=A.device), B + reg * prior)  # [I (expert-major), hidden]
    out = torch.empty(D.shape[0], I, dtype=torch.float32, device=A.device)
    out[:, G] = sol.T.float()                                                               # back to neuron order
    return out.contiguous()


@torch.no_grad()
def refit_down_proj(model, H: list[torch.Tensor], experts, routers, K: int, lam: float = 0.1,
                    progress: bool = True) -> list[torch.Tensor]:
    """Layer-local refit on the dense model's FFN inputs H: the routed sparse FFN best reproduces the dense FFN."""
    layers = list(enumerate(model.model.layers))
    return [refit_layer(layer.mlp, H[l], experts[l], routers[l], K, lam)
            for l, layer in _progress(layers, desc="refit down_proj", unit="layer", disable=not progress)]


class _Recorder(torch.nn.Module):
    """Stands in for a layer's FFN: records its input, outputs zeros (so the layer returns the attention residual)."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.reshape(-1, x.shape[-1]).clone())
        return torch.zeros_like(x)


def _layer_kwargs(model, x: torch.Tensor) -> dict:
    """The keyword arguments (causal mask, rotary embeddings, ...) the model passes to its decoder layers for a batch
    shaped like x [bs, T]: captured by a pre-hook on layer 0 during a forward call that the hook then stops."""
    captured = {}

    class _Stop(Exception):
        pass

    def hook(mod, args, kwargs):
        captured.update(kwargs)
        raise _Stop

    hk = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.model(input_ids=x, use_cache=False)
    except _Stop:
        pass
    finally:
        hk.remove()
    for k in ("cache", "past_key_values", "past_key_value"):  # never carry a KV cache between batches
        captured.pop(k, None)
    captured["use_cache"] = False
    return captured


def _out(o):
    return o[0] if isinstance(o, tuple) else o


@torch.no_grad()
def moefy_sequential(model, windows: torch.Tensor, E: int, K: int, res: dict | None = None, lam: float = 0.1,
                     top_ks=(2, 3, 4), max_dev: float = 0.15, seed: int = 0, bs: int = 8, chunk: int = 4096,
                     progress: bool = True) -> tuple[dict, list[torch.Tensor]]:
    """MoEfy layer by layer while propagating two residual streams over the calibration windows: the dense model's
    and the MoE's (all earlier layers already routed). At layer l:
      * (if res is None) partition + router are trained on the dense stream's FFN inputs, exactly as train_routers;
      * the down projection is refitted so that the MoE stream's routed FFN, fed the MoE stream's own FFN inputs,
        brings its residual stream back to the dense one: target Y = x_dense[l+1] - (x_moe[l] + attn(x_moe[l])).
    This corrects the error accumulated by earlier layers instead of only imitating each FFN in isolation.
    Returns (res, downs). Memory: a few [N, hidden] tensors (N = calibration tokens), independent of depth."""
    train = res is None
    if train:
        res = _new_res(top_ks)
    batches = [windows[i:i + bs] for i in range(0, len(windows), bs)]
    kw = {}
    for b in batches:
        if b.shape not in kw:
            kw[b.shape] = _layer_kwargs(model, b)
    x_d = [model.model.embed_tokens(b) for b in batches]
    x_m = [x.clone() for x in x_d]
    downs = []
    layers = list(enumerate(model.model.layers))
    for l, layer in _progress(layers, desc="MoEfy (sequential refit)", unit="layer", disable=not progress):
        mlp = layer.mlp
        rec = _Recorder()
        layer.mlp = rec
        try:
            r_d = [_out(layer(x, **kw[b.shape])) for x, b in zip(x_d, batches)]
            h_d = torch.cat(rec.seen)
            rec.seen.clear()
            r_m = [_out(layer(x, **kw[b.shape])) for x, b in zip(x_m, batches)]
            h_m = torch.cat(rec.seen)
        finally:
            layer.mlp = mlp
        if train:
            _append(res, *train_layer(mlp, h_d, E, top_ks, max_dev, seed + l))
        router = (res["router"][l] * res["scale"][K][l]).to(h_d.device)
        y_dense = mlp(h_d)
        x_d = [r + y.reshape(r.shape) for r, y in zip(r_d, y_dense.split([r.numel() // r.shape[-1] for r in r_d]))]
        target = torch.cat([(xd - rm).reshape(-1, rm.shape[-1]) for xd, rm in zip(x_d, r_m)])
        G = torch.from_numpy(np.asarray(res["experts"][l], dtype=np.int64)).reshape(-1)
        D = mlp.down_proj.weight
        A = torch.zeros(len(G), len(G), dtype=torch.float64, device=D.device)
        B = torch.zeros(len(G), D.shape[0], dtype=torch.float64, device=D.device)
        Zs = []
        for i in range(0, len(h_m), chunk):
            hc = h_m[i:i + chunk]
            Z, routed = _routed_features(ffn_act(mlp, hc), hc, res["experts"][l], router, K)
            _accumulate(A, B, Z, routed, target[i:i + chunk])
            Zs.append(Z.reshape(len(hc), -1))
        down = _solve_down(A, B, D, G, K, lam)
        downs.append(down)
        y_moe = F.linear(torch.cat(Zs), down[:, G])
        x_m = [r + y.reshape(r.shape) for r, y in zip(r_m, y_moe.split([r.numel() // r.shape[-1] for r in r_m]))]
        del h_d, h_m, r_d, r_m, y_dense, y_moe, target, Zs, A, B
    return res, downs


@torch.no_grad()
def capture_ffn_inputs(model, windows: torch.Tensor, bs: int = 4, progress: bool = True) -> list[torch.Tensor]:
    """The (post-RMSNorm) FFN input of every layer for all tokens of `windows` [n, T]: list over layers of [N, hidden]."""
    store: list[list[torch.Tensor]] = [[] for _ in model.model.layers]

    def hook(l):
        return lambda m, inp, out: store[l].append(inp[0].reshape(-1, inp[0].shape[-1]).clone())

    hooks = [layer.mlp.register_forward_hook(hook(l)) for l, layer in enumerate(model.model.layers)]
    try:
        for i in _progress(range(0, len(windows), bs), desc="calibration pass", unit="batch", disable=not progress):
            model.model(input_ids=windows[i:i + bs])
    finally:
        for hk in hooks:
            hk.remove()
    return [torch.cat(s) for s in store]

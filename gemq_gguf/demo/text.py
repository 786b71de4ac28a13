"""The text shipped with the package (gemq_gguf/data/{calib,eval}/{prose,tech,code,math}.txt) as token windows,
and perplexity."""
from __future__ import annotations

import math
import pathlib
from importlib import resources

import torch
import torch.nn.functional as F

DOMAINS = ("prose", "tech", "code", "math")
SEQ_LEN = 512
CALIB_WINDOWS = 8    # per domain: 4 x 8 x 512 = 16384 calibration tokens
EVAL_WINDOWS = 8     # per domain: 4096 evaluation tokens per domain (context 512)


def data_file(split: str, domain: str) -> pathlib.Path:
    """Path of a shipped text file (split 'calib' or 'eval')."""
    p = resources.files("gemq_gguf").joinpath("data", split, f"{domain}.txt")
    return pathlib.Path(str(p))


def read_text(split: str, domain: str) -> str:
    with open(data_file(split, domain), encoding="utf-8", errors="replace", newline="") as f:
        return f.read()


def token_windows(tok, text: str, n: int, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """n windows of seq_len tokens, evenly spread over the tokenised text (non-overlapping when it is long enough).
    LongTensor [n, seq_len]."""
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < seq_len:
        raise ValueError(f"text of {len(ids)} tokens is shorter than one window of {seq_len}")
    span = len(ids) - seq_len
    starts = [round(span * j / max(n - 1, 1)) for j in range(n)]
    return torch.tensor([ids[s:s + seq_len] for s in starts], dtype=torch.long)


def domain_windows(tok, split: str, n_per_domain: int, domains=DOMAINS, seq_len: int = SEQ_LEN) -> dict:
    return {d: token_windows(tok, read_text(split, d), n_per_domain, seq_len) for d in domains}


def calibration_windows(tok, n_per_domain: int = CALIB_WINDOWS) -> torch.Tensor:
    return torch.cat(list(domain_windows(tok, "calib", n_per_domain).values()))


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, bs: int = 4, progress=None) -> float:
    """exp(mean next-token NLL) over all windows (each scored on its own, no BOS: context up to seq_len)."""
    nll, n = 0.0, 0
    batches = range(0, len(windows), bs)
    if progress is not None:
        batches = progress(batches)
    for i in batches:
        x = windows[i:i + bs]
        lp = F.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
        nll -= lp.gather(-1, x[:, 1:, None]).sum().item()
        n += x[:, 1:].numel()
    return math.exp(nll / n)

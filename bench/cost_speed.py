"""How long GEMQ statistics and cost estimation take on a demo-shaped model (random weights).

Default shape = the demo model: Mixtral, 30 layers, hidden 768, 6 experts × 256, top-3, vocab 49152.
Random tokens stand in for text (speed does not depend on them). Prints one JSON line.

    python bench/cost_speed.py [--layers 30] [--tokens 32768] [--seq-len 512] [--types ...]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gemq_gguf.archs import adapter_for
from gemq_gguf.gemq.costs import estimate_costs
from gemq_gguf.gemq.stats import collect_stats
from gemq_gguf.options import DEFAULT_TYPES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--types", nargs="+", default=list(DEFAULT_TYPES))
    ap.add_argument("--granularity", default="expert")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    cfg = AutoConfig.for_model("mixtral", vocab_size=49152, hidden_size=768, intermediate_size=256,
                               num_hidden_layers=args.layers, num_attention_heads=12, num_key_value_heads=4,
                               num_local_experts=6, num_experts_per_tok=3, max_position_embeddings=2048,
                               tie_word_embeddings=False, sliding_window=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(args.device).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0.0, 0.5)
    adapter = adapter_for(["MixtralForCausalLM"])
    n_seq = args.tokens // args.seq_len
    tokens = torch.randint(0, cfg.vocab_size, (n_seq, args.seq_len), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    stats = collect_stats(model, adapter, tokens, batch_size=args.batch)
    t_stats = time.perf_counter() - t0
    cache: dict = {}
    table = estimate_costs(model, adapter, stats, stats.imatrix().means(), types=args.types,
                           granularity=args.granularity, cache=cache, device=args.device)
    n_pairs = args.layers * 6 * len(args.types)
    print(json.dumps({"device": args.device, "cpus": os.cpu_count(), "layers": args.layers, "tokens": n_seq * args.seq_len,
                      "types": len(args.types), "granularity": args.granularity, "stats_s": round(t_stats, 2),
                      "costs_s": round(table.seconds, 2), "s_per_expert_type": round(table.seconds / n_pairs, 4),
                      "cached_mb": round(sum(v.nbytes for v in cache.values()) / 2**20, 1)}))


if __name__ == "__main__":
    main()

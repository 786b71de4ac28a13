"""Quality of a GGUF file against a reference GGUF, measured exactly the way `llama-perplexity` does.

Users compare quants by llama-perplexity's `--kl-divergence` numbers, so ours must be the same numbers,
not a look-alike. Modules, one job each:
- base_file: the binary's `--kl-divergence-base` file (reference 16-bit log-probs), our reference cache;
- scores: per-token scores in llama's arithmetic and the final statistics; exact logit comparison;
- python_backend: llama-cpp-python replicating llama-perplexity's tokenizing, chunking and scoring;
- perplexity_backend: the llama-perplexity binary itself, its output parsed;
- run: evaluate_gguf (picks a backend) and the result table; cli: `python -m gemq_gguf.evaluate`.
"""
from .base_file import BASE_MAGIC, BaseChunk, BaseFile, merge_base_files
from .cli import main, read_texts
from .options import RunOptions
from .perplexity_backend import (
                             binary_kld,
                             binary_kld_base,
                             find_llama_perplexity,
                             parse_kld_output,
)
from .python_backend import (
                             cached_kld_base,
                             chunk_logits,
                             llama_logits,
                             n_chunks_for,
                             open_llama,
                             score_against_base,
                             score_paired,
                             tokenize_like_perplexity,
                             write_kld_base,
)
from .run import EvalResult, evaluate_gguf, print_result
from .scores import (
                             LOG_PROB_FLOOR,
                             EvalStats,
                             LogitsComparison,
                             TokenScores,
                             encode_log_probs,
                             kld_vs_logits,
                             median,
                             percentile,
                             score_chunk,
                             stats_from_scores,
)

__all__ = [
    "BASE_MAGIC", "LOG_PROB_FLOOR", "BaseChunk", "BaseFile", "EvalResult", "EvalStats", "LogitsComparison",
    "RunOptions", "TokenScores", "binary_kld", "binary_kld_base", "cached_kld_base", "chunk_logits",
    "encode_log_probs", "evaluate_gguf", "find_llama_perplexity", "kld_vs_logits", "llama_logits", "main",
    "median", "merge_base_files", "n_chunks_for", "open_llama", "parse_kld_output", "percentile",
    "print_result", "read_texts", "score_against_base", "score_chunk", "score_paired", "stats_from_scores",
    "tokenize_like_perplexity", "write_kld_base",
]

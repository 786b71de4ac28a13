"""Known MoE classes that are refused, each with the reason the error gives (docs/families.md, "Refused").

Kept apart from `families.py` (the registrations) so that each stays one short list; imported after it,
since `registry.refuse` checks that no refused class is also registered.
"""
from __future__ import annotations

from .registry import refuse

refuse("PhimoeForCausalLM", "llama.cpp routes PhiMoE by plain softmax top-2, not its sparsemixer weighting, so even "
       "an F32 conversion differs from the model")
refuse("MellumForCausalLM", "llama.cpp's Mellum graph ropes the sliding-window layers with the global rope base, "
       "not their own (rope_parameters.sliding_attention), so even an F32 conversion differs from the model")
refuse("HYV4ForCausalLM", "transformers rotates HY-V4's rope by halves and llama.cpp's graph by consecutive pairs (as "
       "the reference code), so the model GEMQ calibrates differs from the GGUF (F32 logits 19 % off on a test "
       "checkpoint)")
refuse("Qwen4ExpForCausalLM", "llama.cpp's Qwen4-Exp graph attends, beyond the indexer's budget of whole key blocks "
       "and the query's incomplete block, to up to compress_ratio - 1 more keys of the next-best block (its top-k width is "
       "budget + ratio - 1 keys whatever the incomplete block holds), so past the budget even an F32 conversion differs "
       "from the model (12 % off on a test checkpoint with a budget of 16 keys; exact where the query's block fills that "
       "width)")
refuse("DeepseekV4ForCausalLM", "llama.cpp's DeepSeek-V4 converter takes only the released MXFP4 experts (a weight and "
       "a scale per expert) under DeepSeek's own tensor names; it cannot convert a float checkpoint")

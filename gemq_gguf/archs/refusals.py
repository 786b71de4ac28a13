"""Known MoE classes that are refused, each with the reason the error gives (docs/families.md, "Refused").

Kept apart from `families.py` (the registrations) so that each stays one short list; imported after it,
since `registry.refuse` checks that no refused class is also registered.
"""
from __future__ import annotations

from .registry import refuse

refuse("PhimoeForCausalLM", "llama.cpp routes PhiMoE by plain softmax top-2, not its sparsemixer weighting, so even "
       "an F32 conversion differs from the model")
refuse("HunYuanMoEV1ForCausalLM", "llama.cpp's converter loads its tokenizer with trust_remote_code (tiktoken ranks), "
       "and gemq-gguf runs no code from checkpoints")
refuse("LagunaForCausalLM", "llama.cpp's conversion of a transformers-saved checkpoint differs from the model "
       "(F32 logits 28 % off on a test checkpoint)")
refuse("MellumForCausalLM", "llama.cpp's Mellum graph ropes the sliding-window layers with the global rope base, "
       "not their own (rope_parameters.sliding_attention), so even an F32 conversion differs from the model")
refuse("AfmoeForCausalLM", "not supported yet: llama.cpp's conversion of a transformers-saved tiny checkpoint differs "
       "from the model (Q8_0 KL 1.5e-2, top-1 36 %); cause not found")
refuse("HYV4ForCausalLM", "transformers rotates HY-V4's rope by halves and llama.cpp's graph by consecutive pairs (as "
       "the reference code), so the model GEMQ calibrates differs from the GGUF (F32 logits 19 % off on a test "
       "checkpoint)")
refuse("Qwen4ExpForCausalLM", "llama.cpp's conversion of a transformers-saved test checkpoint differs from the model "
       "(F32 logits 32 % off, 2 % at the first token); cause not investigated")
refuse("DeepseekV4ForCausalLM", "llama.cpp's DeepSeek-V4 converter takes only the released MXFP4 experts (a weight and "
       "a scale per expert) under DeepSeek's own tensor names; it cannot convert a float checkpoint")

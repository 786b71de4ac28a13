"""Tiny random MoE checkpoints, one per supported architecture, built with transformers in the tests.

Widths are multiples of 256 so every K-quant and IQ type fits; a real byte-level BPE tokenizer is
trained on the packaged calibration text so llama.cpp tokenizes exactly like Hugging Face.
"""
from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from gemq_gguf.archs import adapter_for
from gemq_gguf.archs.text_model import causal_lm_name
from gemq_gguf.data import calib_texts

VOCAB = 384
HY_RANKS = VOCAB - 16  # BPE ranks of the tiktoken fixture; its 16 special tokens follow (tests/fixtures/tokenization_hy.py)
GEMMA_VOCAB = 640  # 4 specials, 256 byte-fallback pieces, merges
COMMON = dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
              pad_token_id=1, rms_norm_eps=1e-6)

CONFIGS: dict[str, dict] = {
    "mixtral": dict(model_type="mixtral", num_key_value_heads=2, intermediate_size=256, num_local_experts=6,
                    num_experts_per_tok=2, head_dim=64, sliding_window=None),
    "qwen2_moe": dict(model_type="qwen2_moe", num_key_value_heads=2, intermediate_size=512, moe_intermediate_size=256,
                      shared_expert_intermediate_size=512, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False,
                      decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False),
    "qwen3_moe": dict(model_type="qwen3_moe", num_key_value_heads=2, intermediate_size=512, moe_intermediate_size=256,
                      num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, head_dim=64, decoder_sparse_step=1,
                      mlp_only_layers=[], use_sliding_window=False),
    "olmoe": dict(model_type="olmoe", num_key_value_heads=4, intermediate_size=256, num_experts=6,
                  num_experts_per_tok=2, norm_topk_prob=False, rms_norm_eps=1e-5),  # llama.cpp: n_kv == n_head, eps 1e-5
    "deepseek_v2": dict(model_type="deepseek_v2", num_key_value_heads=4, intermediate_size=512,
                        moe_intermediate_size=256, n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1,
                        first_k_dense_replace=1, q_lora_rank=256, kv_lora_rank=256, qk_rope_head_dim=32,
                        qk_nope_head_dim=64, v_head_dim=64, n_group=1, topk_group=1, topk_method="greedy",
                        routed_scaling_factor=1.0, norm_topk_prob=False, num_hidden_layers=3),
    # newer families (tests/test_families.py); docs/families.md says what each needed
    "deepseek_v3": dict(model_type="deepseek_v3", num_key_value_heads=4, intermediate_size=512,
                        moe_intermediate_size=256, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                        first_k_dense_replace=1, q_lora_rank=256, kv_lora_rank=256, qk_rope_head_dim=32,
                        qk_nope_head_dim=64, v_head_dim=64, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                        norm_topk_prob=True, num_hidden_layers=3),
    "glm4_moe": dict(model_type="glm4_moe", num_key_value_heads=2, head_dim=64, intermediate_size=512,
                     moe_intermediate_size=256, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                     first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=2.5,
                     norm_topk_prob=True, use_qk_norm=True, num_hidden_layers=3, rms_norm_eps=1e-5),
    "gpt_oss": dict(model_type="gpt_oss", num_key_value_heads=2, head_dim=64, intermediate_size=256,
                    num_local_experts=8, num_experts_per_tok=2, sliding_window=128,
                    layer_types=["sliding_attention", "full_attention"], rms_norm_eps=1e-5),
    "qwen3_next": dict(model_type="qwen3_next", num_key_value_heads=2, head_dim=64, intermediate_size=512,
                       moe_intermediate_size=256, shared_expert_intermediate_size=256, num_experts=8,
                       num_experts_per_tok=2, linear_key_head_dim=64, linear_value_head_dim=64,
                       linear_num_key_heads=2, linear_num_value_heads=4, decoder_sparse_step=1, mlp_only_layers=[],
                       layer_types=["linear_attention", "full_attention"]),
    "qwen3_5_moe": dict(model_type="qwen3_5_moe_text", num_key_value_heads=2, head_dim=64,
                        moe_intermediate_size=256, shared_expert_intermediate_size=256, num_experts=8,
                        num_experts_per_tok=2, linear_key_head_dim=64, linear_value_head_dim=64,
                        linear_num_key_heads=2, linear_num_value_heads=4,
                        layer_types=["linear_attention", "full_attention"]),
    "minimax_m2": dict(model_type="minimax_m2", num_key_value_heads=2, head_dim=64, intermediate_size=256,
                       num_local_experts=8, num_experts_per_tok=2),
    "granitemoe": dict(model_type="granitemoe", num_key_value_heads=2, intermediate_size=256, num_local_experts=8,
                       num_experts_per_tok=2),
    "dots1": dict(model_type="dots1", num_key_value_heads=4, intermediate_size=512, moe_intermediate_size=256,
                  n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                  norm_topk_prob=True, routed_scaling_factor=2.5, num_hidden_layers=3, sliding_window=None),
    "lfm2_moe": dict(model_type="lfm2_moe", num_key_value_heads=2, intermediate_size=512, moe_intermediate_size=256,
                     num_experts=8, num_experts_per_tok=2, num_dense_layers=1, num_hidden_layers=3,
                     layer_types=["full_attention", "conv", "full_attention"], tie_word_embeddings=True,
                     norm_eps=1e-5, rms_norm_eps=1e-5),  # COMMON's rms_norm_eps is saved too, and the converter reads it first
    "glm4_moe_lite": dict(model_type="glm4_moe_lite", num_key_value_heads=4, intermediate_size=512,
                          moe_intermediate_size=256, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                          q_lora_rank=256, kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
                          n_group=1, topk_group=1, routed_scaling_factor=1.8, norm_topk_prob=True,
                          mlp_layer_types=["dense", "sparse", "sparse"], num_hidden_layers=3, rms_norm_eps=1e-5),
    "granitemoeshared": dict(model_type="granitemoeshared", num_key_value_heads=2, intermediate_size=256,
                             num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=512),
    "granitemoehybrid": dict(model_type="granitemoehybrid", num_key_value_heads=2, intermediate_size=256,
                             num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=512,
                             layer_types=["mamba", "attention"], mamba_n_heads=8, mamba_n_groups=1, mamba_d_state=64,
                             mamba_d_head=64, mamba_chunk_size=64),
    "exaone_moe": dict(model_type="exaone_moe", num_key_value_heads=2, head_dim=64, intermediate_size=512,
                       moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
                       first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, num_hidden_layers=3,
                       sliding_window=128, layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "solar_open": dict(model_type="solar_open", num_key_value_heads=2, head_dim=64, moe_intermediate_size=256,
                       n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, routed_scaling_factor=1.0,
                       norm_topk_prob=True, rms_norm_eps=1e-5),
    "hy_v3": dict(model_type="hy_v3", num_key_value_heads=2, head_dim=64, intermediate_size=512,
                  moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
                  router_scaling_factor=2.5, num_hidden_layers=3, rms_norm_eps=1e-5,
                  initializer_range=0.04),  # its default init gives logits a third of the others' spread
    "llama4": dict(model_type="llama4_text", num_key_value_heads=2, head_dim=64, intermediate_size=256,
                   intermediate_size_mlp=512, num_local_experts=8, num_experts_per_tok=2, interleave_moe_layer_step=1,
                   use_qk_norm=True, attention_chunk_size=8192, rms_norm_eps=1e-5,
                   num_hidden_layers=4),  # llama.cpp: every 4th layer NoPE (its temperature input must be used)
    # SentencePiece tokenizer (SPM below); the converter sizes the shared expert as intermediate_size // n_kv
    "ernie4_5_moe": dict(model_type="ernie4_5_moe", num_key_value_heads=2, intermediate_size=1024,
                         moe_intermediate_size=256, moe_num_experts=8, moe_k=2, moe_num_shared_experts=2,
                         moe_layer_start_index=1, moe_layer_end_index=2, moe_layer_interval=1, num_hidden_layers=3,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "jamba": dict(model_type="jamba", num_key_value_heads=2, intermediate_size=256, num_experts=8, num_experts_per_tok=2,
                  attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
                  mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=16, use_mamba_kernels=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "nemotron_h": dict(model_type="nemotron_h", num_key_value_heads=2, head_dim=64, intermediate_size=512,
                       layers_block_type=["mamba", "moe", "attention", "moe"], num_hidden_layers=4,
                       n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=256,
                       moe_shared_expert_intermediate_size=256, ssm_state_size=64, mamba_num_heads=8,
                       mamba_head_dim=64, n_groups=1, chunk_size=64, use_mamba_kernels=False, layer_norm_epsilon=1e-5,
                       rms_norm_eps=1e-5),  # COMMON's rms_norm_eps is saved too, and the converter reads it first
    "cohere2_moe": dict(model_type="cohere2_moe", num_key_value_heads=2, head_dim=64, intermediate_size=256,
                        num_experts=8, num_experts_per_tok=2, sliding_window=128, sliding_window_pattern=2,
                        tie_word_embeddings=True),
    "kimi_linear": dict(model_type="kimi_linear", num_key_value_heads=4, intermediate_size=512,
                        moe_intermediate_size=256, num_local_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                        kv_lora_rank=256, q_lora_rank=None, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
                        n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, num_hidden_layers=3,
                        layer_types=["linear_attention", "full_attention", "linear_attention"],
                        mlp_layer_types=["dense", "sparse", "sparse"], linear_head_dim=64, linear_num_heads=4,
                        linear_conv_kernel_dim=4),  # rms_norm_eps 1e-6: llama.cpp's KDA L2-normalises q/k with it
    "glm_moe_dsa": dict(model_type="glm_moe_dsa", num_key_value_heads=4, intermediate_size=512,
                        moe_intermediate_size=256, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                        first_k_dense_replace=1, q_lora_rank=256, kv_lora_rank=256, qk_rope_head_dim=32,
                        qk_nope_head_dim=64, v_head_dim=64, n_group=1, topk_group=1, routed_scaling_factor=2.5,
                        norm_topk_prob=True, num_hidden_layers=3, rms_norm_eps=1e-5,
                        # the indexer keeps every key of the 96-token tests (as GLM-5's 2048 does up to 2048
                        # tokens): choosing 32, a random indexer's choices flip under 8-bit activations at
                        # most positions (docs/families.md)
                        index_topk=128, index_head_dim=64, index_n_heads=16),
    "mimo_v2_flash": dict(model_type="mimo_v2_flash", num_key_value_heads=2, head_dim=64, v_head_dim=64,
                          intermediate_size=512, moe_intermediate_size=256, n_routed_experts=8, num_experts_per_tok=2,
                          routed_scaling_factor=1.0, norm_topk_prob=True, num_hidden_layers=3, rms_norm_eps=1e-5,
                          layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                          mlp_layer_types=["dense", "sparse", "sparse"], sliding_window=33,
                          rope_parameters={k: dict(rope_type="default", rope_theta=theta, partial_rotary_factor=0.5)
                                           for k, theta in (("full_attention", 5e6), ("sliding_attention", 1e4))}),
    "granitemoe_swa": dict(model_type="granitemoe_swa", num_key_value_heads=2, intermediate_size=256,
                           num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=512, num_hidden_layers=3,
                           layer_types=["full_attention", "sliding_attention", "sliding_attention"], sliding_window=33),
    "deepseek_v32": dict(model_type="deepseek_v32", num_key_value_heads=4, intermediate_size=512,
                         moe_intermediate_size=256, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                         first_k_dense_replace=1, q_lora_rank=256, kv_lora_rank=256, qk_rope_head_dim=32,
                         qk_nope_head_dim=64, v_head_dim=64, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                         norm_topk_prob=True, num_hidden_layers=3,
                         index_topk=128, index_head_dim=64, index_n_heads=16),  # as glm_moe_dsa's indexer
    "dots3": dict(model_type="dots3_note_text", num_key_value_heads=4, intermediate_size=512, moe_intermediate_size=256,
                  n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, shared_experts_intermediate_size=256,
                  first_k_dense_replace=1, q_lora_rank=128, kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64,
                  v_head_dim=64, head_dim=96, routed_scaling_factor=2.5, num_hidden_layers=3,
                  layer_types=["indexed_attention", "sliding_attention", "indexed_attention"], sliding_window=33,
                  index_topk=128, index_head_dim=64, index_n_heads=16,  # as glm_moe_dsa's indexer
                  swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=128, swa_kv_lora_rank=128,
                  swa_head_dim=96, swa_qk_nope_head_dim=64, swa_v_head_dim=64,
                  swa_qk_rope_head_dim=32),  # ranks below hidden: its latents' rescale sqrt(hidden / rank) matters
    # a Gemma-style tokenizer (_gemma_tokenizer); both layer kinds, tied embeddings, no per-layer inputs
    "gemma4": dict(model_type="gemma4_text", vocab_size=GEMMA_VOCAB, num_key_value_heads=2, head_dim=64,
                   global_head_dim=128, intermediate_size=256, enable_moe_block=True, num_experts=8, top_k_experts=2,
                   moe_intermediate_size=256, hidden_size_per_layer_input=0, vocab_size_per_layer_input=GEMMA_VOCAB,
                   layer_types=["sliding_attention", "full_attention"], sliding_window=33, num_kv_shared_layers=0,
                   tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                   final_logit_softcapping=30.0),  # llama.cpp caps at 30 when config.json has no value
    # a tiktoken tokenizer module in the checkpoint (_write_hy_tokenizer); the converter's NTK-alpha rope
    # (alpha 1000 on 128-wide heads, the released config's values, which it asserts)
    "hunyuan_moe": dict(model_type="hunyuan_v1_moe", num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                        intermediate_size=256, num_experts=8, moe_topk=2, rms_norm_eps=1e-5,
                        max_position_embeddings=32768, bos_token_id=HY_RANKS + 2, eos_token_id=HY_RANKS + 3,
                        pad_token_id=HY_RANKS + 4, eod_token_id=HY_RANKS,
                        rope_parameters=dict(rope_type="dynamic", alpha=1000.0, factor=1.0, rope_theta=10000.0)),
    # GLM-4.5's modules in transformers; config.json names the released class (ARCHITECTURES)
    "sarvam_moe": dict(model_type="sarvam_moe", num_key_value_heads=2, head_dim=64, intermediate_size=512,
                       moe_intermediate_size=256, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                       first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=2.5,
                       norm_topk_prob=True, num_hidden_layers=3,
                       initializer_range=0.02),  # its default (0.006) leaves the logits nearly flat
    # llama.cpp's graph always scales the embeddings by sqrt(hidden) (muP) and takes every 4th layer as the
    # full-attention, unroped one: the released configs' values (transformers' default mup_enabled is false)
    "afmoe": dict(model_type="afmoe", num_key_value_heads=2, head_dim=64, intermediate_size=512,
                  moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
                  num_dense_layers=1, num_hidden_layers=4, route_scale=2.5, sliding_window=33, mup_enabled=True,
                  rms_norm_eps=1e-5),
    # XS.2's layer pattern (every 4th layer full attention, from the first), which llama.cpp assumes whenever there
    # is a sliding window; a rope per layer kind (transformers' default: partial 0.5 / full)
    "laguna": dict(model_type="laguna", num_key_value_heads=2, head_dim=64, intermediate_size=512,
                   moe_intermediate_size=256, shared_expert_intermediate_size=256, num_experts=8, num_experts_per_tok=2,
                   moe_routed_scaling_factor=2.5, num_hidden_layers=4, sliding_window=33, rms_norm_eps=1e-5,
                   layer_types=["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"]),
    # the text model of Qwen3-VL-MoE (only inside its wrapper: WRAPPERS); M-RoPE sections sum to head_dim / 2;
    # experts' ffn != hidden: transformers tells the released (transposed) layout from its own by the shapes
    "qwen3_vl_moe_text": dict(model_type="qwen3_vl_moe_text", num_key_value_heads=2, head_dim=64, intermediate_size=512,
                              moe_intermediate_size=512, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
                              mlp_only_layers=[], rope_parameters=dict(rope_type="default", rope_theta=5e6,
                                                                       mrope_section=[12, 10, 10],
                                                                       mrope_interleaved=True)),
    # the text model of GLM-4.5V (only inside its wrapper): GLM-4.5's MoE, M-RoPE over half of each head
    "glm4v_moe_text": dict(model_type="glm4v_moe_text", num_key_value_heads=2, head_dim=64, intermediate_size=512,
                           moe_intermediate_size=256, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                           first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=2.5,
                           norm_topk_prob=True, num_hidden_layers=3, rms_norm_eps=1e-5,
                           rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5,
                                                mrope_section=[4, 6, 6])),
    # the text model of MiniMax-M3 (only inside its wrapper): the layout llama.cpp's graph assumes, dense layers first
    # (a rope factor that agrees with rotary_dim: transformers rotates by the former, the converter by the latter)
    # and sparse attention in every MoE layer, expert, shared-expert and dense widths equal; the indexer keeps every
    # key of the 96-token tests (8 blocks of 16)
    "minimax_m3_vl_text": dict(model_type="minimax_m3_vl_text", num_key_value_heads=2, head_dim=64, rotary_dim=32,
                               rope_parameters=dict(rope_type="default", rope_theta=5e6, partial_rotary_factor=0.5),
                               intermediate_size=256, dense_intermediate_size=256, shared_intermediate_size=256,
                               num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=3,
                               mlp_layer_types=["dense", "sparse", "sparse"],
                               layer_types=["full_attention", "minimax_m3_sparse", "minimax_m3_sparse"],
                               index_n_heads=2, index_head_dim=64, index_block_size=16, index_topk_blocks=8,
                               index_local_blocks=1),
    # the text model of Qwen3-Omni's thinker (only inside its wrapper): Qwen3-MoE's layers, M-RoPE sections as
    # Qwen3-VL-MoE's
    "qwen3_omni_moe_text": dict(model_type="qwen3_omni_moe_text", num_key_value_heads=2, head_dim=64,
                                intermediate_size=512, moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2,
                                decoder_sparse_step=1, mlp_only_layers=[],
                                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[12, 10, 10],
                                                     mrope_interleaved=True)),
    # the text model of GLM-5.3-Flash (only inside its wrapper): KDA layers and one indexed MLA layer (every 4th, as
    # released), nope-only MLA, dense first layer, hyper-connections; the indexer keeps every key of the tests
    "glm5_next_text": dict(model_type="glm5_next_text", num_key_value_heads=4, intermediate_size=512,
                           moe_intermediate_size=256, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                           q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, v_head_dim=64, num_hidden_layers=4,
                           mlp_layer_types=["dense", "sparse", "sparse", "sparse"], linear_num_heads=4,
                           linear_head_dim=64, index_topk=128, index_head_dim=64, index_n_heads=16, index_kpool=16,
                           rms_norm_eps=1e-5),
    # the text model of Step-3.7-Flash (only inside its wrapper): the released layer kinds (full attention first,
    # rope over half of each head; sliding-window layers with their own heads and a full rope), a dense first layer,
    # head-wise attention gates
    "step3p5": dict(model_type="step3p5", num_key_value_heads=2, head_dim=64, intermediate_size=512,
                    moe_intermediate_size=256, share_expert_dim=256, n_routed_experts=8, num_experts_per_tok=2,
                    num_hidden_layers=4, mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
                    layer_types=["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"],
                    sliding_window=33, num_sliding_attention_heads=8, moe_router_scaling_factor=2.5, gating="per-head",
                    rope_theta=[5e6, 1e4, 1e4, 1e4], partial_rotary_factors=[0.5, 1.0, 1.0, 1.0]),
    "dbrx": dict(model_type="dbrx", d_model=256, n_heads=4, n_layers=2, max_seq_len=1024,
                 attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
                 ffn_config=dict(ffn_hidden_size=256, moe_num_experts=8, moe_top_k=2, moe_normalize_expert_weights=1.0)),
}
#: the first five families (tests/test_convert_e2e.py); the newer ones are tests/test_families.py's
ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2")
GLM_SPECIALS = ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>")
#: special tokens a family's llama.cpp converter looks up by name (added to the trained vocabulary)
SPECIALS: dict[str, tuple[str, ...]] = {
    "qwen3_5_moe": ("<|endoftext|>",),  # transformers' Qwen3.5 tokenizer class adds it when missing
    "glm4_moe": GLM_SPECIALS, "glm4_moe_lite": GLM_SPECIALS, "glm5_next_text": GLM_SPECIALS, "glm4v_moe_text": GLM_SPECIALS, "glm_moe_dsa": GLM_SPECIALS,
    "dots3": ("<|endofassistant|>",), "solar_open": ("<|startoftext|>", "<|endoftext|>", "<unk>"),
}


#: the class a released checkpoint's config.json names where transformers builds (and saves) another one
ARCHITECTURES: dict[str, str] = {"sarvam_moe": "SarvamMoEForCausalLM"}

#: tokenizer_config.json keys a family's converter checks (written after saving: transformers drops them)
TOKENIZER_CONFIG: dict[str, dict] = {"deepseek_v32": {"add_bos_token": True}}

#: families whose llama.cpp converter takes only a SentencePiece tokenizer.model
SPM = ("ernie4_5_moe", "jamba")
#: families whose llama.cpp converter takes a Gemma-style tokenizer.json (`▁` for spaces, byte fallback)
GEMMA_TOK = ("gemma4",)
#: families whose tokenizer is the checkpoint's own code (a tiktoken module; converted with --trust-remote-code)
TOKENIZER_CODE = ("hunyuan_moe",)


@cache
def _spm_model() -> bytes:
    """A byte-fallback SentencePiece BPE model trained on the calibration text (~0.1 s; needs protobuf for
    transformers to read it, the [test] extra). Ids: <unk> 0, <s> 1, </s> 2."""
    import io

    import sentencepiece as spm
    lines = [l for t in calib_texts().values() for l in t[:60_000].split("\n") if l.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=VOCAB, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True, minloglevel=2,
                                   remove_extra_whitespaces=False, allow_whitespace_only_pieces=True)
    return buf.getvalue()


def _write_spm_tokenizer(out_dir: Path) -> None:
    """tokenizer.model for llama.cpp, read by transformers as a LlamaTokenizer (converted via protobuf)."""
    (out_dir / "tokenizer.model").write_bytes(_spm_model())
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "pad_token": "<unk>", "add_bos_token": False, "add_eos_token": False, "legacy": True}))


@cache
def _gemma_tokenizer() -> PreTrainedTokenizerFast:
    """Gemma's tokenizer.json form, which llama.cpp's Gemma 4 converter reads: spaces normalised to `▁`, a
    split at newlines only, BPE with byte fallback. Ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3, bytes 4-259."""
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[^\\n]+|[\\n]+"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=GEMMA_VOCAB, special_tokens=specials, show_progress=False)
    tok.train_from_iterator([t[:60_000] for t in calib_texts().values()], trainer)
    assert tok.get_vocab_size() == GEMMA_VOCAB, tok.get_vocab_size()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


@cache
def _tiktoken_ranks() -> bytes:
    """hy.tiktoken: byte-level BPE ranks trained on the calibration text (the 256 bytes, then the merges in
    order: a tiktoken rank is the order of its merge), one `base64-token rank` per line."""
    import base64

    from transformers.convert_slow_tokenizer import bytes_to_unicode
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=HY_RANKS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([t[:60_000] for t in calib_texts().values()], trainer)
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for merge in json.loads(tok.to_str())["model"]["merges"]:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        ranks.setdefault(b"".join(bytes(byte_of[c] for c in part) for part in parts), len(ranks))
    assert len(ranks) == HY_RANKS, len(ranks)
    return "".join(f"{base64.b64encode(k).decode()} {v}\n" for k, v in ranks.items()).encode()


def _write_hy_tokenizer(out_dir: Path) -> None:
    """Hunyuan-A13B's tokenizer form: its tokenization module (tests/fixtures/tokenization_hy.py), the ranks
    file it reads and a tokenizer_config.json whose auto_map names it (transformers has no class for it)."""
    import shutil
    shutil.copy(Path(__file__).parent / "fixtures" / "tokenization_hy.py", out_dir)
    (out_dir / "hy.tiktoken").write_bytes(_tiktoken_ranks())
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "HYTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_hy.HYTokenizer", None]},
         "model_max_length": 1024}))


def load_tokenizer(model_dir: Path):
    """The tiny checkpoint's tokenizer; a tokenizer module in it (TOKENIZER_CODE) is this test suite's own."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=(model_dir / "tokenization_hy.py").exists())


@cache
def _tokenizer(specials: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>", *specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([t[:60_000] for t in calib_texts().values()], trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


@torch.no_grad()
def _spread_routers(model: torch.nn.Module) -> None:
    """Routers with real spread, so top-k choices are not near-ties; a score-correction bias that matters."""
    adapter = adapter_for([type(model).__name__])
    for layer in adapter.moe_shape(model.config).moe_layers:
        block = adapter.moe_block(model, layer)
        adapter.router(block).weight.normal_(0.0, 0.5)
        for name, p in [*block.named_parameters(), *block.named_buffers()]:
            if name.endswith(("shared_expert_gate.weight", "e_score_correction_bias", "expert_bias")):
                p.normal_(0.0, 0.5 if name.endswith("weight") else 0.05)
            elif name.endswith(("router.scale", "router.per_expert_scale")):  # Gemma 4's, ones at init
                p.uniform_(0.5, 1.5)
            elif name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")) and \
                    getattr(getattr(block, "self_attn", None), "scaling", None) == 1.0:
                # Gemma 4 attends with unit-RMS q and k and no 1/sqrt(d): with its init (ones) every score is
                # ~sqrt(d) wide and attention near argmax, so a Q8_0 round trip of the embedding alone moves
                # the HF model's own logits by KL 1e-3; trained norms keep scores in range
                p.uniform_(0.2, 0.4)


#: multimodal checkpoints (`*ForConditionalGeneration`): the wrapper's model_type, the text family whose tiny
#: model it wraps (same seed, so the same text weights), and a tiny vision tower (widths that allow Q8_0)
WRAPPERS: dict[str, tuple[str, str, dict]] = {
    "qwen3_5_moe_vl": ("qwen3_5_moe", "qwen3_5_moe", dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2,
                                                          out_hidden_size=256, patch_size=16, num_position_embeddings=64)),
    "llama4_vl": ("llama4", "llama4", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16, projector_input_dim=64,
                                           projector_output_dim=64, vision_output_dim=64)),
    "qwen3_vl_moe_vl": ("qwen3_vl_moe", "qwen3_vl_moe_text", dict(depth=2, hidden_size=64, intermediate_size=128,
                                                                  num_heads=2, out_hidden_size=256, patch_size=16,
                                                                  num_position_embeddings=64,
                                                                  deepstack_visual_indexes=[0])),
    "glm4v_moe_vl": ("glm4v_moe", "glm4v_moe_text", dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2,
                                                         out_hidden_size=256, patch_size=14)),
    "gemma4_vl": ("gemma4", "gemma4", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=2, head_dim=32)),
    # vision and audio towers (WRAPPER_CONFIG), each ending in an adapter to the text width; the vision tower's MoE
    # layers dense (its experts are the vision tower's, not the text model's)
    "dots3_vl": ("dots3_note", "dots3", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                            num_attention_heads=2, patch_size=14, mlp_layer_types=["dense"],
                                            adapter_in_dim=64, adapter_out_dim=256)),
    "qwen3_omni_moe_vl": ("qwen3_omni_moe", "qwen3_omni_moe_text", dict(depth=1, hidden_size=64, intermediate_size=128,
                                                                    num_heads=2, out_hidden_size=256, patch_size=16,
                                                                    num_position_embeddings=64,
                                                                    deepstack_visual_indexes=[0])),
    "glm5_next_vl": ("glm5_next", "glm5_next_text", dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2,
                                                         out_hidden_size=256, patch_size=14)),
    "step3p7_vl": ("step3p7", "step3p5", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=28, patch_size=14)),
    "minimax_m3_vl": ("minimax_m3_vl", "minimax_m3_vl_text", dict(hidden_size=64, intermediate_size=128,
                                                                  num_hidden_layers=1, num_attention_heads=2,
                                                                  patch_size=14)),
}
#: the rest of a wrapper's config, where its defaults are large: an audio tower, a projector's width
WRAPPER_CONFIG: dict[str, dict] = {
    "dots3_vl": dict(audio_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                       downsample_hidden_size=64, adapter_input_size=64, adapter_out_dim=256)),
    "minimax_m3_vl": dict(projector_hidden_size=256),
    "qwen3_omni_moe_vl": dict(enable_audio_output=False, thinker_config=dict(audio_config=dict(
        d_model=64, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=128, output_dim=256,
        downsample_hidden_size=32))),
}
#: wrappers that keep the text and vision configs in a sub-config (Qwen3-Omni's thinker), and their class
#: (transformers maps none of the Auto classes to them)
NESTED: dict[str, tuple[str, str]] = {"qwen3_omni_moe_vl": ("thinker_config", "Qwen3OmniMoeForConditionalGeneration")}


#: expert tensors a family's released checkpoints store transposed from transformers' layout, which its
#: save keeps ([E, hidden, 2 ffn] gate/up, [E, ffn, hidden] down); transformers loads either, llama.cpp's
#: converter only the released one
RELEASED_TRANSPOSED: dict[str, tuple[str, ...]] = {
    "qwen3_vl_moe_vl": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")}


def _transpose_saved(out_dir: Path, suffixes: tuple[str, ...]) -> None:
    from safetensors.torch import load_file, save_file
    path = out_dir / "model.safetensors"
    tensors = load_file(path)
    save_file({k: v.transpose(1, 2).contiguous() if k.endswith(suffixes) else v for k, v in tensors.items()}, path,
              metadata={"format": "pt"})


def _text_model(arch: str, seed: int, dtype: torch.dtype, overrides: dict) -> torch.nn.Module:
    kwargs = {**COMMON, **CONFIGS[arch], **overrides}
    cfg = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    cfg.architectures = [causal_lm_name(type(cfg))]  # registers a causal LM where transformers has none
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    _spread_routers(model)
    return model


@torch.no_grad()
def _wrapped(arch: str, text: torch.nn.Module, seed: int, dtype: torch.dtype) -> torch.nn.Module:
    """The multimodal model of `arch` holding `text`'s weights as its language model (a random vision tower)."""
    import re

    import transformers

    from gemq_gguf.archs import key_mapping
    kind, _, vision = WRAPPERS[arch]
    text_cfg = {k: v for k, v in text.config.to_dict().items() if k != "architectures"}  # as released ones
    subs, extra = dict(text_config=text_cfg, vision_config=vision), dict(WRAPPER_CONFIG.get(arch, {}))
    if arch in NESTED:
        key = NESTED[arch][0]
        subs, extra = {}, {**extra, key: {**extra.get(key, {}), **subs}}
    cfg = AutoConfig.for_model(kind, **subs, **extra, tie_word_embeddings=text.config.tie_word_embeddings)
    torch.manual_seed(seed + 1)
    if arch in NESTED:
        cfg.architectures = [NESTED[arch][1]]
        model = getattr(transformers, NESTED[arch][1])._from_config(cfg, dtype=dtype)
    else:
        model = transformers.AutoModelForImageTextToText.from_config(cfg, dtype=dtype)
    renames = [(re.compile(k), v) for k, v in key_mapping(model.config).items()]
    text_sd, copied = text.state_dict(), set()
    for name, p in model.state_dict().items():
        key = name
        for pattern, new in renames:
            key = pattern.sub(new, key)
        if key in text_sd:
            p.copy_(text_sd[key])
            copied.add(key)
    assert copied == set(text_sd), set(text_sd) - copied
    return model


def make_tiny_model(arch: str, out_dir: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Write a random `arch` checkpoint with tokenizer to out_dir; returns out_dir. A multimodal `arch` (WRAPPERS)
    holds its text family's model (and tokenizer) beside a random vision tower."""
    family = WRAPPERS[arch][1] if arch in WRAPPERS else arch
    model = _text_model(family, seed, dtype, overrides)
    if arch in WRAPPERS:
        model = _wrapped(arch, model, seed, dtype)
    model.save_pretrained(out_dir)
    if arch in RELEASED_TRANSPOSED:
        _transpose_saved(out_dir, RELEASED_TRANSPOSED[arch])
    _write_tokenizer(family, out_dir)
    if arch in ARCHITECTURES:
        path = out_dir / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "architectures": [ARCHITECTURES[arch]]}))
    return out_dir


def _write_tokenizer(family: str, out_dir: Path) -> None:
    if family in SPM:
        _write_spm_tokenizer(out_dir)
    elif family in GEMMA_TOK:
        _gemma_tokenizer().save_pretrained(out_dir)
    elif family in TOKENIZER_CODE:
        _write_hy_tokenizer(out_dir)
    else:
        _tokenizer(SPECIALS.get(family, ())).save_pretrained(out_dir)
    if family in TOKENIZER_CONFIG:
        path = out_dir / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **TOKENIZER_CONFIG[family]}))

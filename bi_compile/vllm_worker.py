"""bi-compile's vLLM worker: the lm_head and the sampler (the part of a step that runs eagerly, outside every
compiled graph), and on a CPU the linear layers' weights, kept plain so that the graph pass can rewrite them.

Two workers, one mixin (``BiWorker``): ``BiCPUWorker`` (vLLM's ``CPUWorker``) and ``BiGPUWorker`` (vLLM's GPU
``Worker``), written against the V1 model runner of vLLM 0.26 (GPU) and 0.32 (CPU): bi_compile/vllm_compat.py names
what the two releases must have and refuses a vLLM that lacks it. On a GPU vLLM would pick its V2 model runner for
dense models (another sampler); the plugin pins ``VLLM_USE_V2_MODEL_RUNNER=0`` (bi_compile/vllm_plugin.py).
Each piece enters through a door vLLM has:

- **lm_head** (``compute_logits``): ``BiLogitsProcessor``, vLLM's ``LogitsProcessor`` layer (a ``PluggableLayer``)
  with ``_apply_head`` computing ``torch.ops.bi.linear(hidden, lm_head.weight, bias)``. vLLM instantiates a
  registered out-of-tree class in place of its own (``PluggableLayer.register_oot``); the worker registers it only
  while it loads the model, so no other engine in the process gets it. Stock vLLM sends the head to
  ``layer.cpu_linear`` on a CPU (sgl-kernel's AMX ``weight_packed_linear``, oneDNN or torch's linear), to cuBLAS
  (``F.linear``, or ``torch.mm`` into fp32) on a GPU.
- **sampler**: ``BiSampler``, vLLM's ``Sampler`` with its row ops replaced: ``compute_logprobs`` (the returned
  logprobs) is ``bi.log_softmax``; top-k / top-p and temperature sampling go through ``BiTopKTopPSampler``
  (``top_k_top_p`` below: a stable sort, exact thresholds, ``bi.softmax`` and ``bi.cumsum`` for top-p; then vLLM's
  own draw). The draw needs no row reduction: on a CPU vLLM's Gumbel-max (``_C.fused_gumbel_argmax``, noise keyed
  by each request's seed and the token id), elsewhere ``bi.softmax`` then vLLM's ``random_sample`` (exponential
  noise from each request's generator). A seeded request draws from its own generator only, so it samples the same
  tokens alone and in any batch. vLLM's FlashInfer sampler is never used.
- **linear layers, CPU only**: vLLM prepacks an unquantized linear's weight for its own CPU kernel and drops the
  weight, so no ``mm`` reaches the pass, and the AMX kernel is not batch-invariant. The worker registers, for each
  of vLLM's linear layer classes, a subclass carrying the flag with which vLLM itself keeps a layer's weight plain
  (``SKIP_CPU_GEMM_DISPATCH``); the layer then calls torch's linear, and the pass makes it ``bi.linear``. On a GPU
  the linear layers call ``F.linear`` already, which reaches the graph as ``mm``.
- **fused MoE, GPU only**: once the model is loaded, every MoE layer runs one pinned Triton config for every batch
  size and its gate and shared experts through ``bi.linear`` (bi_compile/vllm_moe.py).

vLLM has no hook for the sampler: the model runner builds ``Sampler(...)`` itself. The supported door is the worker
class, which a platform picks (``parallel_config.worker_cls``): bi-compile's platform (``bi_compile.vllm_platform``)
names ``BiCPUWorker`` or ``BiGPUWorker``, which register the layer classes around ``load_model`` and swap the
runner's sampler for a ``BiSampler`` once the runner exists (``init_device`` builds it). That is the small wrapper
of this module.

Not owned (stock vLLM code, named in docs/vllm.md): the ``min_p`` logits processor's softmax, penalties (elementwise
adds, exact), speculative decoding's rejection sampler (refused), the V2 model runner's sampler (refused), linear
layer classes that a model file defines (on a CPU their weights stay prepacked; the audit names the kernel), vLLM's
CPU fused MoE (the audit names ``vllm.moe_forward``).

``RAN`` (bi_compile.vllm_checks) counts each piece per call, so a test can show that they really ran.
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import torch
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
from vllm.platforms import current_platform
from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler, random_sample
from vllm.v1.sample.sampler import Sampler

import bi_compile.ops  # noqa: F401  (defines torch.ops.bi.*)
from bi_compile.vllm_checks import RAN, SWITCH, VllmSettingError, platform_kind
from bi_compile.vllm_compat import SKIP_CPU_GEMM_DISPATCH, WORKER_BASES, check_vllm_api

LOGITS_PROCESSOR_NAME = "LogitsProcessor"  # the key vLLM's out-of-tree registry looks the layer up by


# ---- lm_head ----


class BiLogitsProcessor(LogitsProcessor):
    """vLLM's LogitsProcessor with the head projection as ``bi.linear`` (scaling, soft cap and vocab slicing are
    vLLM's own elementwise code). Only an unquantized head: its weight is there (vLLM keeps the head's weight when
    it prepacks it on a CPU)."""

    def _apply_head(self, lm_head, hidden_states: torch.Tensor, embedding_bias: torch.Tensor | None) -> torch.Tensor:
        method = lm_head.quant_method
        if not isinstance(method, (UnquantizedEmbeddingMethod, UnquantizedLinearMethod)):
            raise VllmSettingError(f"{SWITCH}=1: bi-compile's lm_head takes an unquantized head; this model's is "
                                   f"quantized ({type(method).__name__})")
        weight = lm_head.weight
        if weight.dim() != 2 or weight.shape[-1] != hidden_states.shape[-1]:
            raise VllmSettingError(f"{SWITCH}=1: the lm_head weight has shape {tuple(weight.shape)}, not "
                                   f"[vocab, {hidden_states.shape[-1]}] (was it prepacked and dropped?)")
        dtype = self.head_dtype or hidden_states.dtype
        bias = None if embedding_bias is None else embedding_bias.to(dtype)
        RAN["lm_head bi.linear"] += 1
        return torch.ops.bi.linear(hidden_states.to(dtype), weight.to(dtype), bias)


# ---- sampler ----


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.log_softmax(-1, dtype=torch.float32)`` through ``bi.log_softmax``."""
    RAN["sampler bi.log_softmax"] += 1
    return torch.ops.bi.log_softmax(logits, -1, logits.dtype in (torch.float16, torch.bfloat16))


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.softmax(-1, dtype=torch.float32)`` through ``bi.softmax``."""
    RAN["sampler bi.softmax"] += 1
    return torch.ops.bi.softmax(logits, -1, logits.dtype in (torch.float16, torch.bfloat16))


def top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    """vLLM's top-k / top-p mask (``apply_top_k_top_p_pytorch``, same semantics) with a row's result fixed by the
    row alone. logits [R, V] float, k [R] integer in 1..V, p [R] float in (0, 1]; masked entries become -inf, in
    place. Top-k is exact: a stable sort and a comparison with the row's k-th largest value (ties at it are kept).
    Top-p sums the sorted probabilities with ``bi.softmax`` and ``bi.cumsum``, whose per-row order depends only on V.
    """
    if k is None and p is None:
        return logits
    if logits.dim() != 2:
        raise VllmSettingError(f"top-k/top-p takes logits [requests, vocab], got shape {tuple(logits.shape)}")
    rows, vocab = logits.shape
    for name, t in (("k", k), ("p", p)):
        if t is not None and tuple(t.shape) != (rows,):
            raise VllmSettingError(f"top-k/top-p: {name} must have shape ({rows},), got {tuple(t.shape)}")
    if k is not None and rows and not bool(((k >= 1) & (k <= vocab)).all()):
        raise VllmSettingError(f"top-k: every k must be in 1..{vocab}, got {k.tolist()}")
    if p is not None and rows and not bool(((p > 0) & (p <= 1)).all()):
        raise VllmSettingError(f"top-p: every p must be in (0, 1], got {p.tolist()}")
    RAN["sampler top-k/top-p"] += 1
    ordered, index = logits.sort(dim=-1, stable=True)  # ascending
    if k is not None:
        kth_largest = ordered.gather(1, (vocab - k.long()).unsqueeze(1))
        ordered.masked_fill_(ordered < kth_largest, -float("inf"))
    if p is not None:
        mass = torch.ops.bi.cumsum(softmax(ordered), -1)
        cut = mass <= 1 - p.unsqueeze(1)
        cut[:, -1] = False  # the most likely token always stays
        ordered.masked_fill_(cut, -float("inf"))
    return logits.scatter_(-1, index, ordered)


class BiTopKTopPSampler(TopKTopPSampler):
    """vLLM's top-k/top-p sampler with bi-compile's row ops; one path on every device (vLLM's FlashInfer and fused
    CPU top-k paths are not used)."""

    def __init__(self, logprobs_mode="raw_logprobs", use_fp64_gumbel: bool = False):
        super().__init__(logprobs_mode, use_fp64_gumbel)
        self.forward = self.forward_bi  # vLLM binds its platform's path to the instance

    def forward_bi(self, logits: torch.Tensor, generators: dict[int, torch.Generator], k: torch.Tensor | None,
                   p: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = top_k_top_p(logits, k, p)
        processed = None
        if self.logprobs_mode == "processed_logits":
            processed = logits
        elif self.logprobs_mode == "processed_logprobs":
            processed = log_softmax(logits)
        if current_platform.is_cpu() and not self.use_fp64_gumbel:
            return gumbel_argmax(logits, generators), processed
        return random_sample(softmax(logits), generators, self.use_fp64_gumbel), processed


def gumbel_argmax(logits: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """vLLM's CPU draw (``forward_cpu``): argmax of logits plus Gumbel noise that vLLM's kernel derives from a per-row
    seed and the token id; a seeded request's seed comes from its own generator, one per step."""
    RAN["sampler gumbel draw"] += 1
    seeds = torch.randint(0, 2**31, (logits.shape[0],), dtype=torch.long)
    for i, generator in generators.items():
        seeds[i] = torch.randint(0, 2**31, (1,), generator=generator, dtype=torch.long).item()
    return torch.ops._C.fused_gumbel_argmax(logits.to(torch.float32), seeds)


class BiSampler(Sampler):
    """vLLM's Sampler with bi-compile's logprobs (``bi.log_softmax``) and top-k/top-p sampler."""

    def __init__(self, logprobs_mode="raw_logprobs", use_fp64_gumbel: bool = False):
        super().__init__(logprobs_mode, use_fp64_gumbel)
        self.topk_topp_sampler = BiTopKTopPSampler(logprobs_mode, use_fp64_gumbel)

    @staticmethod
    def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
        return log_softmax(logits)


def install_sampler(model_runner) -> None:
    """Swap the model runner's vLLM Sampler for a BiSampler with the same settings; refuse what it cannot own."""
    sampler = getattr(model_runner, "sampler", None)
    if type(sampler) is BiSampler:
        return
    if type(sampler) is not Sampler:
        raise VllmSettingError(
            f"{SWITCH}=1: bi-compile's sampler replaces vLLM's V1 {Sampler.__module__}.Sampler; this "
            f"model runner ({type(model_runner).__module__}.{type(model_runner).__name__}) has "
            f"{type(sampler).__module__}.{type(sampler).__name__} (the V2 model runner? set "
            "VLLM_USE_V2_MODEL_RUNNER=0)")
    if getattr(model_runner, "speculative_config", None):
        raise VllmSettingError(f"{SWITCH}=1: speculative decoding's rejection sampler is not batch-invariant "
                               "under bi-compile yet; drop --speculative-config")
    model_runner.sampler = BiSampler(sampler.logprobs_mode, sampler.use_fp64_gumbel)


# ---- the linear layers on a CPU ----

# vLLM's CPU weight set-up (UnquantizedLinearMethod.process_weights_after_loading, 0.32) prepacks an unquantized
# linear's weight for its own kernel (sgl-kernel's AMX weight_packed_linear, or oneDNN) and drops the weight, unless
# the layer carries SKIP_CPU_GEMM_DISPATCH, which vLLM itself sets on MLA's kv_b_proj; then the layer calls torch's
# linear, which reaches the compiled graph as aten.mm and becomes bi.linear. vllm_compat checks that vLLM still
# reads it (0.26 does not: it is not taken on a CPU).


def linear_layer_classes() -> dict[str, type]:
    """vLLM's linear layer classes (``LinearBase`` and every subclass imported so far), by name."""
    from vllm.model_executor.layers.linear import LinearBase

    found, todo = {}, [LinearBase]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.__name__, cls)
        todo.extend(cls.__subclasses__())
    return found


@functools.cache
def plain_weight_layer(cls: type) -> type:
    """``cls`` with the flag that keeps its weight plain on a CPU (same name: vLLM's registry is keyed by it)."""
    return type(cls.__name__, (cls,), {SKIP_CPU_GEMM_DISPATCH: True, "__module__": __name__,
                                       "__qualname__": f"plain_weight_layer({cls.__qualname__})"})


# ---- the worker: where the pieces are installed ----


@contextlib.contextmanager
def layers_registered(layers: dict[str, type]):
    """vLLM's out-of-tree layer registry (``PluggableLayer.register_oot``) holding ``layers`` (vLLM class name ->
    ours) while the block runs: vLLM looks it up when it builds a layer, so only the model built inside gets them.
    A name that another package registered is refused, naming its class."""
    from vllm.model_executor.custom_op import op_registry_oot

    taken = [f"{name} ({op_registry_oot[name].__module__}.{op_registry_oot[name].__qualname__})"
             for name, ours in layers.items() if op_registry_oot.get(name, ours) is not ours]
    if taken:
        raise VllmSettingError(f"{SWITCH}=1 needs vLLM's out-of-tree layer registry for bi-compile's layers, but "
                               f"another class is registered for {', '.join(taken)}")
    added = [name for name in layers if name not in op_registry_oot]
    op_registry_oot.update({name: layers[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            del op_registry_oot[name]


class BiWorker:
    """Mixed in before vLLM's worker class (CPU or GPU): bi-compile's layer classes are registered while the model
    loads (the lm_head's LogitsProcessor; on a CPU every linear layer, flagged to keep its weight plain), on a GPU
    the fused-MoE layers get their pinned config once it is loaded (bi_compile/vllm_moe.py), and the sampler is
    swapped once the model runner exists (``init_device`` builds it)."""

    def init_device(self) -> None:
        check_vllm_api(platform_kind())
        super().init_device()
        install_sampler(self.model_runner)

    def load_model(self, *args, **kwargs) -> None:
        layers = {LOGITS_PROCESSOR_NAME: BiLogitsProcessor}
        if current_platform.is_cpu():
            layers.update({name: plain_weight_layer(cls) for name, cls in linear_layer_classes().items()})
        with layers_registered(layers):
            super().load_model(*args, **kwargs)
        if not current_platform.is_cpu():
            from bi_compile.vllm_moe import own_moe_layers

            self.bi_moe_layers = own_moe_layers(self.model_runner.get_model())


# Our worker class -> the platform kind whose vLLM worker it extends (vllm_compat.WORKER_BASES).
WORKERS = {"BiCPUWorker": "cpu", "BiGPUWorker": "gpu"}


@functools.cache
def _worker(name: str) -> type:
    """Built on first use: each imports its own vLLM worker module only (the GPU one is importable on a CPU too,
    since vLLM's CPUWorker subclasses it)."""
    module, base = WORKER_BASES[WORKERS[name]]
    return type(name, (BiWorker, getattr(importlib.import_module(module), base)),
                {"__module__": __name__, "__qualname__": name})


def __getattr__(name: str) -> type:
    if name in WORKERS:
        return _worker(name)
    raise AttributeError(name)

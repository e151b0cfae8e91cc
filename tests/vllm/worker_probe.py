"""Probe, in a fresh process with vLLM imported (as in a vLLM process), bi-compile's lm_head and sampler
(bi_compile/vllm_worker.py) through vLLM 0.32's own classes, without an engine; print the facts as JSON for
test_vllm_worker.py.

Invariance facts compare a row computed alone with the same row inside batches of 2..64 at random positions; each
has a control: stock vLLM's own lm_head (a CPU kernel that varies with the batch), or the same comparison with one
logit of the row moved by one ulp (the comparison sees it).
"""

from __future__ import annotations

import json
import random
import types

import torch

BATCHES = (2, 3, 8, 17, 33, 64)
VOCAB = 4000


def batches(row: torch.Tensor, seed: int = 0):
    """(batch, position) pairs: ``row`` [1, ...] at a random position among random rows of its kind."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    for m in BATCHES:
        position = rng.randrange(m)
        batch = (torch.randn((m, *row.shape[1:]), generator=g) * row.float().std()).to(row.dtype)
        batch[position] = row[0]
        yield batch, position


def rows_changed(fn, row: torch.Tensor, nudge: bool = False) -> int:
    """How many batches gave ``row`` a different result than alone (bitwise; NaN-free inputs). ``nudge``: the
    batched copy of the row has its largest entry moved up by one ulp (the control: the comparison must see that)."""
    alone = fn(row.clone())[0]
    changed = 0
    for batch, position in batches(row):
        if nudge:
            j = int(batch[position].argmax())
            batch[position, j] = torch.nextafter(batch[position, j], torch.tensor(float("inf"), dtype=batch.dtype))
        changed += not torch.equal(fn(batch)[position], alone)
    return changed


def lm_head_facts(facts: dict) -> None:
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    from bi_compile.vllm_worker import BiLogitsProcessor

    g = torch.Generator().manual_seed(1)
    # Two bf16 heads: one small enough for sgl-kernel's AMX kernel (weights up to 1 MiB, on AMX CPUs), one larger
    # (oneDNN on AVX512-BF16 CPUs). Elsewhere vLLM's CPU head is torch's linear.
    for name, vocab, hidden in (("small", 4000, 128), ("large", 16000, 1024)):
        head = torch.nn.Module()
        head.weight = torch.nn.Parameter((torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(torch.bfloat16),
                                         requires_grad=False)
        head.quant_method, head.tp_size = UnquantizedEmbeddingMethod(), 1
        # vLLM's CPU set-up of the head: its own kernel behind layer.cpu_linear.
        head.quant_method.process_weights_after_loading(head)
        stock, ours = LogitsProcessor(vocab), BiLogitsProcessor(vocab)
        row = torch.randn(1, hidden, generator=g).to(torch.bfloat16)
        facts[f"lm_head_{name}_changed"] = rows_changed(lambda x: ours(head, x), row)
        facts[f"lm_head_{name}_nudged_changed"] = rows_changed(lambda x: ours(head, x), row, nudge=True)
        facts[f"lm_head_{name}_stock_changed"] = rows_changed(lambda x: stock(head, x), row)
        facts[f"lm_head_{name}_close_to_stock"] = torch.allclose(ours(head, row).float(), stock(head, row).float(),
                                                                 rtol=2e-2, atol=2e-2)
        facts[f"lm_head_{name}_equals_bi_linear"] = torch.equal(ours(head, row),
                                                                torch.ops.bi.linear(row, head.weight, None))
    quantized = types.SimpleNamespace(quant_method=object(), weight=head.weight, tp_size=1)
    try:
        ours(quantized, row)
    except Exception as error:  # noqa: BLE001
        facts["lm_head_quantized_error"] = f"{type(error).__name__}: {error}"


def top_k_top_p_facts(facts: dict) -> None:
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    from bi_compile.vllm_worker import top_k_top_p

    g = torch.Generator().manual_seed(2)
    row = torch.randn(1, VOCAB, generator=g) * 4

    def masked(k: int | None, p: float | None):
        def fn(batch: torch.Tensor) -> torch.Tensor:
            m = batch.shape[0]
            kk = None if k is None else torch.full((m,), k, dtype=torch.long)
            pp = None if p is None else torch.full((m,), p)
            return top_k_top_p(batch.clone(), kk, pp)
        return fn

    for name, k, p in (("top_k", 50, None), ("top_p", None, 0.9), ("top_k_top_p", 200, 0.8)):
        facts[f"{name}_changed"] = rows_changed(masked(k, p), row)
        facts[f"{name}_nudged_changed"] = rows_changed(masked(k, p), row, nudge=True)
    # Semantics: vLLM's own masks. Top-k is exact (bitwise the same); top-p on a row whose answer is known.
    batch = torch.randn(8, VOCAB, generator=g)
    k = torch.randint(1, VOCAB, (8,), generator=g)
    facts["top_k_equals_vllm"] = torch.equal(top_k_top_p(batch.clone(), k, None),
                                             apply_top_k_top_p_pytorch(batch.clone(), k, None))
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    kept = top_k_top_p(probs.log(), None, torch.tensor([0.75])).isfinite()[0].tolist()
    facts["top_p_known_answer"] = kept  # p = 0.75 keeps 0.5 and 0.3
    facts["top_p_vllm_answer"] = apply_top_k_top_p_pytorch(probs.log(), None, torch.tensor([0.75])).isfinite()[0].tolist()
    for bad_k in (0, VOCAB + 1):
        try:
            top_k_top_p(batch[:1].clone(), torch.tensor([bad_k]), None)
        except Exception as error:  # noqa: BLE001
            facts[f"top_k_{bad_k}_error"] = f"{type(error).__name__}: {error}"
    try:
        top_k_top_p(batch[:1].clone(), None, torch.tensor([1.5]))
    except Exception as error:  # noqa: BLE001
        facts["top_p_1.5_error"] = f"{type(error).__name__}: {error}"


def sampler_facts(facts: dict) -> None:
    from vllm.v1.sample.sampler import Sampler

    from bi_compile.vllm_checks import RAN
    from bi_compile.vllm_worker import BiSampler, BiTopKTopPSampler

    g = torch.Generator().manual_seed(3)
    row = (torch.randn(1, VOCAB, generator=g) * 4).to(torch.bfloat16)
    sampler = BiSampler("raw_logprobs")
    facts["logprobs_changed"] = rows_changed(sampler.compute_logprobs, row)
    facts["logprobs_nudged_changed"] = rows_changed(sampler.compute_logprobs, row, nudge=True)
    facts["logprobs_close_to_vllm"] = torch.allclose(sampler.compute_logprobs(row), Sampler.compute_logprobs(row),
                                                     atol=1e-5)
    facts["logprobs_dtype"] = str(sampler.compute_logprobs(row).dtype)
    facts["processed_logprobs_dtype"] = None

    # Temperature sampling, seeded per request: the row's seed is 7 wherever it sits; the others' seeds differ.
    temperature_row = row.float() / 0.6

    def draw(seed: int, k: int | None, p: float | None, mode: str = "raw_logprobs"):
        topk_topp = BiTopKTopPSampler(mode)

        def fn(batch: torch.Tensor) -> torch.Tensor:
            m = batch.shape[0]
            position = next(i for i in range(m) if torch.equal(batch[i], temperature_row[0]))
            generators = {i: torch.Generator().manual_seed(seed if i == position else 1000 + i) for i in range(m)}
            kk = None if k is None else torch.full((m,), k, dtype=torch.long)
            pp = None if p is None else torch.full((m,), p)
            tokens = [topk_topp(batch.clone(), generators, kk, pp)[0] for _ in range(16)]  # 16 steps
            return torch.stack(tokens, dim=1)
        return fn

    for name, k, p in (("plain", None, None), ("top_k_top_p", 100, 0.9)):
        facts[f"draw_{name}_changed"] = rows_changed(draw(7, k, p), temperature_row)
        alone = draw(7, k, p)(temperature_row)
        facts[f"draw_{name}_same_seed_repeats"] = torch.equal(alone, draw(7, k, p)(temperature_row))
        facts[f"draw_{name}_other_seed_differs"] = not torch.equal(alone, draw(8, k, p)(temperature_row))
    processed = BiTopKTopPSampler("processed_logprobs")
    _, logprobs = processed(temperature_row.clone(), {0: torch.Generator().manual_seed(7)}, None,
                            torch.tensor([0.9]))
    facts["processed_logprobs_dtype"] = str(logprobs.dtype)
    facts["processed_logprobs_masked"] = int((~logprobs.isfinite()).sum())
    facts["ran"] = dict(RAN)


def install_facts(facts: dict) -> None:
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.v1.sample.sampler import Sampler

    from bi_compile import vllm_platform, vllm_worker
    from bi_compile.vllm_checks import platform_kind
    from bi_compile.vllm_compat import check_vllm_api
    from bi_compile.vllm_worker import BiLogitsProcessor, BiSampler, BiWorker, install_sampler

    facts["api_checked"] = check_vllm_api(platform_kind()).release
    runner = types.SimpleNamespace(sampler=Sampler("processed_logprobs"), speculative_config=None)
    install_sampler(runner)
    facts["installed"] = [type(runner.sampler).__name__, runner.sampler.logprobs_mode,
                          type(runner.sampler.topk_topp_sampler).__name__]
    for name, bad in (("v2", types.SimpleNamespace(sampler=object(), speculative_config=None)),
                      ("spec", types.SimpleNamespace(sampler=Sampler(), speculative_config=object()))):
        try:
            install_sampler(bad)
        except Exception as error:  # noqa: BLE001
            facts[f"install_{name}_error"] = f"{type(error).__name__}: {error}"

    from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear

    class FakeWorker:
        model_runner = types.SimpleNamespace(get_model=lambda: torch.nn.Linear(2, 2))  # a model without MoE layers

        def load_model(self):
            self.during = op_registry_oot.get("LogitsProcessor")
            self.built = type(LogitsProcessor(10)).__name__
            self.linears = {name: op_registry_oot.get(name) for name in ("QKVParallelLinear", "RowParallelLinear")}

    worker = type("W", (BiWorker, FakeWorker), {})()
    worker.load_model()
    facts["load_model"] = {"during": getattr(worker.during, "__name__", None), "built": worker.built,
                           "after": "LogitsProcessor" in op_registry_oot,
                           "built_after": type(LogitsProcessor(10)).__name__}
    facts["linears_during"] = {name: [cls.__name__, issubclass(cls, base), getattr(cls, "_cpu_skip_gemm_dispatch")]
                               for (name, cls), base in zip(worker.linears.items(),
                                                            (QKVParallelLinear, RowParallelLinear))}
    facts["linears_after"] = [name for name in worker.linears if name in op_registry_oot]
    op_registry_oot["LogitsProcessor"] = Sampler  # someone else's class there
    try:
        worker.load_model()
    except Exception as error:  # noqa: BLE001
        facts["load_model_taken_error"] = f"{type(error).__name__}: {error}"
    finally:
        del op_registry_oot["LogitsProcessor"]
    facts["after_taken"] = sorted(op_registry_oot)
    # On a GPU the linear layers stay vLLM's (their F.linear reaches the graph as mm): only the lm_head is ours.
    from unittest import mock

    with mock.patch.object(vllm_worker, "current_platform", types.SimpleNamespace(is_cpu=lambda: False)):
        worker.load_model()
    facts["gpu_load_model"] = {"during": getattr(worker.during, "__name__", None),
                               "linears_during": sorted(name for name, cls in worker.linears.items() if cls),
                               "moe_layers": worker.bi_moe_layers}

    config = types.SimpleNamespace(worker_cls="vllm.v1.worker.cpu_worker.CPUWorker")
    vllm_platform.select_worker(config)
    facts["worker_cls"] = config.worker_cls
    facts["worker_class"] = [c.__name__ for c in vllm_worker.BiCPUWorker.__mro__[:3]]
    named = types.SimpleNamespace(worker_cls="my.own.Worker")
    try:
        vllm_platform.select_worker(named)
    except Exception as error:  # noqa: BLE001
        facts["worker_named_error"] = f"{type(error).__name__}: {error}"
    gpu = types.SimpleNamespace(worker_cls="vllm.v1.worker.gpu_worker.Worker")
    vllm_platform.select_worker(gpu)
    facts["gpu_worker_cls"] = gpu.worker_cls
    facts["gpu_worker_class"] = [c.__name__ for c in vllm_worker.BiGPUWorker.__mro__[:3]]
    # One body for both: the methods the workers extend are BiWorker's, not copies.
    facts["workers_share_methods"] = all(
        getattr(vllm_worker.BiCPUWorker, m) is getattr(vllm_worker.BiGPUWorker, m) is getattr(BiWorker, m)
        for m in ("init_device", "load_model"))
    facts["bi_sampler_is_sampler"] = issubclass(BiSampler, Sampler) and issubclass(BiLogitsProcessor, LogitsProcessor)


def main() -> None:
    import vllm  # noqa: F401  (first, as in every vLLM process)
    from vllm.config import VllmConfig, set_current_vllm_config

    torch.set_num_threads(2)
    facts: dict = {}
    with set_current_vllm_config(VllmConfig()):  # vLLM's layers read it when built
        for part in (lm_head_facts, top_k_top_p_facts, sampler_facts, install_facts):
            part(facts)
    print("PROBE " + json.dumps(facts))


if __name__ == "__main__":
    main()

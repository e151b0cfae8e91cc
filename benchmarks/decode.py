"""Graph-mode decode benchmark: what batch invariance costs per decode step, variant by variant, in one run.

A transformers Qwen3 built from its config with random bf16 weights (no download) at the shapes of Qwen3-0.6B,
1.7B or 8B decodes greedily with a static per-row KV cache (``benchmarks/rowcache.py``): a prefill, then
``--steps`` decode steps driven explicitly (transformers' ``generate()`` would compile a static-cache forward by
itself). Variants:

    eager             stock eager
    override          eager with every matmul/reduction/attention ATen op routed to the bi ops at the CUDA
                      dispatch key (benchmarks/override.py: batch_invariant_ops / VLLM_BATCH_INVARIANT style)
    override+graph    the same, decode step captured in a CUDA graph (vLLM 0.32's fallback shape)
    inductor+graph    torch.compile with stock Inductor, decode step captured whole in a CUDA graph
    bi_ascend+graph   torch.compile with bi_ascend, decode step captured whole in a CUDA graph (FULL_DECODE_ONLY)

Compiled variants compile the decode step once per batch class (batch 1 is specialised by Dynamo, batches >= 2
share one symbolic graph), capture it per batch size with ``torch.cuda.graph``, and feed the prompt through that
graph one position at a time, so no prefill graph is compiled; eager variants prefill in one forward.

For each variant and batch size: TPOT (median over the decode steps of the timed run, CUDA events; compile,
capture and a first run excluded), output tokens/s (batch / TPOT), peak GPU memory, compile+capture time, and an
invariance check that is run, never assumed: the same probe prompt alone (batch 1) and at a random row of the batch
must give bitwise equal next-token logits at every step.

    python benchmarks/decode.py --models qwen3-0.6b --batch-sizes 1 8 32 64 --markdown out.md --plot out.png
    python benchmarks/decode.py --models qwen3-8b --layers 8 --variants inductor+graph bi_ascend+graph
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402

import bi_compile  # noqa: E402
import bi_compile.backend  # noqa: E402,F401  (registers bi_ascend where no entry point does: a source tree)
from benchmarks.override import batch_invariant_override  # noqa: E402
from benchmarks.rowcache import GraphStep, RowCache, RowStep, Step, generate  # noqa: E402

# The Hugging Face checkpoints' config.json values (random weights stand in for the trained ones).
QWEN3_SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=False),
}
QWEN3_COMMON = dict(vocab_size=151936, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=40960,
                    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def qwen3_config(name: str, layers: int | None = None) -> transformers.Qwen3Config:
    shape = dict(QWEN3_SHAPES[name])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    return transformers.Qwen3Config(**QWEN3_COMMON, **shape)


def build_causal_lm(config, *, device: torch.device | str, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """The causal LM of ``config`` with transformers' random init (seeded), SDPA attention, on ``device``."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class Variant:
    name: str
    override: bool = False  # the dispatcher override is active around everything the variant runs
    backend: str | None = None  # torch.compile backend of the step; None: eager
    graph: bool = False  # decode step captured in a CUDA graph


VARIANTS = {v.name: v for v in (
    Variant("eager"),
    Variant("override", override=True),
    Variant("override+graph", override=True, graph=True),
    Variant("inductor+graph", backend="inductor", graph=True),
    Variant("bi_ascend+graph", backend="bi_ascend", graph=True),
)}
BI, INDUCTOR, OVERRIDE_GRAPH, OVERRIDE = "bi_ascend+graph", "inductor+graph", "override+graph", "override"


@dataclass
class Result:
    model: str
    variant: str
    batch: int
    tpot_ms: float
    peak_gib: float | None
    setup_s: float | None  # compile (first use of a batch class) + warm-up + CUDA-graph capture
    mismatched_steps: list[int] | None  # steps whose logits differ from batch 1; None for batch 1 itself

    @property
    def tokens_per_s(self) -> float:
        return self.batch * 1e3 / self.tpot_ms

    @property
    def invariance(self) -> str:
        if self.mismatched_steps is None:
            return "ref"
        if not self.mismatched_steps:
            return "yes"
        return f"NO ({len(self.mismatched_steps)} steps, first {self.mismatched_steps[0]})"


class StepTimer:
    """Times each decode step: CUDA events on the GPU (read after one sync at the end), a host clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []

    @contextlib.contextmanager
    def __call__(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.spans.append((start, end))
        else:
            started = time.perf_counter()
            yield
            self.spans.append(time.perf_counter() - started)

    def median_ms(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return statistics.median(start.elapsed_time(end) for start, end in self.spans)
        return statistics.median(self.spans) * 1e3


def stepwise_prefill(decode: Step) -> Step:
    """Prefill through the decode step, one position at a time (equal-length prompts): a compiled variant then
    needs no prefill graph. Returns the last position's logits [B, 1, V]."""

    def prefill(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        for t in range(tokens.shape[1]):
            logits = decode(tokens[:, t : t + 1].contiguous(), positions[:, t : t + 1].contiguous())
        return logits

    return prefill


def equal_length_prompts(batch: int, context: int, vocab: int, probe: torch.Tensor, seed: int) -> tuple[list, int]:
    """``batch`` random prompts of ``context`` tokens with ``probe`` at a random row; returns (prompts, row)."""
    generator = torch.Generator().manual_seed(seed * 1000 + batch)
    prompts = [torch.randint(vocab, (context,), generator=generator) for _ in range(batch)]
    row = int(torch.randint(batch, (1,), generator=generator))
    prompts[row] = probe
    return [p.to(probe.device) for p in prompts], row


def profile_steps(decode: Step, batch: int, position: int, device: torch.device, path: Path, title: str) -> None:
    """Kernel-time table of 10 decode steps at ``position`` (an unused cache slot past the generated ones)."""
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
    positions = torch.full((batch, 1), position, dtype=torch.long, device=device)
    decode(tokens, positions)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(10):
            decode(tokens, positions)
        torch.cuda.synchronize()
    table = profiler.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=90)
    with path.open("a") as out:
        out.write(f"## {title} (10 steps)\n\n{table}\n")


def run_variant(model, cache: RowCache, model_name: str, variant: Variant, batch_sizes: Sequence[int],
                prompts_for: Callable[[int], tuple[list, int]], steps: int,
                profile: Path | None = None, profile_batches: Sequence[int] = ()) -> list[Result]:
    """Every batch size of one variant, batch 1 first (the reference of the invariance check); with ``profile``,
    appends a kernel-time table for each batch in ``profile_batches`` (CUDA only)."""
    device = cache.layers[0].keys.device
    capture = variant.graph and device.type == "cuda"
    results, reference = [], None
    torch._dynamo.reset()
    with batch_invariant_override() if variant.override else contextlib.nullcontext():
        step = RowStep(model, cache, last_only=True)
        if variant.backend:
            options = {"options": {"inner": "inductor"}} if variant.backend == "bi_ascend" else {}
            step = torch.compile(step, backend=variant.backend, dynamic=True, fullgraph=True, **options)
        for batch in sorted(set(batch_sizes) | {1}):
            prompts, row = prompts_for(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            if capture:
                decode = GraphStep(step, batch, device)
            else:
                decode = step
                if variant.backend:  # compile outside the timed runs
                    idle = torch.zeros(batch, 1, dtype=torch.long, device=device)
                    step(idle, idle)
            setup_s = time.perf_counter() - started if capture or variant.backend else None
            prefill = stepwise_prefill(decode) if variant.backend else step
            check = generate(prefill, decode, cache, prompts, steps, watch=row)  # also the warm-up run
            timer = StepTimer(device)
            generate(prefill, decode, cache, prompts, steps, step_timer=timer)
            if reference is None:
                reference, mismatched = check.watched, None
            else:
                mismatched = torch.nonzero((check.watched != reference).any(-1)).flatten().tolist()
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            result = Result(model_name, variant.name, batch, timer.median_ms(), peak, setup_s, mismatched)
            results.append(result)
            extras = "".join(f"  {label} {value:.{digits}f}" for label, value, digits in
                             (("peak GiB", peak, 2), ("compile+capture s", setup_s, 1)) if value is not None)
            print(f"  {variant.name:16s} batch {batch:3d}: TPOT {result.tpot_ms:8.3f} ms  {result.tokens_per_s:9.1f} tok/s"
                  f"{extras}  invariant {result.invariance}", flush=True)
            if profile and batch in profile_batches and device.type == "cuda":
                profile_steps(decode, batch, cache.max_len - 1, device, profile, f"{model_name} {variant.name} batch {batch}")
            del decode
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def environment(device: torch.device) -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "n/a"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{now}; device {name}; torch {torch.__version__}, triton {triton_version}, "
            f"transformers {transformers.__version__}")


def speedups(results: Sequence[Result]) -> list[tuple[int, float | None, float | None, float | None]]:
    """Per batch: bi+graph speedup over override+graph and over eager override, and the bi+graph / inductor+graph
    step-time ratio (None where a variant did not run)."""
    tpot = {(r.variant, r.batch): r.tpot_ms for r in results}
    rows = []
    for batch in sorted({r.batch for r in results}):
        bi = tpot.get((BI, batch))

        def over(name):
            other = tpot.get((name, batch))
            return None if bi is None or other is None else other / bi

        inductor = tpot.get((INDUCTOR, batch))
        rows.append((batch, over(OVERRIDE_GRAPH), over(OVERRIDE), None if bi is None or inductor is None else bi / inductor))
    return rows


def markdown(title: str, env: str, results: Sequence[Result], audit: str | None) -> str:
    def num(value, fmt):
        return "–" if value is None else format(value, fmt)

    lines = [f"### {title}", "", env, "",
             "| variant | batch | TPOT ms | tokens/s | peak GiB | compile+capture s | invariant |",
             "|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r.variant} | {r.batch} | {r.tpot_ms:.3f} | {r.tokens_per_s:.1f} | {num(r.peak_gib, '.2f')} | "
              f"{num(r.setup_s, '.1f')} | {r.invariance} |" for r in results]
    lines += ["", f"| batch | {BI} speedup (x) over {OVERRIDE_GRAPH} | over {OVERRIDE} (eager) | "
                  f"{BI} / {INDUCTOR} (target <= 1.15) |", "|---:|---:|---:|---:|"]
    lines += [f"| {batch} | {num(a, '.2f')} | {num(b, '.2f')} | {num(c, '.3f')} |" for batch, a, b, c in speedups(results)]
    if audit:
        lines += ["", "bi_ascend audit of the compiled decode graphs:", "", "```", audit, "```"]
    return "\n".join(lines) + "\n"


def plot(path: Path, results: Sequence[Result]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for variant in dict.fromkeys(r.variant for r in results if r.model == model):
            points = sorted((r.batch, r.tpot_ms) for r in results if r.model == model and r.variant == variant)
            ax.plot(*zip(*points), marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # eager steps are 10-50x the graph ones
        ax.set_xlabel("batch size")
        ax.set_ylabel("TPOT (ms)")
        ax.set_title(model)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(QWEN3_SHAPES), default=["qwen3-0.6b"])
    parser.add_argument("--layers", type=int, help="override the number of decoder layers")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--context", type=int, default=256, help="prompt length (tokens)")
    parser.add_argument("--steps", type=int, default=32, help="generated tokens per request (prefill + decode steps)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", type=Path, help="append the tables to this file")
    parser.add_argument("--plot", type=Path, help="write TPOT vs batch size to this PNG")
    parser.add_argument("--profile", type=Path, help="append per-kernel CUDA time tables of decode steps to this file")
    parser.add_argument("--profile-batches", nargs="+", type=int, default=[1, 64], help="batch sizes to profile")
    args = parser.parse_args(argv)
    if args.steps < 3 or min(args.batch_sizes) < 1 or args.context < 1:
        parser.error("need --steps >= 3, batch sizes >= 1 and --context >= 1")
    device = torch.device(args.device)
    env = environment(device)
    print(env, flush=True)

    all_results = []
    with torch.no_grad():
        for name in args.models:
            config = qwen3_config(name, args.layers)
            model = build_causal_lm(config, device=device, dtype=DTYPES[args.dtype], seed=args.seed)
            cache = RowCache(config, max(args.batch_sizes), args.context + args.steps, dtype=model.dtype, device=device)
            probe = torch.randint(config.vocab_size, (args.context,), generator=torch.Generator().manual_seed(args.seed)).to(device)
            title = (f"{name} shapes, {config.num_hidden_layers} layers, {args.dtype}, random weights, context "
                     f"{args.context}, {args.steps - 1} decode steps")
            print(title, flush=True)
            results, audit = [], None
            for variant in args.variants:
                bi_compile.clear_reports()
                results += run_variant(model, cache, name, VARIANTS[variant], args.batch_sizes,
                                       lambda b: equal_length_prompts(b, args.context, config.vocab_size, probe, args.seed),
                                       args.steps, args.profile, args.profile_batches)
                if VARIANTS[variant].backend == "bi_ascend":
                    audit = bi_compile.passes.Report.merge(bi_compile.reports()).format()
            table = markdown(title, env, results, audit)
            print(table, flush=True)
            if args.markdown:  # per model, so a run cut short keeps the tables it finished
                with args.markdown.open("a") as out:
                    out.write(table + "\n")
            all_results += results
            del model, cache
            gc.collect()
    if args.plot:
        plot(args.plot, all_results)
    return all_results


if __name__ == "__main__":
    main()

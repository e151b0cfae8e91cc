"""The ``bi-compile`` command's work, once ``bi_compile_cli`` has parsed and checked the arguments.

- ``check``: does a request get the same tokens and logprobs alone and inside batches, under stock
  torch.compile and under ``bi_ascend``? Exit 0 only when ``bi_ascend`` is invariant.
- ``audit``: what the pass pipeline rewrote in a model or an exported program, and what it left.
- ``ops``: the replacement table (``--markdown`` is the table in docs/design.md).

Both ``check`` and ``audit`` open with a header (model, device, dtype, graphs compiled, versions). Unless
``--verbose``, torch's log lines and warnings stay quiet: the command's own output says what happened.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bi_compile.model import ModelError, build_model, generate



class CommandError(ValueError):
    """Bad input that shows only once torch is loaded (a device, a checkpoint, an exported file): the front end
    reports it as a usage error."""


PROMPT_LENGTHS = (4, 32)  # prompt lengths are drawn from this range, bounds included
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OP_TABLE_START, OP_TABLE_END = "<!-- op-table:start -->", "<!-- op-table:end -->"


# ------------------------------------------------------------------------------------------ device & model


def resolve_device(name: str, dtype: str) -> tuple[str, torch.dtype]:
    if name == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: torch sees no CUDA GPU here")
    if name == "npu":
        try:
            import torch_npu  # noqa: F401  (registers the npu device with torch)
        except ImportError:
            raise CommandError("--device npu needs torch_npu (pip install 'bi-compile[ascend]')") from None
        if not torch.npu.is_available():
            raise CommandError("--device npu: torch_npu sees no NPU here")
    if dtype == "auto":  # fp32 is what CPUs do well; accelerators run the bf16 of real serving
        return name, torch.float32 if name == "cpu" else torch.bfloat16
    return name, DTYPES[dtype]


def load_model(args, max_batch: int, max_seq: int):
    device, dtype = resolve_device(args.device, args.dtype)
    model = build_model(args.model, device=device, dtype=dtype, seed=args.seed)
    model.setup_caches(max_batch, max_seq)
    return model


def compile_bi(model, inner: str):
    import bi_compile.backend  # noqa: F401  (registers "bi_ascend" when the package is not pip-installed)

    return torch.compile(model, backend="bi_ascend", dynamic=True, fullgraph=True, options={"inner": inner})


@contextlib.contextmanager
def report_instead_of_warnings():
    """The commands print the full report, so the backend's per-graph warning would only repeat it."""
    from bi_compile.passes import BatchInvarianceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BatchInvarianceWarning)
        yield


def merged_report():
    import bi_compile

    return bi_compile.Report.merge(bi_compile.reports())


@contextlib.contextmanager
def torch_quiet(verbose: bool):
    """torch's log records and warnings off for the command, unless --verbose: its output says what happened."""
    if verbose:
        yield
        return
    torch_logger = logging.getLogger("torch")
    level = torch_logger.level
    torch_logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_logger.setLevel(level)


def versions() -> str:
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "not installed"
    return f"torch {torch.__version__}, triton {triton}"


class Progress:
    """A tqdm bar on a terminal; elsewhere (a log file, CI) one line per stage with the time since the start."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.start = time.perf_counter()
        self.bar = tqdm(total=total, unit="run", file=sys.stderr) if sys.stderr.isatty() else None

    def stage(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)
        else:
            print(f"[{time.perf_counter() - self.start:7.1f} s] {text}", file=sys.stderr, flush=True)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------- check


@dataclass
class VariantResult:
    name: str
    changed: dict[int, set[int]] = field(default_factory=dict)  # batch size -> prompts that changed
    first_step: dict[int, int] = field(default_factory=dict)  # prompt -> earliest step that differed
    seconds: float = 0.0

    @property
    def changed_prompts(self) -> list[int]:
        return sorted(set().union(*self.changed.values()))

    @property
    def invariant(self) -> bool:
        return not self.changed_prompts

    def record(self, batch_size: int, prompt: int, step: int | None) -> None:
        self.changed.setdefault(batch_size, set())
        if step is not None:
            self.changed[batch_size].add(prompt)
            self.first_step[prompt] = min(step, self.first_step.get(prompt, step))

    def to_dict(self) -> dict:
        return {
            "batch_sizes": sorted(self.changed),
            "changed_prompts": self.changed_prompts,
            "changed_by_batch_size": {str(bs): len(p) for bs, p in sorted(self.changed.items())},
            "first_differing_step": min(self.first_step.values(), default=None),
            "invariant": self.invariant,
            "seconds": round(self.seconds, 1),
        }


def first_difference(tokens_a, logprobs_a, tokens_b, logprobs_b) -> int | None:
    """The first step whose token or logprob bits differ, or None when the runs agree bit for bit."""
    differs = (tokens_a != tokens_b) | (logprobs_a.view(torch.int32) != logprobs_b.view(torch.int32))
    return int(differs.nonzero()[0]) if differs.any() else None


def batch_layouts(num_prompts: int, batch_size: int, rng: random.Random) -> list[list[int | None]]:
    """Every prompt once, at a random row of some batch of ``batch_size``; None marks a filler row."""
    if batch_size == 1:
        return [[p] for p in range(num_prompts)]
    rows: list[int | None] = list(range(num_prompts))
    rows += [None] * (-num_prompts % batch_size)
    rng.shuffle(rows)
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


@dataclass
class Workload:
    prompts: list[torch.Tensor]  # the test prompts, 1-D token ids
    batches: dict[int, list[tuple[list[int | None], list[torch.Tensor]]]]  # size -> (prompt per row, row tokens)


def make_workload(num_prompts: int, batch_sizes: list[int], vocab: int, rng: random.Random) -> Workload:
    """Random prompts of ragged lengths; each batch holds test prompts at random rows, random fillers elsewhere."""
    def random_prompt():
        return torch.tensor([rng.randrange(vocab) for _ in range(rng.randint(*PROMPT_LENGTHS))])

    prompts = [random_prompt() for _ in range(num_prompts)]
    batches = {bs: [(rows, [random_prompt() if p is None else prompts[p] for p in rows])
                    for rows in batch_layouts(num_prompts, bs, rng)]
               for bs in batch_sizes}
    return Workload(prompts, batches)


def run_variant(name: str, model, forward, work: Workload, steps: int, progress: Progress) -> VariantResult:
    result, start = VariantResult(name), time.perf_counter()
    progress.stage(f"{name}: prompts alone (the first calls compile)")
    alone = []
    for prompt in work.prompts:
        alone.append(generate(model, [prompt], steps, forward=forward))
        progress.update()
    for bs, batches in work.batches.items():
        progress.stage(f"{name}: batch size {bs}")
        for rows, tokens in batches:
            out = generate(model, tokens, steps, forward=forward)
            for row, p in enumerate(rows):
                if p is not None:
                    ref = alone[p]
                    result.record(bs, p, first_difference(ref.tokens[0], ref.logprobs[0], out.tokens[row], out.logprobs[row]))
            progress.update()
    result.seconds = time.perf_counter() - start
    return result


def run_check(args) -> bool:
    import bi_compile

    batch_sizes = sorted(set(args.batch_sizes))
    model = load_model(args, max(batch_sizes), PROMPT_LENGTHS[1] + args.steps)
    work = make_workload(args.prompts, batch_sizes, model.config.vocab_size, random.Random(args.seed))
    variants = {"stock": lambda: torch.compile(model, backend="inductor", dynamic=True, fullgraph=True),
                "bi_ascend": lambda: compile_bi(model, args.inner)}
    progress = Progress(len(variants) * (len(work.prompts) + sum(len(b) for b in work.batches.values())))
    results = []
    with report_instead_of_warnings():
        for name, compile_variant in variants.items():
            torch._dynamo.reset()  # each variant compiles its own graphs
            bi_compile.clear_reports()
            results.append(run_variant(name, model, compile_variant(), work, args.steps, progress))
    progress.close()
    graphs = bi_compile.reports()  # bi_ascend ran last: its graphs
    report = bi_compile.Report.merge(graphs)
    stock, bi = results

    weight = model.embed_tokens.weight
    summary = {
        "model": args.model, "device": str(weight.device), "dtype": str(weight.dtype).removeprefix("torch."),
        "versions": versions(), "graphs": len(graphs),
        "prompts": len(work.prompts), "prompt_lengths": [len(p) for p in work.prompts], "steps": args.steps,
        "seed": args.seed, "variants": {r.name: r.to_dict() for r in results},
        "invariant": bi.invariant, "control_variant": not stock.invariant, "audit": report.to_dict(),
    }
    print(json.dumps(summary) if args.json else format_check(summary, results, report), flush=True)
    if args.plot:  # after the results, so that they are out even if the plot fails
        plot_mismatches(results, len(work.prompts), args.plot)
    return bi.invariant


def format_check(summary: dict, results: list[VariantResult], report) -> str:
    n = summary["prompts"]
    head = (f"model {summary['model']} on {summary['device']} ({summary['dtype']}): {n} prompts of "
            f"{min(summary['prompt_lengths'])}-{max(summary['prompt_lengths'])} tokens, {summary['steps']} greedy steps, "
            f"seed {summary['seed']}; each prompt alone vs. inside batches at random rows\n"
            f"{summary['versions']}; bi_ascend compiled {summary['graphs']} graphs")
    table = [("variant", "batch sizes", "prompts changed", "changed per batch size", "first differing step")]
    for r in results:
        d = r.to_dict()
        step = d["first_differing_step"]
        table.append((r.name, " ".join(map(str, d["batch_sizes"])), f"{len(d['changed_prompts'])}/{n}",
                      " ".join(f"{bs}:{k}" for bs, k in d["changed_by_batch_size"].items()),
                      "-" if step is None else str(step)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [head, ""] + ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    stock, bi = results
    lines += ["", "audit of the bi_ascend graphs:", report.format(), ""]
    lines.append("stock torch.compile: " + (
        f"batch-variant, {len(stock.changed_prompts)}/{n} prompts changed (the expected control)" if not stock.invariant
        else "no prompt changed at these sizes (the control showed no variance here: try more prompts, steps or larger batches)"))
    lines.append("bi_ascend: " + ("INVARIANT: every prompt gave the same tokens and bit-identical logprobs alone and in every batch"
                                  if bi.invariant else f"NOT INVARIANT: {len(bi.changed_prompts)}/{n} prompts changed"))
    return "\n".join(lines)


def plot_mismatches(results: list[VariantResult], num_prompts: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_sizes = sorted(results[0].changed)
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, r in enumerate(results):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(batch_sizes))]
        bars = ax.bar(xs, [len(r.changed[bs]) for bs in batch_sizes], width, label=r.name)
        ax.bar_label(bars)  # a zero is a result too: label it, since a zero-height bar is invisible
    ax.set_xticks(range(len(batch_sizes)), [str(bs) for bs in batch_sizes])
    ax.set_ylim(0, num_prompts * 1.15)
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"prompts changed (of {num_prompts})")
    ax.set_title("Tokens or logprobs that differ from the prompt run alone")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- audit


def run_audit(args) -> bool:
    import bi_compile

    bi_compile.clear_reports()
    with report_instead_of_warnings():
        if args.exported:
            report = audit_exported_file(args.exported)
            head = f"audit of the exported program {args.exported}; {versions()}"
        else:
            model = audit_model(args)
            weight = model.embed_tokens.weight
            report = merged_report()
            head = (f"audit of model {args.model} on {weight.device} ({str(weight.dtype).removeprefix('torch.')}): "
                    f"{len(bi_compile.reports())} graphs compiled by bi_ascend (prefill and decode); {versions()}")
    print(json.dumps({"header": head, **report.to_dict()}) if args.json else f"{head}\n{report.format()}")
    return not (args.strict and report.findings)


def audit_exported_file(path: str):
    from bi_compile.passes import audit_exported

    try:
        exported = torch.export.load(path)
    except Exception as error:  # a file that is not a torch.export archive: say so in one line
        raise CommandError(f"--exported {path}: not a torch.export program ({type(error).__name__}: {error})") from None
    return audit_exported(exported)


def audit_model(args):
    model = load_model(args, 2, 16)
    prompts = [torch.arange(3), torch.arange(5)]  # two ragged rows: the prefill and decode graphs, batch symbolic
    generate(model, prompts, 2, forward=compile_bi(model, args.inner))
    return model


# --------------------------------------------------------------------------------------------------- ops


def op_table_rows() -> list[tuple[str, str, str]]:
    from bi_compile.passes import REPLACEMENTS

    return [(row.source, row.target, row.note) for row in REPLACEMENTS]


def op_table_markdown() -> str:
    lines = ["| op in the captured graph | batch-invariant op | note |", "|---|---|---|"]
    lines += [f"| `{source}` | `{target}` | {note.replace('|', '&#124;')} |" for source, target, note in op_table_rows()]
    return "\n".join(lines)


def replace_op_table(text: str, table: str) -> str:
    """``text`` with the part between the op-table markers replaced by ``table``."""
    start, end = text.find(OP_TABLE_START), text.find(OP_TABLE_END)
    if start < 0 or end < start:
        raise CommandError(f"no {OP_TABLE_START} ... {OP_TABLE_END} markers found")
    return text[: start + len(OP_TABLE_START)] + "\n" + table + "\n" + text[end:]


def run_ops(args) -> bool:
    if args.update:
        path = Path(args.update)
        path.write_text(replace_op_table(path.read_text(), op_table_markdown()))
    elif args.markdown:
        print(op_table_markdown())
    else:
        rows = op_table_rows()
        width = max(len(source) for source, _, _ in rows)
        for source, target, note in rows:
            print(f"{source.ljust(width)}  -> {target:<15} {note}".rstrip())
    return True


# ------------------------------------------------------------------------------------------------- entry


COMMANDS = {"check": run_check, "audit": run_audit, "ops": run_ops}


def run(args) -> bool:
    """Run a parsed command (bi_compile_cli.main parses and checks the arguments first): whether it passed (for
    ``check``, bi_ascend invariant; for ``audit --strict``, no finding). Bad input found here raises
    ``CommandError``."""
    with torch_quiet(args.verbose):
        try:
            return COMMANDS[args.command](args)
        except ModelError as error:  # a model name or checkpoint the embedded decoder cannot take
            raise CommandError(str(error)) from None

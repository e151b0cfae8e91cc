"""The ``bi-compile`` command's front end: it parses and checks the arguments, then hands them to ``bi_compile.cli``.

It imports neither torch nor the ``bi_compile`` package (whose ``__init__`` imports torch, and must, for vLLM's sake:
docs/vllm.md, "What bi_compile.post_grad_pass must be"). So ``--help`` and a mistake answer at once, and every path
the run will write to is checked before minutes of compiling.

Exit statuses:

    0  the command did what it was asked (``check``: bi_ascend invariant)
    1  batch variance found (``check``: bi_ascend changed a prompt; ``audit --strict``: nodes left)
    2  a usage error: bad arguments, an unknown model, a device that is not there (one line on stderr)
    3  the run itself failed (one line on stderr naming the error; ``--verbose`` shows the traceback)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

EXIT_OK, EXIT_VARIANT, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3
# bi_compile.model.PRESETS' names, spelled here so that no torch import is needed to check --model (a test keeps the
# two equal).
MODEL_PRESETS = ("tiny", "qwen3-0.6b", "qwen3-1.7b", "qwen3-8b")
DTYPES = ("float32", "bfloat16", "float16")
PLOT_SUFFIXES = (".png", ".pdf", ".svg")
BENCHMARKS = ("kernels", "decode", "prefill", "tiles", "attention_tiles", "rows", "serve")
# Where the benchmarks are: next to this file in a source checkout; an installed package has none.
SOURCE_ROOT = Path(__file__).resolve().parent


class UsageError(Exception):
    """A request the command cannot run; printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the whole usage block; one line is enough
        raise UsageError(f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def model_name(text: str) -> str:
    """A preset, or a directory holding a Hugging Face config (bi_compile.model checks its family and weights)."""
    if text in MODEL_PRESETS or (Path(text) / "config.json").is_file():
        return text
    raise argparse.ArgumentTypeError(f"unknown model {text!r}: use one of {', '.join(MODEL_PRESETS)} or the directory "
                                     "of a local Hugging Face Qwen3 checkpoint")


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text


def plot_path(text: str) -> str:
    """A file the plot can be written to, checked now rather than after the run."""
    path = Path(text)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text}: the plot is written as {', '.join(PLOT_SUFFIXES)}")
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such directory {str(folder)!r}")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text}: not writable")
    return text


def build_parser() -> Parser:
    parser = Parser(prog="bi-compile", formatter_class=argparse.RawDescriptionHelpFormatter,
                    description="Batch-invariant LLM inference in graph mode: check, audit, benchmark.",
                    epilog="exit status: 0 done (check: bi_ascend invariant), 1 batch variance found, "
                           "2 usage error, 3 the run failed")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    verbose = Parser(add_help=False)
    verbose.add_argument("--verbose", action="store_true",
                         help="show torch's log and warnings, and the traceback of a failed run")

    model = Parser(add_help=False, parents=[verbose])
    model.add_argument("--model", default="tiny", type=model_name, metavar="NAME|PATH",
                       help=f"{', '.join(MODEL_PRESETS)} (random weights), or the directory of a local Hugging Face "
                            "Qwen3 checkpoint: check and audit run the embedded Qwen3 decoder, so Qwen3 is the one "
                            "family they take (default: tiny)")
    model.add_argument("--device", default="cpu", choices=["cpu", "cuda", "npu"])
    model.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: float32 on cpu, bfloat16 elsewhere")
    model.add_argument("--seed", type=int, default=0, help="weights, prompts and batch placement")
    model.add_argument("--inner", default="inductor", choices=["inductor", "eager"], help="bi_ascend's inner compiler")
    model.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")

    check = commands.add_parser("check", parents=[model], help="alone vs. batched generation, stock vs. bi_ascend")
    check.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 2, 8, 32], metavar="N",
                       help="1 reruns each prompt alone; larger sizes place it at a random row (default: 1 2 8 32)")
    check.add_argument("--steps", type=positive_int, default=8, help="greedy tokens per prompt (default: 8)")
    check.add_argument("--prompts", type=positive_int, default=8, help="test prompts (default: 8)")
    check.add_argument("--plot", type=plot_path, metavar="FILE.png",
                       help="bar chart of changed prompts per batch size and variant (.png, .pdf or .svg)")

    audit = commands.add_parser("audit", parents=[model], help="what the passes rewrote and what they left")
    audit.add_argument("--exported", type=existing_file, metavar="FILE.pt2",
                       help="audit a torch.export program instead of a model")
    audit.add_argument("--strict", action="store_true", help="exit 1 if any node is left variant or unknown")

    bench = commands.add_parser("bench", help="run a benchmark script of a source checkout with ARGS")
    bench.add_argument("which", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="passed on to the benchmark script")

    ops = commands.add_parser("ops", parents=[verbose], help="the replacement table: graph op -> batch-invariant op")
    ops.add_argument("--markdown", action="store_true", help="as the markdown table of docs/design.md")
    ops.add_argument("--update", type=existing_file, metavar="FILE.md",
                     help="rewrite the table between the op-table markers of FILE.md")
    return parser


def run_bench(args) -> int:
    script = SOURCE_ROOT / "benchmarks" / f"{args.which}.py"
    if not script.is_file():
        raise UsageError(f"bench {args.which}: {script} is not here; the benchmarks ship with the source checkout, "
                         "not with an installed package (clone the repository and run it from there)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.call([sys.executable, str(script), *args.args], env=env)


def describe(error: BaseException) -> str:
    """One line for a failed run: the bi-compile error inside torch's wrappers (InductorError, BackendCompilerFailed)
    where there is one, else the error itself."""
    seen, current = [], error
    while current is not None and current not in seen:
        seen.append(current)
        current = getattr(current, "inner_exception", None) or current.__cause__ or current.__context__
    ours = [e for e in seen if type(e).__module__.startswith("bi_compile")]
    chosen = ours[-1] if ours else error
    message = str(chosen).strip().splitlines()
    return f"{type(chosen).__name__}: {message[0] if message else ''}" + (" ..." if len(message) > 1 else "")


def main(argv: list[str] | None = None) -> int:
    verbose = False
    try:
        args = build_parser().parse_args(argv)
        verbose = getattr(args, "verbose", False)
        if args.command == "bench":
            return run_bench(args)
        from bi_compile import cli  # torch loads here, once the arguments are known good

        try:
            return EXIT_OK if cli.run(args) else EXIT_VARIANT
        except cli.CommandError as error:
            raise UsageError(str(error)) from None
    except UsageError as error:
        print(f"bi-compile: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:
        if verbose:
            raise
        print(f"bi-compile: failed: {describe(error)} (--verbose shows more)", file=sys.stderr)
        return EXIT_FAILED

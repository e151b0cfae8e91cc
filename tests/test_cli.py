"""The bi-compile command: usage errors before torch loads, failed runs in one line, the pieces of `check`, `bench`
forwarding, `ops` and the docs' op table."""

import importlib.util
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bi_compile_cli
from bi_compile import cli
from bi_compile.model import PRESETS

REPO = Path(__file__).resolve().parent.parent


def has_module(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package that is not there
        return False


def run_cli(capsys, *argv):
    status = bi_compile_cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def assert_usage_error(status, err, *fragments):
    assert status == 2
    assert err.startswith("bi-compile: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


@pytest.mark.parametrize("argv, fragment", [
    ([], "required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["check", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["check", "--steps", "0"], "argument --steps"),
    (["check", "--batch-sizes", "2", "x"], "argument --batch-sizes"),
    (["check", "--device", "tpu"], "argument --device"),
    (["check", "--dtype", "float64"], "argument --dtype"),
    (["audit", "--exported", "/no/such/file.pt2"], "no such file"),
    (["bench", "fastest"], "argument which"),
    (["check", "--plot", "/no/such/dir/mismatch.png"], "no such directory"),
    (["check", "--plot", "mismatch.txt"], "the plot is written as"),
    (["ops", "--update", "/no/such/design.md"], "no such file"),
])
def test_bad_arguments_give_one_line_and_status_2(capsys, argv, fragment):
    assert_usage_error(*run_cli(capsys, *argv)[::2], fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_missing_cuda_device(capsys):
    assert_usage_error(*run_cli(capsys, "check", "--device", "cuda")[::2], "no CUDA GPU")


@pytest.mark.skipif(has_module("torch_npu"), reason="torch_npu is installed here")
def test_missing_npu_device(capsys):
    assert_usage_error(*run_cli(capsys, "audit", "--device", "npu")[::2], "needs torch_npu")


def test_exported_file_that_is_not_a_program(capsys, tmp_path):
    bogus = tmp_path / "bogus.pt2"
    bogus.write_text("not a zip archive")
    assert_usage_error(*run_cli(capsys, "audit", "--exported", str(bogus))[::2], "not a torch.export program")


def test_entry_point_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "bi_compile", "check", "--model", "gpt-17"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and "unknown model" in proc.stderr


def run_front_end(*argv) -> tuple[subprocess.CompletedProcess, float, bool]:
    """The command's front end in a fresh interpreter: its result, seconds, and whether torch got imported."""
    code = ("import sys, bi_compile_cli; status = bi_compile_cli.main(sys.argv[1:]); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(status)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO, timeout=60)
    return proc, time.perf_counter() - start, proc.stdout.strip().endswith("torch imported")


@pytest.mark.parametrize("argv", [["--help"], ["check", "--help"], ["check", "--steps", "0"], ["audit", "--model", "x"]])
def test_help_and_bad_arguments_answer_before_torch_loads(argv):
    proc, seconds, torch_imported = run_front_end(*argv)
    assert not torch_imported and proc.returncode in (0, 2), proc.stderr
    assert seconds < 3, f"{seconds:.1f} s"  # a guard, not a benchmark: torch alone takes seconds to import
    if proc.returncode == 2:
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_help_lists_the_exit_statuses():
    proc, _, _ = run_front_end("--help")
    assert "0 done" in proc.stdout and "1 batch variance found" in proc.stdout and "3 the run failed" in proc.stdout


def test_plot_to_a_missing_directory_is_refused_before_any_compile(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(cli.COMMANDS, "check", lambda args: pytest.fail("the check ran"))
    assert_usage_error(*run_cli(capsys, "check", "--plot", str(tmp_path / "missing" / "x.png"))[::2], "no such directory")


def test_model_presets_are_spelled_alike_in_the_front_end():
    assert bi_compile_cli.MODEL_PRESETS == tuple(PRESETS)


def test_a_checkpoint_of_another_family_is_named(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_usage_error(*run_cli(capsys, "audit", "--model", str(tmp_path))[::2], "'llama'", "only Qwen3")


@torch.library.custom_op("bi_cli_test::opaque", mutates_args=())
def opaque(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@opaque.register_fake
def _(x):
    return torch.empty_like(x)


def strict_failure(args):
    """A real strict-mode failure: an op the pipeline does not know, compiled with strict=True; torch wraps the
    pipeline's BatchInvarianceError in its own BackendCompilerFailed."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: opaque(x) + 1, backend="bi_ascend", options={"strict": True, "inner": "eager"})
    compiled(torch.ones(3))


def test_a_failed_run_is_one_line_naming_the_bi_compile_error(capsys, monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "audit", strict_failure)
    status, out, err = run_cli(capsys, "audit")
    assert status == 3 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert "BatchInvarianceError: 1 node(s) are not batch-invariant (strict mode): ..." in err and "--verbose" in err
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="bi_cli_test.opaque"):
        bi_compile_cli.main(["audit", "--verbose"])


def test_progress_logs_a_line_per_stage_off_a_terminal(capsys):
    progress = cli.Progress(total=2)
    progress.stage("stock: batch size 8")
    progress.update()
    progress.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.strip().endswith("s] stock: batch size 8")


def test_batch_layouts_place_every_prompt_once():
    for batch_size in (1, 2, 3, 8):
        layouts = cli.batch_layouts(7, batch_size, random.Random(0))
        assert all(len(rows) == batch_size for rows in layouts)
        rows = [p for batch in layouts for p in batch]
        assert sorted(p for p in rows if p is not None) == list(range(7))
        assert rows.count(None) == (-7 % batch_size if batch_size > 1 else 0)


def test_first_difference_compares_bits():
    tokens, logprobs = torch.tensor([5, 6, 7]), torch.tensor([-1.0, -2.0, -3.0])
    assert cli.first_difference(tokens, logprobs, tokens.clone(), logprobs.clone()) is None
    nudged = logprobs.clone()
    nudged[1] = torch.nextafter(nudged[1], torch.tensor(0.0))
    assert cli.first_difference(tokens, logprobs, tokens, nudged) == 1
    assert cli.first_difference(tokens, logprobs, torch.tensor([5, 6, 8]), logprobs) == 2


def test_variant_result_summary():
    result = cli.VariantResult("stock")
    for bs, prompt, step in [(1, 0, None), (1, 1, None), (4, 0, None), (4, 1, 3), (16, 1, 1), (16, 0, None)]:
        result.record(bs, prompt, step)
    assert result.to_dict() | {"seconds": 0} == {
        "batch_sizes": [1, 4, 16], "changed_prompts": [1], "changed_by_batch_size": {"1": 0, "4": 1, "16": 1},
        "first_differing_step": 1, "invariant": False, "seconds": 0,
    }


def write_script(root, name, body):
    (root / "benchmarks").mkdir(exist_ok=True)
    (root / "benchmarks" / f"{name}.py").write_text(body)


def test_bench_forwards_arguments_and_status(monkeypatch, tmp_path):
    write_script(tmp_path, "decode", "import sys, json\n"
                 f"open({str(tmp_path / 'args.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\nsys.exit(3)\n")
    monkeypatch.setattr(bi_compile_cli, "SOURCE_ROOT", tmp_path)
    assert bi_compile_cli.main(["bench", "decode", "--batch-sizes", "1", "8", "--help"]) == 3
    assert json.loads((tmp_path / "args.json").read_text()) == ["--batch-sizes", "1", "8", "--help"]


def test_bench_without_a_source_checkout(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(bi_compile_cli, "SOURCE_ROOT", tmp_path)
    assert_usage_error(*run_cli(capsys, "bench", "kernels")[::2], "source checkout")


def test_replace_op_table_keeps_the_text_around_it():
    text = f"intro\n{cli.OP_TABLE_START}\nold\n{cli.OP_TABLE_END}\noutro\n"
    assert cli.replace_op_table(text, "NEW") == f"intro\n{cli.OP_TABLE_START}\nNEW\n{cli.OP_TABLE_END}\noutro\n"
    with pytest.raises(cli.CommandError, match="markers"):
        cli.replace_op_table("no markers", "NEW")


@pytest.mark.skipif(not has_module("bi_compile.passes.replace"), reason="bi_compile.passes.replace is not written yet")
def test_design_doc_op_table_is_generated_from_the_code():
    from bi_compile.passes.replace import REPLACEMENTS

    table = cli.op_table_markdown()
    assert len(table.splitlines()) == 2 + len(REPLACEMENTS)
    doc = (REPO / "docs" / "design.md").read_text()
    assert cli.replace_op_table(doc, table) == doc, "docs/design.md is stale: run `bi-compile ops --update docs/design.md`"


@pytest.mark.skipif(not has_module("bi_compile.backend"), reason="the bi_ascend backend is not written yet")
def test_audit_json_on_the_tiny_model(capsys):
    status, out, _ = run_cli(capsys, "audit", "--inner", "eager", "--json")
    report = json.loads(out)
    assert status == 0 and report["rewrites"] and set(report["counts"]) == {"invariant", "variant", "unknown"}
    assert "model tiny on cpu (float32): 2 graphs compiled" in report["header"] and "torch 2." in report["header"]
    assert any("bi.linear" in rewrite for rewrite in report["rewrites"])


@pytest.mark.slow
@pytest.mark.skipif(not has_module("bi_compile.backend"), reason="the bi_ascend backend is not written yet")
def test_check_end_to_end_on_the_tiny_model(capsys, tmp_path):
    """The README's first command, smaller: bi_ascend invariant (status 0), stock compiled as the control."""
    plot = tmp_path / "mismatch.png"
    status, out, _ = run_cli(capsys, "check", "--batch-sizes", "1", "5", "--prompts", "5", "--steps", "4",
                             "--json", "--plot", str(plot))
    summary = json.loads(out)
    assert status == 0 and summary["invariant"] and summary["variants"]["bi_ascend"]["changed_prompts"] == []
    assert summary["variants"]["stock"]["batch_sizes"] == [1, 5]
    assert summary["audit"]["rewrites"] and summary["audit"]["findings"] == []
    assert plot.read_bytes().startswith(b"\x89PNG")

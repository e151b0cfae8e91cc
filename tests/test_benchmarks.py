"""The GPU benchmark scripts on this CPU machine: they import and parse their arguments, and the pieces of the
row-kernel search that need no GPU (its candidates and its invariance check, under Triton's interpreter) work.
Their timings run on the H100 only (``benchmarks/gpu_run.sh``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["kernels", "tiles", "attention_tiles", "rows", "serve", "all_reduce", "moe",
                                    "cuda_bits", "profile_table", "prefill"])
def test_script_parses_its_arguments(script):
    done = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), "--help"], capture_output=True, text=True,
                          cwd=BENCHMARKS.parent, env={"PYTHONPATH": f"{BENCHMARKS.parent}", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_all_reduce_benchmark_refuses_without_enough_gpus():
    if torch.cuda.device_count() >= 4:
        pytest.skip("4 GPUs here: the benchmark would run")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "all_reduce.py")], capture_output=True, text=True,
                          cwd=BENCHMARKS.parent, timeout=120)
    assert done.returncode == 2
    assert "needs 4 CUDA GPUs on one host" in done.stderr and done.stdout == ""


@pytest.fixture
def rows(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import rows

    return rows


def test_row_search_candidates_fit_the_registers(rows):
    for width in (1024, 4096):
        candidates = rows.candidates(width, split=True)
        assert candidates and all(b.fused and b.block >= width and not b.piece for b in candidates)
        assert all(b.block * b.rows // (32 * b.num_warps) <= 128 for b in candidates)
    whole, split = rows.candidates(151936, split=False), rows.candidates(151936, split=True)
    assert whole and all(not b.fused and b.rows == 1 and b.block // (32 * b.num_warps) <= 64 for b in split)
    assert not any(b.piece for b in whole) and set(whole) < set(split)  # only a kernel that can split gets pieces
    assert {op.name for op in rows.OPS if op.split} == {"sum", "mean"}
    assert {(o.name, o.width) for o in rows.OPS} >= {("rms_norm", 4096), ("softmax", 1024), ("sum", 151936),
                                                    ("layer_norm", 768), ("layer_norm", 8192)}
    assert rows.bar_gbs("layer_norm", 3000.0, 2000.0) == 0.85 * 2000.0  # issue 24: 85% of the same-size copy


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees inf - inf
def test_row_search_invariance_check_passes_the_kernels_and_catches_a_variant_op(rows):
    x = torch.randn(40, 300, generator=torch.Generator().manual_seed(0))
    for op in (rows.sum_op(300, mean=True), rows.softmax_op(300, log=True), rows.rms_norm_op(300), rows.layer_norm_op(300)):
        assert rows.invariant(op, rows.RowBlocking(512, 2, True, 4), x, ms=[1, 3, 20])
    # The control: a "kernel" whose sum order depends on M (halves summed apart once M > 8) fails the check.
    variant = rows.Op("sum", 300, lambda t, b: t.sum(-1) if len(t) <= 8 else t[:, :150].sum(-1) + t[:, 150:].sum(-1),
                      lambda t: t.sum(-1))
    assert not rows.invariant(variant, None, x, ms=[1, 3, 20])


def test_row_search_copy_reference_copies_every_element(rows):
    src = torch.randn(20000).to(torch.bfloat16)  # three programs, the last one masked
    dst = torch.zeros_like(src)
    rows.sm_copy(src, dst)
    assert torch.equal(dst, src)


def test_row_search_table_reports_best_and_rejected(rows):
    measured = [{"op": "sum", "width": 1024, "m": 8192, "current": "block 1024 rows 2 w8", "same_size_copy_gbs": 2100.0,
                 "stock_gbs": 1600.0,
                 "current_gbs": 1700.0, "candidates": {"block 1024 rows 8 w8": 2500.0, "block 1024 rows 4 w8": 2200.0}}]
    table = rows.markdown(measured, {"sum 1024": {"block 1024 rows 16 w4": "variant"}}, 3000.0, "### title")
    # The bar is 80% of the slower copy: the same-size copy's 2100 here, so 1700 GB/s meets it.
    assert ("| sum | 1024 | 8192 | 2100 | 1600 | block 1024 rows 2 w8 | 1700 | 57 | 1680 | yes "
            "| block 1024 rows 8 w8 | 2500 | 83 |") in table
    assert "below their bar: none." in table
    measured[0]["same_size_copy_gbs"] = 2990.0
    assert "| 1700 | 57 | 2392 | **no** |" in rows.markdown(measured, {}, 3000.0, "### title")
    assert "below their bar: sum 1024 x 8192." in rows.markdown(measured, {}, 3000.0, "### title")
    assert "- sum 1024: block 1024 rows 16 w4: variant" in table and "target is 80% of it, 2400 GB/s" in table


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import serve

    return serve


def bench_result(tok_s: float) -> dict:
    return {"output_throughput": tok_s, "median_ttft_ms": 20.0, "p99_ttft_ms": 41.0, "median_tpot_ms": 3.25,
            "p99_tpot_ms": 4.5}


def test_serve_table_has_a_row_per_route_and_concurrency_against_the_references(serve):
    stock = serve.RouteResult(61.2, 50.4, 30.0, 12.0, 20480, {1: bench_result(300.0), 8: bench_result(2000.0)})
    vllm_bi = serve.RouteResult(80.0, 60.0, 40.0, 12.0, 20480, {1: bench_result(150.0), 8: bench_result(1000.0)})
    bi = serve.RouteResult(90.0, 70.0, None, 15.0, None, {1: bench_result(270.0), 8: bench_result(1000.0)})
    results = {"stock": stock, "vllm-bi": vllm_bi, "bi-graph": bi, "bi-piecewise": "vllm serve exited with 1"}
    rows = serve.table_rows(results, [1, 8])
    assert rows[0][:3] == ["route", "conc", "out tok/s"] and rows[0][-2:] == ["vs stock", "vs vllm-bi"]
    assert rows[1] == ["stock", "1", "300", "20.0", "41.0", "3.25", "4.50", "61", "50", "30", "12", "20.0", "1.00",
                       "2.00"]
    assert rows[6] == ["bi-graph", "8", "1000", "20.0", "41.0", "3.25", "4.50", "90", "70", "-", "15", "-", "0.50",
                       "1.00"]
    assert rows[7][0] == "bi-piecewise (failed)" and len(rows[7]) == len(rows[0])
    assert serve.markdown_table(rows).splitlines()[1] == "|" + "---|" * len(rows[0])
    # bi-graph at conc 1: 0.90x stock and 1.80x vllm-bi meets both floors; at conc 8 (0.50x, 1.00x) it meets none.
    assert serve.targets_line(results, [1, 8]).endswith(
        "met in 1 of 2 cells (bi-graph conc 1); cells reaching each floor alone: stock 1, vllm-bi 1")


def test_serve_reads_init_compile_and_capture_seconds_from_vllms_log(serve, tmp_path):
    # Lines as vLLM 0.26 wrote them on the H200 (mode 3, then mode 2, which reports no compile time).
    log = tmp_path / "server.log"
    log.write_text("(EngineCore pid=2169) INFO 12-04 17:58:03 [model_runner.py:747] Graph capturing finished in 6 secs, "
                   "took 0.50 GiB\n(EngineCore pid=2169) INFO 12-04 17:58:24 [core.py:340] init engine (profile, create "
                   "kv cache, warmup model) took 62.25 s (compilation: 31.22 s)\n")
    assert serve.startup_times(log) == {"engine_init_s": 62.25, "compile_s": 31.22, "capture_s": 6.0}
    log.write_text("INFO 12-04 18:06:44 [core.py:347] init engine (profile, create kv cache, warmup model) took 99.42 s\n")
    assert serve.startup_times(log) == {"engine_init_s": 99.42, "compile_s": None, "capture_s": None}


def test_serve_prompt_count_is_two_waves_and_at_least_eight(serve):
    assert [serve.prompts_for(c, None) for c in (1, 8, 64)] == [8, 16, 128]
    assert serve.prompts_for(64, 10) == 10


def test_serve_plot_draws_every_concurrency(serve, tmp_path):
    result = serve.RouteResult(1.0, None, None, None, None, {1: bench_result(1.0), 64: bench_result(2.0)})
    serve.plot({"stock": result, "bi-graph": result, "vllm-bi": "failed"}, [1, 64], tmp_path / "p.png", "title")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_serve_resume_keeps_finished_routes_of_the_same_workload_and_device_only(serve, tmp_path):
    stock = serve.RouteResult(61.2, 50.4, 30.0, 12.0, 20480, {8: bench_result(2000.0), 64: bench_result(5000.0)})
    first = serve.parse_args(["--model", "/m", "--concurrency", "8", "64", "--out-dir", str(tmp_path)])
    serve.write_json(first, {"stock": stock, "bi-graph": "vllm serve exited with 1"})
    again = serve.parse_args(["--model", "/m", "--concurrency", "8", "64", "--out-dir", str(tmp_path), "--resume",
                              "--routes", "stock", "bi-graph"])
    kept = serve.finished_routes(again)
    assert kept == {"stock": stock}  # the failed route runs again; concurrencies are ints again
    other = serve.parse_args(["--model", "/m", "--concurrency", "8", "--out-dir", str(tmp_path), "--resume"])
    with pytest.raises(SystemExit, match="concurrency differ"):
        serve.finished_routes(other)


def test_profile_table_gives_each_kernels_time_per_decode_step(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import profile_table

    result = {"route": "bi-graph", "compilation": {"mode": "DYNAMO_TRACE_ONCE", "cudagraph_mode": "FULL_DECODE_ONLY"},
              "attention_backends": ["CUSTOM"],
              "profile": {"wall_s": 0.25, "device": "GPU", "total_us": 6400, "decode_steps": 64,
                          "kernels": [{"name": "_matmul_kernel", "calls": 256, "us": 3200}]}}
    table = profile_table.route_table(result)
    assert "100 µs per decode step" in table and "| `_matmul_kernel` | 256 | 3200 | 50.0 |" in table


def test_profile_table_sums_each_kind_of_kernel_per_route(monkeypatch):
    """stock's cuBLAS and FlashAttention kernels and bi-compile's Triton ones land in the same rows."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import profile_table

    def result(route, kernels):
        return {"route": route, "profile": {"total_us": 6400, "decode_steps": 64,
                                            "kernels": [{"name": n, "calls": 1, "us": us} for n, us in kernels]}}

    stock = result("stock", [("nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNT", 3000),
                             ("void cublasLt::splitKreduce_kernel<32, 16>", 200),
                             ("void cutlass::device_kernel<flash::FlashAttnFwdSm90<...>>", 1000),
                             ("void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16>", 300),
                             ("triton_per_fused_fused_add_rms_norm_0", 400), ("triton_poi_fused_4", 100)])
    bi = result("bi-graph", [("_matmul_kernel", 3840), ("_paged_attention_kernel", 1280),
                             ("_merge_splits_kernel", 64), ("_write_kv_cache_kernel", 128), ("_rms_norm_kernel", 640)])
    table = profile_table.kinds_table([stock, bi])
    assert "| kernels, µs per decode step | stock | bi-graph |" in table
    for row in ("| matmul | 50 | 60 |", "| attention | 16 | 21 |", "| KV-cache write | 5 | 2 |", "| norm | 6 | 10 |",
                "| other | 2 | 0 |", "| all | 100 | 100 |"):
        assert row in table, row


def test_prefill_table_sets_each_bi_variant_beside_inductor():
    sys.path.insert(0, str(BENCHMARKS.parent))
    from benchmarks import prefill

    points = [prefill.Point("inductor", 1, 16, 4.0, 1.0, 30.0), prefill.Point("bi_ascend", 1, 16, 6.0, 1.2, 40.0),
              prefill.Point("bi_ascend+native", 1, 16, 4.2, 1.2, 95.0)]
    table = prefill.markdown("env", "title", points, {})
    assert "| 1 x 16 | bi_ascend | 4.00 | 6.00 | 1.50 | 1.00 | 1.20 | 1.20 | 3.00 | 4.80 | 30.0 | 40.0 |" in table
    assert "| 1 x 16 | bi_ascend+native | 4.00 | 4.20 | 1.05 |" in table
    assert "target: bi_ascend wall <= 1.10x Inductor; met at 0 of 1 points" in table
    assert "target: bi_ascend+native wall <= 1.10x Inductor; met at 1 of 1 points" in table


@pytest.fixture
def attention_tiles(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import attention_tiles

    return attention_tiles


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernel under TRITON_INTERPRET=1")
def test_attention_search_check_passes_the_kernel_and_catches_a_variant_or_wrong_one(attention_tiles, monkeypatch):
    """A candidate passes when its split and single-program schedules agree bitwise and it matches float64; the
    controls: an "attention" whose split path rounds differently, and one that is off by more than the tolerance.
    (fp16 here: the interpreter has no bf16.)"""
    from bi_compile.kernels.attention import AttentionConfig

    monkeypatch.setattr(attention_tiles, "CHECK_CASES", ((2, 1, 200, False), (1, 150, 150, True)))
    candidate = AttentionConfig(block_m=32, block_n=16, split_n=64, num_warps=4, num_stages=2)
    assert attention_tiles.check(candidate, 4, 2, 32, "cpu", torch.float16) is None
    kernel = attention_tiles.attention
    monkeypatch.setattr(attention_tiles, "attention",
                        lambda *a: kernel(*a) * (1.001 if a[6] else 1.0))  # a[6]: split_kv
    assert "bits differ" in attention_tiles.check(candidate, 4, 2, 32, "cpu", torch.float16)
    monkeypatch.setattr(attention_tiles, "attention", lambda *a: kernel(*a) + 0.1)
    assert "max error" in attention_tiles.check(candidate, 4, 2, 32, "cpu", torch.float16)


def test_attention_search_table_ranks_candidates_and_lists_the_refused(attention_tiles):
    result = {"heads": "32/8x128", "current": "m128 n64 split512 w8 s3", "cases": ["prefill 2048", "decode 1x2048"],
              "sdpa_us": {"prefill 2048": 100.0, "decode 1x2048": 10.0},
              "candidates": {"m128 n64 split512 w8 s3": {"prefill 2048": 200.0, "decode 1x2048": 20.0},
                             "m128 n64 split512 w8 s2": {"prefill 2048": 100.0, "decode 1x2048": 40.0},
                             "m64 n64 split512 w4 s3": {"prefill 2048": 150.0, "decode 1x2048": 15.0}},
              "refused": {"m128 n128 split512 w8 s2": "split and single-program bits differ (B=3 L=1 S=1500)"},
              "failed": {"m128 n64 split512 w8 s4": "OutOfResources: shared memory"}}
    table = attention_tiles.markdown([result], "### search")
    rows = [line for line in table.splitlines() if line.startswith("| m")]
    assert rows == ["| m64 n64 split512 w4 s3 | 1.50 | 1.50 | 1.50 |",
                    "| m128 n64 split512 w8 s3 (current) | 2.00 | 2.00 | 2.00 |",
                    "| m128 n64 split512 w8 s2 | 1.00 | 4.00 | 2.00 |"]
    assert "| SDPA us | 100.0 | 10.0 | |" in table
    assert "- refused m128 n128 split512 w8 s2: split and single-program bits differ" in table
    assert "- failed m128 n64 split512 w8 s4: OutOfResources" in table
    assert "bi/SDPA geomean: current 2.00, best m64 n64 split512 w4 s3 1.50" in table
    assert attention_tiles.head_shape("16/8x256") == (16, 8, 256)
    with pytest.raises(Exception, match="head dim 96"):
        attention_tiles.head_shape("16/8x96")


def test_bits_save_runs_only_the_calls_it_keeps(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import cuda_bits

    ran = []

    def outputs():
        for name in ("linear bf16 M=1", "layer_norm bf16 N=128", "layer_norm without affine bf16 N=128", "var_mean x"):
            yield name, lambda name=name: ran.append(name) or torch.zeros(2)

    monkeypatch.setattr(cuda_bits, "bi_outputs", outputs)
    path = tmp_path / "bits.json"
    assert cuda_bits.main(["save", str(path), "--only", "layer_norm"]) == 0
    assert ran == ["layer_norm bf16 N=128", "layer_norm without affine bf16 N=128"]
    assert sorted(json.loads(path.read_text())) == ran
    assert cuda_bits.main(["compare", str(path), str(path)]) == 0

"""The bi_ascend backend end to end on CPU: options, strict mode, both inner compilers, dynamic batch, entry point,
and bitwise batch invariance of a tiny Qwen3 with a stock-Inductor control."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bi_compile
from bi_compile.backend import BackendOptionError, BackendOptions
from bi_compile.passes import BatchInvarianceError, BatchInvariantPass, BatchInvarianceWarning


def compiled(fn, inner="inductor", dynamic=None, **options):
    torch._dynamo.reset()
    return torch.compile(fn, backend="bi_ascend", dynamic=dynamic, options={"inner": inner, **options})


@pytest.mark.parametrize("options, message", [
    ({"stict": True}, "unknown option 'stict'"),
    ({"strict": "yes"}, "option 'strict' must be True or False"),
    ({"inner": "tvm"}, "option 'inner' must be one of"),
    ({"inner": "eager", "cudagraphs": True}, "cudagraphs=True needs inner='inductor'"),
])
def test_bad_options_get_a_clear_error(options, message):
    with pytest.raises(BackendOptionError, match=message):
        BackendOptions.parse(options)


def test_modes():
    assert BackendOptions.parse(None, "reduce-overhead").cudagraphs
    with pytest.raises(BackendOptionError, match="unsupported mode 'max-autotune'"):
        BackendOptions.parse(None, "max-autotune")


def test_bad_option_fails_the_compile():
    fn = torch.compile(lambda x: x.sum(-1), backend="bi_ascend", options={"strickt": True})
    with pytest.raises(Exception, match="unknown option 'strickt'"):
        fn(torch.randn(3, 4))


def variance_by_cumprod(x):
    return torch.cumprod(x, -1) @ x.t()


@pytest.mark.parametrize("inner", ["inductor", "eager"])
def test_strict_mode_names_each_variant_node_with_its_source_line(inner):
    with pytest.raises(Exception) as caught:
        compiled(variance_by_cumprod, inner, strict=True)(torch.randn(4, 4))
    error = caught.value.inner_exception  # Dynamo/Inductor wrap what a backend raises; the message is ours
    assert isinstance(error, BatchInvarianceError) and str(error) in str(caught.value)
    assert "aten.cumprod.default" in str(error) and "test_backend.py" in str(error)
    assert "return torch.cumprod(x, -1) @ x.t()" in str(error)


@pytest.mark.parametrize("inner", ["inductor", "eager"])
def test_default_mode_warns_and_still_compiles(inner):
    x = torch.randn(4, 4)
    bi_compile.clear_reports()
    with pytest.warns(BatchInvarianceWarning, match="aten.cumprod.default"):
        out = compiled(variance_by_cumprod, inner)(x)
    torch.testing.assert_close(out, variance_by_cumprod(x), rtol=1e-5, atol=1e-5)
    report = bi_compile.last_report()
    assert report.rewrites == {"aten.mm.default -> bi.linear": 1} and [f.target for f in report.findings] == [
        "aten.cumprod.default"]


class Block(torch.nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.norm = torch.nn.RMSNorm(dim)
        self.proj = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x):  # x: [B, T, dim]
        q, k, v = self.proj(self.norm(x)).chunk(3, -1)
        scores = torch.softmax(q @ k.transpose(-1, -2) / 8, -1)
        return x + self.out(scores @ v)


@pytest.mark.parametrize("inner", ["inductor", "eager"])
def test_one_symbolic_compile_serves_every_batch_size_bitwise(inner):
    torch.manual_seed(0)
    block, gen = Block().eval(), torch.Generator().manual_seed(1)
    calls = []

    def counting(gm, example_inputs):
        calls.append(gm)
        return bi_compile.backend.bi_ascend(gm, example_inputs, options={"inner": inner, "strict": True})

    torch._dynamo.reset()
    step = torch.compile(block, backend=counting, dynamic=True)
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        alone = step(x)
        for m in range(2, 33):
            batch = torch.randn(m, 5, 32, generator=gen)
            position = int(torch.randint(m, (1,), generator=gen))
            batch[position] = x[0]
            assert torch.equal(step(batch)[position], alone[0]), f"batch {m}, position {position}"
    assert len(calls) == 2  # batch 1 is specialised by Dynamo; every other batch size shares one graph
    torch.testing.assert_close(alone, block(x), rtol=1e-5, atol=1e-5)


def compile_twice_through_inductors_cache(fn, x, between=lambda: None) -> list[tuple[bi_compile.Report, list[str]]]:
    """The merged report and the BatchInvarianceWarnings of each of two compiles of ``fn`` in a fresh Inductor cache:
    the second is a cache hit."""
    import warnings

    from torch._inductor import config as inductor_config
    from torch._inductor.utils import fresh_cache

    results = []
    with fresh_cache(), inductor_config.patch(fx_graph_cache=True):
        for compile_number in range(2):
            if compile_number:
                between()
            bi_compile.clear_reports()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                compiled(fn)(x)
            messages = [str(w.message) for w in caught if issubclass(w.category, BatchInvarianceWarning)]
            results.append((bi_compile.Report.merge(bi_compile.reports()), messages))
    return results


def test_a_graph_from_inductors_cache_brings_back_its_report():
    """On a cache hit Inductor runs no passes, so no audit: the report recorded at compile time stands in for it."""
    (first, _), (second, _) = compile_twice_through_inductors_cache(lambda t: torch.softmax(t @ t.t(), -1),
                                                                    torch.randn(4, 8))
    assert first.cached_graphs == 0
    assert {"aten.mm.default -> bi.linear", "aten._softmax.default -> bi.softmax"} <= set(first.rewrites)
    assert second.cached_graphs == 1
    assert (second.rewrites, second.counts, second.findings) == (first.rewrites, first.counts, first.findings)
    assert "1 graph(s) loaded from Inductor's cache: counted above" in second.format()


def test_a_cached_graph_warns_again_about_what_it_left_variant():
    (first, first_warnings), (second, second_warnings) = compile_twice_through_inductors_cache(variance_by_cumprod,
                                                                                               torch.randn(4, 4))
    assert second.cached_graphs == 1 and second.findings == first.findings
    assert "return torch.cumprod(x, -1) @ x.t()" in second.findings[0].source
    assert second_warnings == first_warnings and "aten.cumprod.default" in second_warnings[0]


@pytest.mark.parametrize("damage", ["removed", "truncated"])
def test_a_cached_graph_without_its_report_is_flagged_not_passed_as_clean(damage):
    from pathlib import Path

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    def damage_the_reports():
        for path in Path(cache_dir(), "bi_compile_reports").glob("*.json"):
            if damage == "removed":
                path.unlink()
            else:
                path.write_text(path.read_text()[:10])

    (_, first_warnings), (second, second_warnings) = compile_twice_through_inductors_cache(
        lambda t: t @ t.t(), torch.randn(4, 8), damage_the_reports)
    assert first_warnings == [] and len(second_warnings) == 1
    assert "no batch-invariance report on record" in second_warnings[0]
    assert second.unaudited_graphs == 1 and second.counts["invariant"] == 0
    assert "1 graph(s) loaded from Inductor's cache with no audit on record" in second.format()


def test_backend_name_resolves_from_the_entry_point_without_importing_the_package():
    code = ("import sys, torch\n"
            "f = torch.compile(lambda x: torch.softmax(x @ x.t(), -1), backend='bi_ascend')\n"
            "f(torch.randn(4, 4))\n"
            "from bi_compile import last_report\n"
            "print(sorted(last_report().rewrites))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert "aten._softmax.default -> bi.softmax" in out.stdout


def test_uuid_is_stable_and_follows_the_options():
    assert BatchInvariantPass().uuid() == BatchInvariantPass().uuid()
    assert BatchInvariantPass().uuid() != BatchInvariantPass(strict=True).uuid()

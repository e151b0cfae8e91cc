"""Batch-invariant RMSNorm, add + RMSNorm, LayerNorm and row variance (Triton): one row kernel for all four.

    s    = x1 + x2                         (add_rms_norm only: rounded to the input dtype, as torch's add)
    rms_norm:    rstd = rsqrt(mean(x ** 2) + eps);                     y = x * rstd * w
    layer_norm:  mean = mean(x);  c = x - mean;  rstd = rsqrt(mean(c ** 2) + eps);  y = c * rstd * w + b
    var_mean:    mean = mean(x);  var = sum((x - mean) ** 2) / max(N - correction, 0)   (std_mean: sqrt(var))

in fp32 (x = x_f32, w = w_f32, b = b_f32), y rounded to x's dtype. Each row's sums are accumulated by one program in
fixed chunks (``reduce.row_blocking``), so their bits depend on the row length and dtype only. The variance is
two-pass (the mean first, then the squares of the centred values), never E[x^2] - mean^2, which cancels when the
mean is large against the spread. Rows up to the backend's ``RowPolicy.fused_max`` are read once and kept in
registers; longer rows are read once per pass (two for RMSNorm, three for LayerNorm), and add_rms_norm recomputes
``s`` on a later read rather than reading back what another thread of the program stored.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .device import launch_options, target
from .launch import KeyedKernel, aligned16, cdiv, emit_launch
from .reduce import (RowBlocking, RowGrid, aligned, row_blocking, row_grid, row_grid_in_place, row_offsets,
                     row_programs)

# The per-row statistic the kernel writes (STAT): RSTD for the norms, which also write y; VAR or STD for
# var_mean / std_mean, which write no y. Constexpr, so that jitted code may read them (their ``.value`` is launched).
RSTD, VAR, STD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _load_row_chunk(x1_rows, x2_rows, cols, mask, HAS_X2: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """x1 (or x1 + x2 rounded to the input dtype, like the unfused add) as fp32."""
    x = tl.load(x1_rows + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_X2:
        x2 = tl.load(x2_rows + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + x2).to(OUT_DTYPE).to(tl.float32)
    return x


@triton.jit
def _centred(x, mask, mean, CENTER: tl.constexpr):
    """x - mean inside the row and 0 past its end, so that the sums of squares skip the padding; x without CENTER."""
    if CENTER:
        x = tl.where(mask, x - mean[:, None], 0.0)
    return x


@triton.jit
def _row_stat(squares, n_cols, eps, divisor, STAT: tl.constexpr):
    """From a row's sum of (centred) squares: rsqrt(squares / n_cols + eps), or the variance squares / divisor, or
    its square root. eps and divisor are fp32 from Triton's own launch; a launch Inductor emits may pass floats as
    fp64 (its _use_fp64_for_unbacked_floats), rounded here to the same fp32."""
    if STAT == RSTD:
        stat = tl.math.rsqrt(squares / n_cols + tl.cast(eps, tl.float32))
    else:
        stat = squares / tl.cast(divisor, tl.float32)
        if STAT == STD:
            stat = tl.sqrt(stat)
    return stat


@triton.jit
def _load_affine(w_ptr, b_ptr, cols, n_left, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """The weight and bias (fp32; 0.0 where absent, never used) of a chunk whose first column is ``n_left`` columns
    before the row's end."""
    w = 0.0
    b = 0.0
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cols < n_left, other=0.0).to(tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=cols < n_left, other=0.0).to(tl.float32)
    return w, b


@triton.jit
def _store_normalised(x, rstd, w, b, y_rows, cols, mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """y = x * rstd (* w) (+ b), with the chunk's weight and bias from ``_load_affine``."""
    y = x * rstd[:, None]
    if HAS_W:
        y = y * w
    if HAS_B:
        y = y + b
    tl.store(y_rows + cols, y.to(y_rows.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(
    x1_ptr, x2_ptr, w_ptr, b_ptr, y_ptr, s_ptr, mean_ptr, stat_ptr,
    n_rows, n_cols, n_inner, x1_outer, x1_inner, x2_outer, x2_inner, eps, divisor,
    HAS_X2: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, CENTER: tl.constexpr, STAT: tl.constexpr,
    FUSED: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):  # one tile each on CUDA
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows[:, None] < n_rows
        x1_rows = x1_ptr + row_offsets(rows, n_rows, n_cols, n_inner, x1_outer, x1_inner)[:, None]
        x2_rows = x2_ptr + row_offsets(rows, n_rows, n_cols, n_inner, x2_outer, x2_inner)[:, None]
        out_rows = rows.to(tl.int64)[:, None] * n_cols  # y and s are fresh contiguous [n_rows, n_cols]
        dtype = x1_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK)[None, :]
        mean = tl.zeros([ROWS], dtype=tl.float32)
        if FUSED:
            mask = row_mask & (cols < n_cols)
            x = _load_row_chunk(x1_rows, x2_rows, cols, mask, HAS_X2, dtype)
            # Loaded ahead of the reductions, so that their latency overlaps x's: a call of a few hundred rows is
            # latency-bound (docs/benchmarks.md, "Row reductions").
            w, b = _load_affine(w_ptr, b_ptr, cols, n_cols, HAS_W, HAS_B)
            if HAS_X2:
                tl.store(s_ptr + out_rows + cols, x.to(dtype), mask=mask)
            if CENTER:
                mean = tl.sum(x, axis=1) / n_cols
            x = _centred(x, mask, mean, CENTER)
            stat = _row_stat(tl.sum(x * x, axis=1), n_cols, eps, divisor, STAT)
            if STAT == RSTD:
                _store_normalised(x, stat, w, b, y_ptr + out_rows, cols, mask, HAS_W, HAS_B)
        else:
            if CENTER:
                acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
                for start in range(0, n_cols, BLOCK):
                    mask = row_mask & (start + cols < n_cols)
                    acc += _load_row_chunk(x1_rows + start, x2_rows + start, cols, mask, HAS_X2, dtype)
                mean = tl.sum(acc, axis=1) / n_cols
            acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                mask = row_mask & (start + cols < n_cols)
                x = _load_row_chunk(x1_rows + start, x2_rows + start, cols, mask, HAS_X2, dtype)
                if HAS_X2:
                    tl.store(s_ptr + out_rows + start + cols, x.to(dtype), mask=mask)
                x = _centred(x, mask, mean, CENTER)
                acc += x * x
            stat = _row_stat(tl.sum(acc, axis=1), n_cols, eps, divisor, STAT)
            if STAT == RSTD:
                for start in range(0, n_cols, BLOCK):
                    mask = row_mask & (start + cols < n_cols)
                    x = _load_row_chunk(x1_rows + start, x2_rows + start, cols, mask, HAS_X2, dtype)
                    x = _centred(x, mask, mean, CENTER)
                    w, b = _load_affine(w_ptr + start, b_ptr + start, cols, n_cols - start, HAS_W, HAS_B)
                    _store_normalised(x, stat, w, b, y_ptr + out_rows + start, cols, mask, HAS_W, HAS_B)
        if CENTER:
            tl.store(mean_ptr + rows, mean.to(mean_ptr.dtype.element_ty), mask=rows < n_rows)
        tl.store(stat_ptr + rows, stat.to(stat_ptr.dtype.element_ty), mask=rows < n_rows)


@dataclass(frozen=True, eq=False)
class NormLaunch:
    """A norm kernel's launch worked out once from metadata: outputs' shape, grid, ints, constexprs and options.
    Hashed by identity: the plan is the first part of its launches' key (kernels/launch.py), and ``_norm_launch``,
    which is cached, returns the same plan for the same layout."""

    device: torch.device
    shape: tuple[int, ...]  # x1's, hence y's and s's; the statistics are shape[:-1] + (1,)
    grid: tuple[int]
    ints: tuple[int, ...]
    meta: dict


@functools.lru_cache(maxsize=8192)
def _norm_launch(device: torch.device, shape: tuple[int, ...], grid: RowGrid, cfg: RowBlocking, has_x2: bool,
                 has_w: bool, has_b: bool, center: bool, stat_kind: int) -> NormLaunch:
    (x1_outer, x1_inner), (x2_outer, x2_inner) = grid.strides[0], grid.strides[-1]
    ints = (grid.n_rows, shape[-1], grid.n_inner, x1_outer, x1_inner, x2_outer, x2_inner)
    meta = dict(HAS_X2=has_x2, HAS_W=has_w, HAS_B=has_b, CENTER=center, STAT=stat_kind, FUSED=cfg.fused,
                BLOCK=cfg.block, ROWS=cfg.rows, **launch_options(target(device).backend, cfg.num_warps))
    return NormLaunch(device, shape, (row_programs(cdiv(grid.n_rows, cfg.rows), device),), ints, meta)


def _run(plan: NormLaunch, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor | None,
         bias: torch.Tensor | None, outputs: tuple[torch.Tensor | None, ...], eps: float, divisor: float) -> None:
    """Launch ``plan``: x1, x2 (x1 again where there is none) with the plan's layout, weight and bias 16-byte
    aligned, ``outputs`` = (y, s, mean, stat) fresh (None where the plan computes none)."""
    y, s, mean, stat = outputs
    # The launch key (kernels/launch.py): the plan fixes every constexpr and int; the outputs are fresh and the
    # weight and bias aligned; an absent tensor is replaced by x1 or stat, whose dtype and alignment the key holds.
    key = (plan, x1.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype,
           stat.dtype, aligned16(x1), aligned16(x2))
    _rms_norm_launch(plan.device, key, plan.grid, x1, x2, *(t if t is not None else x1 for t in (weight, bias, y, s)),
                     mean if mean is not None else stat, stat, *plan.ints, eps, divisor, **plan.meta)


def _launch(x1: torch.Tensor, x2: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
            outputs: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor],
            eps: float, divisor: float, stat_kind: tl.constexpr, blocking: RowBlocking | None) -> None:
    """Shared host side: x1, x2 [..., N] (unit stride along N), weight and bias [N] or None; ``outputs`` = (y, s,
    mean, stat), fresh, None where not computed (y only with RSTD, s only with x2; the mean is centred on)."""
    y, s, mean, stat = outputs
    tensors, grid = row_grid(x1, *(() if x2 is None else (x2,)))
    x1, x2 = tensors[0], tensors[-1]
    cfg = blocking or row_blocking(x1.shape[-1], backend=target(x1.device).backend, centred=mean is not None)
    weight, bias = (aligned(t) if t is not None else None for t in (weight, bias))
    plan = _norm_launch(x1.device, tuple(x1.shape), grid, cfg, s is not None, weight is not None, bias is not None,
                        mean is not None, stat_kind.value)
    _run(plan, x1, x2, weight, bias, outputs, eps, divisor)


_rms_norm_launch = KeyedKernel(_rms_norm_kernel)


def plan_norm(x1: torch.Tensor, x2: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
              center: bool) -> NormLaunch | None:
    """The launch of a norm (rms_norm, add_rms_norm with x2, layer_norm with ``center``) from the inputs' metadata
    (never their data), for inputs whose rows the kernel reads in place when their data is 16-byte aligned; None
    where ``row_grid`` would copy them, or where there is nothing to launch."""
    grid = row_grid_in_place(x1) if x2 is None else row_grid_in_place(x1, x2)
    if grid is None or not x1.numel():
        return None
    cfg = row_blocking(x1.shape[-1], backend=target(x1.device).backend, centred=center)
    return _norm_launch(x1.device, tuple(x1.shape), grid, cfg, x2 is not None, weight is not None, bias is not None,
                        center, RSTD.value)


def emit_norm(x1: torch.Tensor, x2: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
              eps: float, center: bool):
    """``_norm`` as a launch that Inductor emits itself (``launch.emit_launch``), for a graph being traced with x1
    (and x2) of contiguous rows on a CUDA device: (y, mean or None, rstd, s or None). The same kernel, blocking,
    constexprs and ints as a call of the op on those inputs, from the row length alone; the row count may be
    symbolic, and is the kernel's run-time int, so one compiled launch serves every batch."""
    n_cols = x1.shape[-1]
    n_rows = x1.numel() // n_cols
    cfg = row_blocking(n_cols, backend=target(x1.device).backend, centred=center)
    outputs = {"y_ptr": torch.empty(x1.shape, dtype=x1.dtype, device=x1.device),
               "stat_ptr": torch.empty((*x1.shape[:-1], 1), dtype=torch.float32, device=x1.device)}
    if x2 is not None:
        outputs["s_ptr"] = torch.empty(x1.shape, dtype=x1.dtype, device=x1.device)
    if center:
        outputs["mean_ptr"] = torch.empty((*x1.shape[:-1], 1), dtype=torch.float32, device=x1.device)
    # The pointers the constexprs switch off are never read or written: x1 stands in for them.
    inputs = {"x1_ptr": x1, "x2_ptr": x2, "w_ptr": weight, "b_ptr": bias, "s_ptr": None, "mean_ptr": None}
    inputs = {name: x1 if t is None else t for name, t in inputs.items() if name not in outputs}
    written = emit_launch(
        _rms_norm_kernel, (cdiv(n_rows, cfg.rows),), outputs, cfg.num_warps, **inputs,
        n_rows=n_rows, n_cols=n_cols, n_inner=1, x1_outer=n_cols, x1_inner=0, x2_outer=n_cols, x2_inner=0, eps=eps,
        divisor=1.0, HAS_X2=x2 is not None, HAS_W=weight is not None, HAS_B=bias is not None, CENTER=center,
        STAT=RSTD.value, FUSED=cfg.fused, BLOCK=cfg.block, ROWS=cfg.rows)
    return written["y_ptr"], written.get("mean_ptr"), written["stat_ptr"], written.get("s_ptr")


def _norm(x1: torch.Tensor, x2: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
          eps: float, center: bool, blocking: RowBlocking | None, plan: NormLaunch | None):
    """(y, mean or None, rstd, s or None); statistics [..., 1] fp32. ``plan``: ``plan_norm``'s for these inputs'
    layout, taken when their data is 16-byte aligned (a compiled graph's call then costs the outputs' allocation
    and the launch)."""
    if plan is not None and all(t is None or aligned16(t) for t in (x1, x2, weight, bias)):
        # Shapes from the plan, not the tensors: reading x1's shape and device again costs ~1.5 us a call here.
        y = torch.empty(plan.shape, dtype=x1.dtype, device=plan.device)
        s = None if x2 is None else torch.empty(plan.shape, dtype=x1.dtype, device=plan.device)
        rstd = torch.empty(plan.shape[:-1] + (1,), dtype=torch.float32, device=plan.device)
        mean = torch.empty_like(rstd) if center else None
        _run(plan, x1, x1 if x2 is None else x2, weight, bias, (y, s, mean, rstd), eps, 1.0)
        return y, mean, rstd, s
    y = torch.empty(x1.shape, dtype=x1.dtype, device=x1.device)
    s = torch.empty_like(y) if x2 is not None else None
    rstd = torch.empty(x1.shape[:-1] + (1,), dtype=torch.float32, device=x1.device)
    mean = torch.empty_like(rstd) if center else None
    if y.numel() == 0:  # N = 0: statistics of no elements are NaN, as torch's rstd (or no rows: nothing to fill)
        for stat in (rstd, mean):
            if stat is not None:
                stat.fill_(float("nan"))
        return y, mean, rstd, s
    _launch(x1, x2, weight, bias, (y, s, mean, rstd), eps, 1.0, RSTD, blocking)
    return y, mean, rstd, s


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, blocking: RowBlocking | None = None,
             plan: NormLaunch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of ``x`` [..., N] -> (y [..., N] in x.dtype, rstd [..., 1] fp32). ``blocking``
    overrides ``row_blocking(N)``, for benchmarks/rows.py's search; ``plan``: ``plan_norm``'s for x's layout."""
    y, _, rstd, _ = _norm(x, None, weight, None, eps, False, blocking, plan)
    return y, rstd


def add_rms_norm(x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor | None, eps: float, *,
                 plan: NormLaunch | None = None):
    """``s = x1 + x2`` (rounded to the input dtype), then RMSNorm of s -> (y, rstd, s); ``plan`` as ``rms_norm``'s."""
    y, _, rstd, s = _norm(x1, x2, weight, None, eps, False, None, plan)
    return y, rstd, s


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *,
               blocking: RowBlocking | None = None,
               plan: NormLaunch | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim of ``x`` [..., N] -> (y [..., N] in x.dtype, mean, rstd [..., 1] fp32).
    ``blocking`` and ``plan`` as ``rms_norm``'s."""
    y, mean, rstd, _ = _norm(x, None, weight, bias, eps, True, blocking, plan)
    return y, mean, rstd


def var_mean(x: torch.Tensor, correction: float, out_dtype: torch.dtype, *,
             std: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance, mean) of ``x`` [..., N] over its last dim (``std``: the standard deviation for the variance) ->
    fresh contiguous [...] each, in ``out_dtype``; the variance divides by max(N - correction, 0), as aten's."""
    stat = torch.empty(x.shape[:-1], dtype=out_dtype, device=x.device)
    mean = torch.empty_like(stat)
    if x.shape[-1] == 0:  # no elements: NaN, as aten's
        return stat.fill_(float("nan")), mean.fill_(float("nan"))
    if stat.numel():
        _launch(x, None, None, None, (None, None, mean, stat), 0.0, float(max(x.shape[-1] - correction, 0)),
                STD if std else VAR, None)
    return stat, mean

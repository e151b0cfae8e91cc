"""Batch-invariance reports for the graphs that Inductor serves from its compile cache.

On a cache hit Inductor runs no passes: the cached code already is the rewritten graph, but the audit that came with
it is gone, and with it the warning about nodes left variant. So the backend keeps each compiled graph's reports next
to Inductor's cache, under a key of the Dynamo graph, its example inputs and everything else that decides what the
pipeline sees, and replays them on a hit: same report, same warning.

The key leaves out source lines, as Inductor's does: the same code compiled from another checkout, or a copy of a
function elsewhere, is a hit in Inductor's cache, so it must find its report too. Its findings then name the source
lines of the compile that first produced the graph.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch._inductor.runtime.cache_dir_utils import cache_dir

from bi_compile.passes import Report, record_report, source_hash


def graph_key(gm: torch.fx.GraphModule, example_inputs, *settings) -> str:
    digest = hashlib.sha256()
    for part in (torch.__version__, source_hash(), *settings, gm.graph):
        digest.update(str(part).encode())
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            value = (value.shape, value.stride(), value.dtype, value.device, value.requires_grad)
        digest.update(repr(value).encode())
    return digest.hexdigest()


def _path(key: str) -> Path:
    return Path(cache_dir()) / "bi_compile_reports" / f"{key}.json"


def save_reports(key: str, reports: list[Report]) -> None:
    path = _path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps([report.to_dict() for report in reports]))
    os.replace(partial, path)  # atomic: a concurrent compile reads the old file or the new one


def replay_reports(key: str, *, strict: bool) -> None:
    """Record the reports saved for ``key`` as graphs from the cache; without them, record (and warn about) a graph
    that nobody can vouch for. In strict mode the cached graph passed the strict audit: ``strict`` is in the key of
    Inductor's cache (through ``BatchInvariantPass.uuid()``), and a failed audit raises before anything is cached."""
    try:
        saved_reports = json.loads(_path(key).read_text())
    except (OSError, ValueError):  # missing, unreadable or cut short: the same as no report
        record_report(Report(unaudited_graphs=1), strict=strict)
        return
    for saved in saved_reports:
        record_report(Report.from_dict({**saved, "cached_graphs": 1}), strict=strict)

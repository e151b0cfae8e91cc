"""The hash that keys compile caches to the pipeline's version: a leaf module, importing nothing of bi-compile.

It covers everything that decides a rewritten graph and its report: the passes, the op definitions with their layout
contracts, the kernels (whose launches the native_launch pass writes into the graph), and how reports are kept for
cached graphs (``bi_compile/report_cache.py``: a graph cached before that changed has none on record).
``BatchInvariantPass.uuid()`` puts it into Inductor's and vLLM's cache keys, and the backend into the key of its
saved reports.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path


@functools.cache
def source_hash() -> str:
    package = Path(importlib.util.find_spec("bi_compile").origin).parent  # found, not imported
    paths = [package / "report_cache.py"]
    for folder in (Path(__file__).parent, package / "ops", package / "kernels"):
        paths += sorted(folder.glob("*.py"))
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:32]

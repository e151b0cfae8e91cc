"""``python -m bi_compile``: the same command as ``bi-compile`` (which starts faster: this imports the package, and
with it torch, before parsing the arguments)."""

from bi_compile_cli import main

raise SystemExit(main())

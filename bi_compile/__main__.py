"""``python -m bi_compile``: the same command as ``bi-compile``."""

from bi_compile.cli import main

raise SystemExit(main())

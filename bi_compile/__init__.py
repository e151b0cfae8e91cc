"""bi-compile: batch-invariant LLM inference in graph mode."""

"""The batch-invariant ops, ``torch.ops.bi.*``. Importing this package registers all of them."""

from bi_compile.ops import attention, collectives, cumsum, matmul, norm, paged_attention, reduce, softmax  # noqa: F401

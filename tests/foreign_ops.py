"""Stand-ins for torch_npu's and vLLM's norm ops, registered under their real qualified names and schemas with CPU
reference implementations, so the passes can be tested on the graphs those ops produce without the libraries.
Where a library has registered the op already in this process, the real one is kept."""

from __future__ import annotations

import torch

SCHEMAS = {
    "npu": {
        "npu_add_rms_norm": "(Tensor x1, Tensor x2, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor, Tensor)",
        "npu_rms_norm": "(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)",
    },
    "vllm_ir": {
        "rms_norm": "(Tensor x, Tensor? weight, float epsilon, SymInt? variance_size=None) -> Tensor",
        "fused_add_rms_norm": "(Tensor x, Tensor x_residual, Tensor? weight, float epsilon, SymInt? variance_size=None) -> (Tensor, Tensor)",
    },
    "_C": {
        "rms_norm": "(Tensor! result, Tensor input, Tensor? weight, float epsilon) -> ()",
        "fused_add_rms_norm": "(Tensor! input, Tensor! residual, Tensor? weight, float epsilon) -> ()",
    },
}


def reference_rms_norm(x, weight, eps):
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    y = x.float() * rstd
    return (y if weight is None else y * weight.float()).to(x.dtype), rstd


def _npu_add_rms_norm(x1, x2, gamma, epsilon=1e-6):
    total = x1 + x2
    return *reference_rms_norm(total, gamma, epsilon), total


def _npu_rms_norm(x, gamma, epsilon=1e-6):
    return reference_rms_norm(x, gamma, epsilon)


def _vllm_ir_rms_norm(x, weight, epsilon, variance_size=None):
    return reference_rms_norm(x, weight, epsilon)[0]


def _vllm_ir_fused_add_rms_norm(x, x_residual, weight, epsilon, variance_size=None):
    total = x + x_residual
    return reference_rms_norm(total, weight, epsilon)[0], total


def _c_rms_norm(result, input, weight, epsilon):
    result.copy_(reference_rms_norm(input, weight, epsilon)[0])


def _c_fused_add_rms_norm(input, residual, weight, epsilon):
    residual.add_(input)
    input.copy_(reference_rms_norm(residual, weight, epsilon)[0])


IMPLS = {
    ("npu", "npu_add_rms_norm"): (_npu_add_rms_norm, lambda x1, x2, gamma, epsilon=1e-6: (
        torch.empty_like(x1), x1.new_empty(*x1.shape[:-1], 1, dtype=torch.float32), torch.empty_like(x1))),
    ("npu", "npu_rms_norm"): (_npu_rms_norm, lambda x, gamma, epsilon=1e-6: (
        torch.empty_like(x), x.new_empty(*x.shape[:-1], 1, dtype=torch.float32))),
    ("vllm_ir", "rms_norm"): (_vllm_ir_rms_norm, lambda x, weight, epsilon, variance_size=None: torch.empty_like(x)),
    ("vllm_ir", "fused_add_rms_norm"): (_vllm_ir_fused_add_rms_norm, lambda x, x_residual, weight, epsilon,
                                        variance_size=None: (torch.empty_like(x), torch.empty_like(x))),
    ("_C", "rms_norm"): (_c_rms_norm, lambda result, input, weight, epsilon: None),
    ("_C", "fused_add_rms_norm"): (_c_fused_add_rms_norm, lambda input, residual, weight, epsilon: None),
}

_LIBRARIES: list[torch.library.Library] = []


def register() -> None:
    """Define each op unless a library already did. The real-vLLM tests run in their own pytest process (see the
    Makefile), so vLLM never has to register its ``_C`` ops after these stand-ins."""
    for namespace, ops in SCHEMAS.items():
        for name, schema in ops.items():
            if hasattr(getattr(torch.ops, namespace), name):
                continue
            lib = torch.library.Library(namespace, "FRAGMENT")
            lib.define(name + schema)
            impl, fake = IMPLS[namespace, name]
            lib.impl(name, impl, "CompositeExplicitAutograd")
            torch.library.register_fake(f"{namespace}::{name}", fake, lib=lib)
            _LIBRARIES.append(lib)

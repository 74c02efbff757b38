"""
FLOPs of what a piece of code actually runs, counted at the dispatcher: every matrix product (mm, addmm, bmm,
baddbmm and their in-place forms, whichever a module, a custom autograd Function or a backward pass calls) at
2 x m x k x n, and fused attention at 4 x batch x heads x queries x keys x head_dim forward and twice that backward
(scores and weighted sum at full length, causal or not: the convention of the bench's train formula). Why: the RM,
DPO and GRPO steps share prompts and skip columns, so a formula per workload would be easy to get wrong, and
torch.utils.flop_counter misses the in-place addmm_ of HeadCrossEntropy and the CPU attention kernel.

    flops, result = count_flops(fn, *args)   # runs fn once
"""

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _matmul(a, b):
    """2 x m x k x n of a (..., m, k) @ b (..., k, n), times the product of the batch dimensions."""
    return 2 * math.prod(a.shape) * b.shape[-1]


def _attention(q, k, factor):
    """factor x batch x heads x queries x keys x head_dim of q (B, H, Tq, D) against k (B, H_kv, Tk, D)."""
    return factor * math.prod(q.shape) * k.shape[-2]


def _product(a, b, *_, **__):  # mm and bmm: (a, b)
    return _matmul(a, b)


def _accumulated_product(_, a, b, *__, **___):  # addmm and baddbmm: (input, a, b)
    return _matmul(a, b)


FORMULAS = {op: _product for op in (aten.mm.default, aten.mm.out, aten.bmm.default, aten.bmm.out)}
FORMULAS |= {op: _accumulated_product for op in (aten.addmm.default, aten.addmm_.default, aten.addmm.out,
                                                 aten.baddbmm.default, aten.baddbmm_.default)}
# the fused attention kernels: the CPU's, and CUDA's flash, memory-efficient and cuDNN ones (untested here, no GPU;
# the same (B, H, T, D) arguments as torch.utils.flop_counter reads from them): the query first in the forward,
# second (after the output's gradient) in the backward
for kernel in ("flash_attention_for_cpu", "flash_attention", "efficient_attention", "cudnn_attention"):
    FORMULAS[getattr(aten, f"_scaled_dot_product_{kernel}").default] = lambda q, k, *_, **__: _attention(q, k, 4)
    FORMULAS[getattr(aten, f"_scaled_dot_product_{kernel}_backward").default] = \
        lambda _, q, k, *__, **___: _attention(q, k, 8)


class FlopCounter(TorchDispatchMode):
    """Sums FORMULAS over the ops dispatched while active; an attention op without a formula is an error."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = FORMULAS.get(func)
        if formula is not None:
            self.flops += formula(*args, **kwargs)
        elif "attention" in func.name():  # a kernel this file does not know would go uncounted: say so
            raise NotImplementedError(f"count_flops has no formula for {func.name()}")
        return func(*args, **kwargs)


def count_flops(fn, *args, **kwargs):
    """(FLOPs, fn's result) of one call of fn, backward passes it runs included."""
    with FlopCounter() as counter:
        result = fn(*args, **kwargs)
    return counter.flops, result

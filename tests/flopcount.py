"""Count a forward pass's matmul FLOPs with torch's counter, whatever attention op it hits.

torch's FlopCounterMode only knows the ops registered in that torch version: torch 2.14
does not count `_scaled_dot_product_flash_attention_for_cpu`, which nn.MultiheadAttention
and F.scaled_dot_product_attention dispatch to on CPU. So the ops a forward pass actually
runs are recorded first, and every scaled-dot-product variant among them is counted by
its formula (scores + mixing: 2*B*H*L*S*(E + Ev)), registered or not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


class _RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[Any] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops.add(func)
        return func(*args, **(kwargs or {}))


def sdpa_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    """q (..., L, E), k (..., S, E), v (..., S, Ev): q k^T plus the weighted sum of v."""
    *lead, length, width = query
    keys = key[-2]
    batch_heads = 1
    for size in lead:
        batch_heads *= size
    return 2 * batch_heads * length * keys * width + 2 * batch_heads * length * keys * value[-1]


def count_flops(run: Callable[[], object]) -> tuple[int, set[str]]:
    """FLOPs of run() and the names of the attention ops counted by formula."""
    with torch.no_grad(), _RecordOps() as recorder:
        run()
    attention = {op.overloadpacket for op in recorder.ops if "scaled_dot_product" in str(op)}
    with torch.no_grad(), FlopCounterMode(
        display=False, custom_mapping=dict.fromkeys(attention, sdpa_flops)
    ) as counter:
        run()
    return int(counter.get_total_flops()), {str(op) for op in attention}

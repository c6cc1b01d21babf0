"""What every method's model folder shares: the format marker, file names, recorded versions
and the fast (no random init) module construction used before a strict load.

Kept below `checkpoint` (which imports the method registry) so that a method package can write
and read its own folder without importing the registry: no import cycle if the method is
registered later.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

FORMAT_NAME = "fbclip-edge-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def versions() -> dict[str, str]:
    """Library versions recorded with every artifact."""
    import open_clip

    from fbclip_edge.version import __version__

    return {
        "fbclip_edge": __version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
    }


class _SkipRandomInit(TorchFunctionMode):
    """Turn weight-initialization calls into no-ops, in this thread only (torch function modes
    are thread-local, so a model built concurrently elsewhere keeps its random init)."""

    SKIPPED = frozenset(
        {
            torch.nn.init.uniform_,
            torch.nn.init.normal_,
            torch.nn.init.trunc_normal_,
            torch.nn.init.constant_,
            torch.nn.init.kaiming_uniform_,
            torch.nn.init.kaiming_normal_,
            torch.nn.init.xavier_uniform_,
            torch.nn.init.xavier_normal_,
            torch.Tensor.uniform_,
            torch.Tensor.normal_,
        }
    )

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Iterable[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func in self.SKIPPED:
            return args[0] if args else (kwargs or {})["tensor"]
        return func(*args, **(kwargs or {}))


@contextmanager
def skip_weight_init() -> Iterator[None]:
    """Build modules without randomly initializing their weights (most of a ViT-L's
    construction time), for weights that a strict load overwrites right after. Buffers that
    the file does not hold (attention masks, prompt tokens) are computed as usual."""
    with _SkipRandomInit():
        yield

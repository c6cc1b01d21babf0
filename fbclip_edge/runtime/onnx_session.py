"""onnxruntime sessions as every runtime module opens them: one set of session options, the
provider checks, and `GraphSession` (inputs checked against the graph, one-line errors).

onnxruntime silently falls back to CPU when a GPU provider cannot start, so the provider
actually in use is read back from each session and a fallback is an error.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from fbclip_edge.artifacts.manifest import ArtifactError
from fbclip_edge.errors import FBClipError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
#: what a wrong input's error suggests when the caller names no one building the inputs
CHECK_INPUTS = "check what was passed to it"
#: onnxruntime's input type names -> the torch dtype fed
ONNX_DTYPES = {"tensor(float)": torch.float32, "tensor(int64)": torch.int64}


def import_onnxruntime() -> ModuleType:
    """The onnxruntime module, or a one-line error naming the extra to install."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError:
        raise FBClipError(
            "onnxruntime is not installed; install fbclip-edge[cpu] (or fbclip-edge[gpu] for "
            "CUDA), or open the artifacts with backend='torch'"
        ) from None


def session_options(ort: Any, provider: str, threads: int | None) -> Any:
    """All graph optimizations, errors-only logging, no spinning threads, and on the CPU
    neither a memory-pattern arena nor prepacked weight copies (memory, not speed)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: unused-initializer notes are noise
    options.intra_op_num_threads = threads or 0  # 0: onnxruntime's choice (physical cores)
    # Idle worker threads would otherwise spin after each run and slow the torch map
    # stage that follows on the same cores (measured: 15.9 ms vs 9.1 ms on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if provider == "cpu":
        # Memory, measured on ViT-L-14-336 @ 518 (2-core Xeon, fresh process each): the
        # memory-pattern planner keeps every intermediate's arena block for the run
        # (+1.58 GB over the session vs +0.79 GB without it), and prepacked weights are a
        # second copy of them (session 1.97 GB -> 1.22 GB without); neither was
        # measurably faster here.
        options.enable_mem_pattern = False
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def check_available(ort: Any, provider: str) -> str:
    """onnxruntime's name of a short provider name ('cpu', 'cuda', 'tensorrt') that this
    onnxruntime offers; an unknown or missing one is a one-line error naming the fix."""
    if provider not in PROVIDERS:
        raise FBClipError(f"provider must be one of {', '.join(PROVIDERS)}, not {provider!r}")
    wanted = PROVIDERS[provider]
    offered = ort.get_available_providers()
    if wanted not in offered:
        raise FBClipError(
            f"onnxruntime provider '{provider}' is not available (onnxruntime "
            f"{ort.__version__} offers {', '.join(offered)}); install fbclip-edge[gpu] "
            "(onnxruntime-gpu) on a CUDA machine, or use provider='cpu'"
        )
    return wanted


def provider_chain(ort: Any, provider: str) -> list[str]:
    """The asked provider first, then the ones it falls back to per op (CPU last, for the
    ops a GPU provider skips); without provider options (TensorRT's profiles and engine
    cache are the onnxruntime backend's)."""
    wanted = check_available(ort, provider)
    after = {"cpu": [], "cuda": ["cpu"], "tensorrt": ["cuda", "cpu"]}[provider]
    return [wanted, *(PROVIDERS[name] for name in after)]


def check_provider(name: str, used: Sequence[str], wanted: str) -> None:
    """onnxruntime silently falls back to the CPU when a GPU provider cannot start."""
    if used[0] != wanted:
        raise FBClipError(
            f"onnxruntime fell back to {used[0]} for {name} although {wanted} was asked (CUDA / "
            "TensorRT libraries not found?); fix the GPU install or use provider='cpu'"
        )


def load_session(ort: Any, path: Path, options: Any, providers: Sequence[Any]) -> Any:
    """An InferenceSession on `path` whose first provider is the one asked; an unreadable
    graph or a silent fallback is a one-line error."""
    try:
        session = ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph types
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise ArtifactError(
            f"onnxruntime cannot load {path.name} ({type(error).__name__}: {first}); "
            "re-export the artifacts"
        ) from None
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    check_provider(path.name, session.get_providers(), wanted)
    return session


class GraphSession:
    """One onnxruntime session with its inputs checked against the graph's declared shapes
    (named axes must agree across inputs), one line naming the graph and the fix."""

    def __init__(
        self,
        path: Path,
        ort: Any,
        options: Any,
        chain: Sequence[Any],
        hint: str = CHECK_INPUTS,
    ) -> None:
        self.name = path.name
        self.hint = hint  # who builds the inputs, for the error on a wrong one
        self.session = load_session(ort, path, options, chain)
        self.inputs = [(i.name, list(i.shape), i.type) for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    @classmethod
    def open(
        cls,
        path: str | Path,
        provider: str = "cpu",
        threads: int | None = None,
        hint: str = CHECK_INPUTS,
    ) -> GraphSession:
        """A session on one graph file with this package's options for `provider`."""
        ort = import_onnxruntime()
        chain = provider_chain(ort, provider)
        options = session_options(ort, provider, threads)
        return cls(Path(path), ort, options, chain, hint)

    def feed(self, tensors: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
        """The session's feed for these tensors, in the graph's input order."""
        if len(tensors) != len(self.inputs):
            raise FBClipError(f"{self.name} takes {len(self.inputs)} inputs, got {len(tensors)}")
        axes: dict[str, int] = {}
        feed = {}
        for tensor, (name, shape, kind) in zip(tensors, self.inputs, strict=True):
            feed[name] = self._array(tensor, name, shape, kind, axes)
        return feed

    def _array(
        self, tensor: torch.Tensor, name: str, shape: list[Any], kind: str, axes: dict[str, int]
    ) -> np.ndarray:
        dtype = ONNX_DTYPES.get(kind)
        wrong_type = dtype is None or (
            tensor.dtype != dtype and (dtype.is_floating_point or tensor.dtype.is_floating_point)
        )
        fits = tensor.dim() == len(shape) and not wrong_type
        for size, dim in zip(tensor.shape, shape, strict=False):
            if isinstance(dim, int):
                fits = fits and size == dim
            elif isinstance(dim, str):
                fits = fits and axes.setdefault(dim, int(size)) == size
        if not fits or tensor.numel() == 0:
            raise FBClipError(
                f"{self.name} takes {name} {tuple(shape)} {kind[7:-1]}, got "
                f"{tuple(tensor.shape)} {tensor.dtype}; named axes must agree between inputs "
                f"({self.hint})"
            )
        return np.ascontiguousarray(tensor.detach().cpu().to(dtype).numpy())

    def run(self, feed: dict[str, np.ndarray]) -> list[torch.Tensor]:
        """Outputs of a checked feed as CPU tensors, in the graph's order."""
        outputs = self.session.run(self.outputs, feed)
        return [torch.from_numpy(np.asarray(o)) for o in outputs]

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Outputs as CPU tensors, in the graph's order."""
        return self.run(self.feed(tensors))


__all__ = [
    "CHECK_INPUTS",
    "ONNX_DTYPES",
    "PROVIDERS",
    "GraphSession",
    "check_available",
    "check_provider",
    "import_onnxruntime",
    "load_session",
    "provider_chain",
    "session_options",
]

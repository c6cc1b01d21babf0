"""OpenVINO backend: the CPU runtime anomalib deploys with, over the exported ONNX graphs.

fp32 and bf16 compile the float32 graph with INFERENCE_PRECISION_HINT f32 or bf16 (always
set: OpenVINO defaults to bf16 on a CPU that has it, which would make 'fp32' a lie); int8
compiles the QDQ graph with the f32 hint, so the ops left unquantized stay float32. The
precision its matrix products were compiled to is read back from the runtime model and
reported, and one that differs from the asked precision is an error, not a quiet fallback.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from fbclip_edge.artifacts.manifest import ArtifactError, GraphSpec, Manifest, verify_files
from fbclip_edge.artifacts.options import GraphRole, Precision, Scoring
from fbclip_edge.errors import FBClipError
from fbclip_edge.runtime import cpu_features
from fbclip_edge.runtime.base import Backend, BackendInfo, MapScorer, run_split

# Compile-time hint per export precision.
PRECISION_HINTS = {Precision.FP32: "f32", Precision.BF16: "bf16", Precision.INT8: "f32"}
# Layers whose runtime precision tells what the compiled model really computes in.
_HEAVY_LAYERS = ("FullyConnected", "MatMul", "Convolution")
# Runtime precisions of FullyConnected layers that count as the asked precision.
_EXPECTED = {Precision.FP32: {"f32"}, Precision.BF16: {"bf16"}, Precision.INT8: {"u8", "i8"}}


def import_openvino() -> ModuleType:
    """The openvino module, or a one-line error naming the extra to install."""
    try:
        return importlib.import_module("openvino")
    except ImportError:
        raise FBClipError(
            "openvino is not installed; install fbclip-edge[openvino], or open the artifacts "
            "with backend='onnxruntime'"
        ) from None


def openvino_available() -> bool:
    """openvino is importable (checked without importing it: that takes a second)."""
    return importlib.util.find_spec("openvino") is not None


def compiled_precisions(compiled: Any) -> Counter[str]:
    """'<layer> <runtime precision>' counts of the heavy layers of a compiled model."""
    found: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" not in info or "runtimePrecision" not in info:
            continue
        layer = info["layerType"].astype(str)
        if layer in _HEAVY_LAYERS:
            found[f"{layer} {info['runtimePrecision'].astype(str)}"] += 1
    return found


class OpenVinoBackend(Backend):
    """One compiled OpenVINO model on the CPU over the graph the manifest's scoring needs.

    precision None runs the export's bf16 or int8 (else fp32). An explicit 'bf16' also runs
    on an fp32 or int8 export, since it needs no graph of its own (the bench does so), but
    only a `--precision bf16` export was parity-gated in bf16.
    """

    def __init__(
        self,
        artifacts: Path,
        manifest: Manifest,
        precision: str | None = None,
        threads: int | None = None,
        verify: bool = True,
    ) -> None:
        ov = import_openvino()
        wanted = cpu_features.cpu_precision(manifest, precision)
        if wanted == Precision.FP16:
            raise FBClipError(
                "OpenVINO runs fp32, bf16 or int8 on the CPU, not fp16; use precision='bf16' "
                "or 'fp32', or backend='onnxruntime' on a GPU"
            )
        cpu_features.refuse_without_isa(wanted, artifacts)
        spec = self._graph(manifest, wanted)
        files = [spec.file, *spec.data_files]
        if manifest.scoring == Scoring.KERNEL:
            files += [manifest.text_features, manifest.map_weights]
        if verify:
            verify_files(manifest, artifacts, files)
        config = {
            "INFERENCE_PRECISION_HINT": PRECISION_HINTS[wanted],
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1",  # one batch in flight, all threads on it
            "INFERENCE_NUM_THREADS": str(threads or 0),  # 0: OpenVINO's choice (physical cores)
        }
        core = ov.Core()
        try:
            self.compiled = core.compile_model(
                core.read_model(str(artifacts / spec.file)), "CPU", config
            )
        except Exception as error:  # OpenVINO raises RuntimeError subclasses of its own
            raise ArtifactError(
                f"OpenVINO cannot load {spec.file} ({type(error).__name__}: "
                f"{str(error).strip().splitlines()[0][:200]}); re-export the artifacts"
            ) from None
        layers = compiled_precisions(self.compiled)
        self._check_precision(wanted, layers, spec)
        self._check_interface(spec, manifest)
        self.spec = spec
        self.request = self.compiled.create_infer_request()
        self.lock = threading.Lock()  # one infer request: calls from several threads queue
        self.outputs = [self.compiled.output(t.name) for t in spec.outputs]
        from fbclip_edge.runtime.onnxruntime import run_batch_limit

        self.run_batch = run_batch_limit(manifest, "cpu", torch.device("cpu"))
        self.batch_range = (manifest.batch.min, manifest.batch.max)
        self.scorer = MapScorer.for_artifacts(artifacts, manifest)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.info = BackendInfo(
            "openvino",
            "cpu",
            wanted.value,
            manifest.image_size,
            {
                "graph": spec.file,
                "scoring": manifest.scoring.value,
                "inference_precision": hint.get_type_name(),
                "compiled": ", ".join(f"{k} x{v}" for k, v in sorted(layers.items())),
                "threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS")),
                "streams": int(self.compiled.get_property("NUM_STREAMS")),
                "cpu": cpu_features.detect().model,
                "isa": " ".join(cpu_features.detect().isa),
                "openvino": ov.get_version(),
                "run_batch": self.run_batch or "any",
            },
        )

    @staticmethod
    def _graph(manifest: Manifest, precision: Precision) -> GraphSpec:
        """The int8 graph for int8, the float32 graph for fp32 and bf16."""
        role = GraphRole.VISION if manifest.scoring == Scoring.KERNEL else GraphRole.FULL
        stored = Precision.INT8 if precision == Precision.INT8 else Precision.FP32
        spec = manifest.graph(role, stored)
        if spec is None:
            raise ArtifactError(
                f"the artifacts have no {stored.value} {role.value} graph; re-export with "
                f"--precision {precision.value} --scoring {manifest.scoring.value}"
            )
        return spec

    @staticmethod
    def _check_precision(wanted: Precision, layers: Counter[str], spec: GraphSpec) -> None:
        """The fully connected layers run in the asked precision, or the load fails."""
        linear = {key.split()[1] for key in layers if key.startswith("FullyConnected ")}
        if linear and not linear & _EXPECTED[wanted]:
            raise FBClipError(
                f"OpenVINO compiled {spec.file} for {wanted.value} into "
                f"{', '.join(sorted(linear))} fully connected layers; this OpenVINO cannot run "
                f"{wanted.value} on this CPU: use precision='fp32'"
            )

    def _check_interface(self, spec: GraphSpec, manifest: Manifest) -> None:
        """The graph must fit the manifest (catches a graph copied from another export)."""
        size = manifest.image_size
        shape = self.compiled.input(0).get_partial_shape()
        found = [str(d) for d in shape]
        names = [o.get_any_name() for o in self.compiled.outputs]
        if found[1:] != ["3", str(size), str(size)] or names != [t.name for t in spec.outputs]:
            raise ArtifactError(
                f"{spec.file} takes {found} and gives {names}, but the manifest describes "
                f"(3, {size}, {size}) -> {[t.name for t in spec.outputs]}: the graph belongs to "
                "another export; re-export the folder"
            )

    def _infer(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        feed = np.ascontiguousarray(pixels.cpu().numpy())
        with self.lock:
            result = self.request.infer({0: feed}, share_inputs=True, share_outputs=False)
            return [torch.from_numpy(np.asarray(result[o])) for o in self.outputs]

    @torch.inference_mode()
    def _run(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return run_split(pixel_values, self.run_batch, self._infer, self.scorer)

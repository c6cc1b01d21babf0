"""manifest.json: what an artifacts folder holds, how it was made, and the checks run on load.

Every listed file carries its sha256, so a truncated copy or a hand-edited graph is refused
with the file's name instead of producing quietly wrong scores.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fbclip_edge.artifacts.options import BatchProfile, GraphRole, Precision, Scoring
from fbclip_edge.errors import FBClipError

MANIFEST = "manifest.json"
SCHEMA = "fbclip-edge-artifacts"
SCHEMA_VERSION = 1
TEXT_FEATURES = "text_features.npy"
MAP_WEIGHTS = "map_weights.npy"
TIMING_CACHE = "timing.cache"
PARITY = "parity.json"


class ArtifactError(FBClipError):
    """An artifacts folder that is incomplete, altered, or made for another machine."""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (ONNX files can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output; the batch axis is the string 'batch'."""

    name: str
    shape: list[int | str]
    dtype: str


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph: its role, compute precision, interface and (for > 2 GB) data files."""

    role: GraphRole
    precision: Precision
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    ops: list[str]
    data_files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EngineSpec:
    """A serialized TensorRT engine and what it only runs on."""

    file: str
    role: GraphRole
    precision: Precision
    tensorrt_version: str
    compute_capability: str
    gpu: str
    batch: BatchProfile
    optimization_level: int
    workspace_bytes: int
    strongly_typed: bool
    build_seconds: float


@dataclass(frozen=True)
class CpuTiming:
    """Milliseconds per image of each CPU runtime the export's parity check ran, on the
    exporting CPU (best of the parity batches after the first): runtime.open's 'auto'
    picks the fastest of these when it runs on the same CPU model and core count."""

    cpu: str
    logical_cores: int
    batch: int
    ms_per_image: dict[str, float]  # "<backend> <precision>", e.g. "openvino int8"


@dataclass(frozen=True)
class ModelRef:
    """The model folder the artifacts came from (the torch backend reloads it)."""

    path: str
    weights_sha256: str
    backbone: str
    config: dict[str, Any]


@dataclass
class Manifest:
    """Everything a runtime needs to open the artifacts without the exporting machine."""

    model: ModelRef
    image_size: int
    patch_size: int
    grid_size: int
    num_maps: int
    tokens: int
    embed_dim: int
    temperature: float
    precision: Precision
    scoring: Scoring
    opset: int
    batch: BatchProfile
    graphs: list[GraphSpec]
    engines: list[EngineSpec]
    files: dict[str, str]  # relative path -> sha256
    versions: dict[str, str]
    text_features: str = TEXT_FEATURES
    map_weights: str = MAP_WEIGHTS
    # The method and its scoring rule (see fbclip_edge.methods.base.ScoringRule); artifacts
    # written before methods existed are FB-CLIP's.
    method: str = "fbclip"
    score_rule: str = "logit_sum"
    timing_cache: str | None = None
    parity: str | None = None
    cpu_timing: CpuTiming | None = None
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION
    created: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )
    # Keys other tools add (e.g. `calibration` from `fbclip-edge calibrate`), kept on rewrite.
    extra: dict[str, Any] = field(default_factory=dict)

    def graph(self, role: GraphRole, precision: Precision = Precision.FP32) -> GraphSpec | None:
        """The graph with this role and precision, if exported."""
        for spec in self.graphs:
            if spec.role == role and spec.precision == precision:
                return spec
        return None

    def engine(self) -> EngineSpec | None:
        """The engine for the manifest's scoring mode, if one was built."""
        role = GraphRole.VISION if self.scoring == Scoring.KERNEL else GraphRole.FULL
        return next((e for e in self.engines if e.role == role), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: enums as their values, extra keys at the top level."""
        data = asdict(self)
        extra = data.pop("extra")
        return json.loads(json.dumps({**data, **extra}, default=_enum_value))


def _enum_value(value: object) -> object:
    if hasattr(value, "value"):
        return value.value
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _build(data: dict[str, Any]) -> Manifest:
    """Manifest from parsed JSON; KeyError/TypeError/ValueError mean a malformed file."""
    graphs = [
        GraphSpec(
            role=GraphRole(g["role"]),
            precision=Precision(g["precision"]),
            file=g["file"],
            inputs=[TensorSpec(**t) for t in g["inputs"]],
            outputs=[TensorSpec(**t) for t in g["outputs"]],
            ops=list(g["ops"]),
            data_files=list(g.get("data_files", [])),
        )
        for g in data["graphs"]
    ]
    engines = [
        EngineSpec(
            **{
                **e,
                "role": GraphRole(e["role"]),
                "precision": Precision(e["precision"]),
                "batch": BatchProfile(**e["batch"]),
            }
        )
        for e in data["engines"]
    ]
    known = {f.name for f in fields(Manifest)}
    values = {k: v for k, v in data.items() if k in known and k != "extra"}
    values.update(
        model=ModelRef(**data["model"]),
        precision=Precision(data["precision"]),
        scoring=Scoring(data["scoring"]),
        batch=BatchProfile(**data["batch"]),
        graphs=graphs,
        engines=engines,
        cpu_timing=CpuTiming(**data["cpu_timing"]) if data.get("cpu_timing") else None,
        extra={k: v for k, v in data.items() if k not in known},
    )
    return Manifest(**values)


def read_manifest(artifacts: str | Path) -> Manifest:
    """Parse `artifacts/manifest.json`, refusing missing, malformed or newer-schema files."""
    path = Path(artifacts) / MANIFEST
    if not Path(artifacts).is_dir() or not path.is_file():
        raise ArtifactError(
            f"{artifacts} is not an artifacts folder (no {MANIFEST}); create it with "
            "`fbclip-edge export --model DIR --out ARTIFACTS`"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(
            f"{path} is not valid JSON ({error}); re-export the artifacts"
        ) from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ArtifactError(f"{path} is not an fbclip-edge artifacts manifest; re-export it")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema version {data.get('schema_version')}; this fbclip-edge reads "
            f"version {SCHEMA_VERSION}: re-export the artifacts with this version"
        )
    try:
        return _build(data)
    except (KeyError, TypeError, ValueError, FBClipError) as error:
        raise ArtifactError(
            f"{path} is incomplete or malformed ({type(error).__name__}: {error}); re-export "
            "the artifacts"
        ) from None


def write_manifest(manifest: Manifest, folder: str | Path) -> Path:
    """Write manifest.json atomically (temp file + rename) inside `folder`."""
    path = Path(folder) / MANIFEST
    handle, temp = tempfile.mkstemp(prefix=".manifest.", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        stream.write(json.dumps(manifest.to_dict(), indent=2) + "\n")
    os.chmod(temp, 0o644)
    os.replace(temp, path)
    return path


def record_files(manifest: Manifest, folder: str | Path, names: list[str]) -> None:
    """Hash these files into the manifest's file list."""
    for name in names:
        manifest.files[name] = sha256_file(Path(folder) / name)


def verify_files(manifest: Manifest, folder: str | Path, names: list[str]) -> None:
    """Refuse if a file is unlisted, missing or changed since export (names the file)."""
    root = Path(folder)
    for name in names:
        expected = manifest.files.get(name)
        path = root / name
        if expected is None:
            raise ArtifactError(
                f"{name} is not listed in {root / MANIFEST}; the manifest was edited or comes "
                "from another export: re-export the artifacts"
            )
        if not path.is_file():
            raise ArtifactError(
                f"{path} is missing; copy the whole artifacts folder or re-export it"
            )
        if sha256_file(path) != expected:
            raise ArtifactError(
                f"{path} does not match its sha256 in {MANIFEST} (truncated, corrupted or "
                "replaced); re-export the artifacts with `fbclip-edge export`"
            )


def export_command(manifest: Manifest, artifacts: str | Path, targets: str = "onnx,trt") -> str:
    """The command that rebuilds these artifacts, for error messages."""
    if manifest.method == "filo":  # FiLo's export takes no image size, scoring or targets
        frame = manifest.extra.get("filo", {}).get("frame_size")
        size = f" --frame-size {frame[0]}x{frame[1]}" if frame else ""
        return (
            f"fbclip-edge export --model {manifest.model.path} --out {artifacts} "
            f"--batch {manifest.batch} --precision {manifest.precision.value}{size}"
        )
    if manifest.precision.cpu_only:  # bf16 and int8 build no engine
        targets = "onnx"
    return (
        f"fbclip-edge export --model {manifest.model.path} --out {artifacts} "
        f"--image-size {manifest.image_size} --batch {manifest.batch} "
        f"--precision {manifest.precision.value} --scoring {manifest.scoring.value} "
        f"--targets {targets}"
    )


def model_folder(artifacts: Path, manifest: Manifest, verify: bool = True) -> Path:
    """The model folder the manifest names (backend='torch' reloads it), refused when its
    weights are gone or changed since the export."""
    from fbclip_edge.modelformat import WEIGHTS_FILE

    folder = Path(manifest.model.path)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(
            f"backend='torch' reloads the model folder {folder} recorded in {artifacts}, and "
            f"{weights} is gone; restore it, or use backend='onnxruntime'"
        )
    if verify and sha256_file(weights) != manifest.model.weights_sha256:
        raise ArtifactError(
            f"the model in {folder} changed since {artifacts} was exported (sha256 of "
            f"{WEIGHTS_FILE} differs); re-export with `{export_command(manifest, artifacts)}`"
        )
    return folder

"""CPU precisions: bf16 and int8 exports and the OpenVINO backend, gated against the float32
PyTorch model on the FB-CLIP fixture at 112 px and AnomalyCLIP's tiny model at 56 px; a CPU
without the instructions is refused with the reason (monkeypatched detection), and where this
CPU lacks them the tests that need them skip, saying which flags are missing."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from fbclip_edge import FBClipError, create_model, import_official, save_model
from fbclip_edge.artifacts.manifest import CpuTiming, read_manifest
from fbclip_edge.artifacts.options import DEFAULT_TOLERANCES, Precision, parse_precision
from fbclip_edge.bench import backends as bench_backends
from fbclip_edge.export import export_artifacts
from fbclip_edge.export.parity import synthetic_frames
from fbclip_edge.export.quantize import QUANTIZED_OPS, weight_nodes
from fbclip_edge.preprocess import preprocess
from fbclip_edge.runtime import cpu_features
from fbclip_edge.runtime import open as open_backend
from fbclip_edge.runtime.cpu_features import CpuFeatures, parse_cpuinfo, required_isa
from fbclip_edge.runtime.open import choose_cpu
from fbclip_edge.runtime.openvino import openvino_available

SIZE = 112
TINY = 56
NO_OPENVINO = "openvino is not installed (pip install fbclip-edge[openvino])"
# A CPU with AVX2 only: what the refusal tests pretend to run on.
OLD_CPU = CpuFeatures("Old Xeon E5-2690 v4", 4, 2, frozenset({"avx2", "fma"}))


def needs(precision: str, runtime: str | None = None) -> None:
    """Skip, with the reason, where this CPU or install cannot run `precision`."""
    reason = cpu_features.detect().refusal(precision)
    if reason is not None:
        pytest.skip(reason)
    if (runtime == "openvino" or precision == "bf16") and not openvino_available():
        pytest.skip(NO_OPENVINO)


def pixels(size: int, count: int = 4) -> torch.Tensor:
    frames, _ = synthetic_frames(count, size)
    return preprocess(frames, size)


def assert_near(backend, model, batch: torch.Tensor, score: float, patch: float) -> None:
    with torch.no_grad():
        expected = model(batch)
    got_score, got_patch = backend.run(batch)
    assert (got_score - expected.image_score).abs().max() <= score
    assert (got_patch - expected.patch_map).abs().max() <= patch


@pytest.fixture(scope="module")
def fixture_model(clip_weights, official_checkpoint):
    return import_official(clip_weights, official_checkpoint, image_size=SIZE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, fixture_model):
    folder = tmp_path_factory.mktemp("cpu-precisions") / "model"
    save_model(fixture_model, folder)
    return folder


INT8_STEPS: list[tuple[str, int, int]] = []


@pytest.fixture(scope="module")
def int8(model_dir):
    needs("int8")
    return export_artifacts(
        model_dir,
        model_dir.parent / "int8",
        precision="int8",
        targets="onnx",
        batch="1:2:4",
        progress=lambda text, done, total: INT8_STEPS.append((text, done, total)),
    )


def test_int8_calibration_reports_each_frame_within_its_step(int8):
    """Calibration on ViT-L takes minutes: each frame is reported, as part of the int8 step."""
    frames = [s for s in INT8_STEPS if s[0].startswith("int8 calibration: frame")]
    (step,) = [s for s in INT8_STEPS if s[0].startswith("int8 vision.int8.onnx")]
    assert frames and frames[-1][0].endswith(f"of {len(frames)}")
    assert {(done, total) for _, done, total in frames} == {(step[1], step[2])}


@pytest.fixture(scope="module")
def bf16(model_dir):
    needs("bf16")
    return export_artifacts(
        model_dir, model_dir.parent / "bf16", precision="bf16", targets="onnx", batch="1:2:4"
    )


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory):
    """AnomalyCLIP's tiny model exported fp32 at 56 px: cheap artifacts for the refusals."""
    root = tmp_path_factory.mktemp("tiny-fp32")
    save_model(create_model("tiny", method="anomalyclip", image_size=TINY), root / "model")
    export_artifacts(root / "model", root / "artifacts", precision="fp32", targets="onnx",
                     batch="1:2:4")
    return root / "artifacts"


def _as_precision(artifacts, tmp_path, precision: str):
    """A copy whose manifest claims `precision` (the graphs stay the float32 ones)."""
    copy = tmp_path / f"as-{precision}"
    shutil.copytree(artifacts, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["precision"] = precision
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


# ---------------------------------------------------------------- CPU features


ZEN4 = """processor\t: 0
model name\t: AMD EPYC 9654 96-Core Processor
physical id\t: 0
core id\t: 0
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16

processor\t: 1
model name\t: AMD EPYC 9654 96-Core Processor
physical id\t: 0
core id\t: 0
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16

processor\t: 2
physical id\t: 0
core id\t: 1
"""
SAPPHIRE_RAPIDS = "model name : Intel(R) Xeon(R) Platinum 8480+\nflags : avx2 avx512f " \
    "avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8\n"


def test_cpu_features_from_cpuinfo():
    zen4 = parse_cpuinfo(ZEN4, 3)
    assert zen4.model == "AMD EPYC 9654 96-Core Processor"
    assert (zen4.logical_cores, zen4.physical_cores) == (3, 2)
    assert zen4.has_avx512 and zen4.has_vnni and zen4.has_bf16 and not zen4.has_amx
    assert zen4.isa == ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                        "avx512_bf16"]
    spr = parse_cpuinfo(SAPPHIRE_RAPIDS, 8)
    assert spr.has_amx and spr.runs("bf16") and spr.runs(Precision.INT8)
    assert spr.physical_cores is None  # no core ids listed
    assert required_isa("fp32") == required_isa("fp16") == ()
    assert "avx512_bf16" in required_isa("bf16") and "amx_int8" in required_isa("int8")
    assert OLD_CPU.lacks("int8") == ("avx512_vnni", "avx_vnni", "amx_int8")
    assert not parse_cpuinfo("", 1).flags  # no procfs: nothing claimed
    bare = parse_cpuinfo("model name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 17\n", 2)
    assert bare.model == "AMD EPYC (family 25, model 17)"  # what export timings are matched by
    here = cpu_features.detect()
    assert here.logical_cores >= 1 and here.model


def test_refusal_names_what_is_missing_and_what_to_use():
    assert OLD_CPU.refusal("fp32") is None
    message = OLD_CPU.refusal("int8")
    assert message == (
        "int8 needs avx512_vnni, avx_vnni or amx_int8, and this CPU (Old Xeon E5-2690 v4) "
        "has avx2, fma; re-export with --precision fp32"
    )
    vnni_only = dataclasses.replace(OLD_CPU, flags=frozenset({"avx2", "avx512_vnni"}))
    assert vnni_only.refusal("bf16").endswith("re-export with --precision int8 or fp32")
    assert "\n" not in message


def test_precision_options_and_tolerances():
    assert parse_precision("INT8") == Precision.INT8 and parse_precision("bf16").cpu_only
    assert not Precision.FP16.cpu_only
    for precision in (Precision.BF16, Precision.INT8):
        assert (DEFAULT_TOLERANCES[precision].score, DEFAULT_TOLERANCES[precision].map) == (
            1e-2,
            2e-2,
        )


# ---------------------------------------------------------------- int8


def test_int8_export_writes_a_hashed_graph_and_passes_parity(int8):
    manifest = int8.manifest
    assert manifest.precision == Precision.INT8
    spec = manifest.graph(manifest.graphs[0].role, Precision.INT8)
    assert spec.file == "vision.int8.onnx" and spec.file in manifest.files
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(spec.ops)
    assert manifest.graph(spec.role, Precision.FP32).file == "vision.onnx"
    report = int8.parity
    targets = [row.target for row in report.rows]
    expected = ["vision.onnx", "vision.int8.onnx"]
    expected += ["vision.int8.onnx (openvino)"] if openvino_available() else []
    assert targets == expected and report.passed
    for row in report.rows[1:]:
        assert row.precision == "int8" and row.tolerance == DEFAULT_TOLERANCES[Precision.INT8]
        # measured on this fixture: score 1e-3, map 1.4e-3 (tolerance 1e-2 / 2e-2)
        assert row.score_max_abs < 5e-3 and row.map_max_abs < 5e-3, row
    timing = manifest.cpu_timing
    assert timing.cpu == cpu_features.detect().model and timing.batch == 2
    assert "onnxruntime int8" in timing.ms_per_image and timing.ms_per_image["onnxruntime int8"] > 0
    stored = json.loads((int8.artifacts / "parity.json").read_text())
    assert stored["rows"][1]["ms_per_image"] > 0


def test_int8_graph_quantizes_only_weight_products(int8):
    """QDQ pairs feed the weight MatMul/Gemm only; LayerNorm, Softmax, the L2 normalizations
    and the patch embedding read float32 tensors, activation x activation products stay
    float32."""
    graph = onnx.load(str(int8.artifacts / "vision.int8.onnx")).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    users = {n.op_type for n in graph.node if set(n.input) & dequantized}
    assert users <= set(QUANTIZED_OPS)
    for node in graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "ReduceL2", "Conv"):
            assert not set(node.input) & dequantized, node.name
    fp32 = onnx.load(str(int8.artifacts / "vision.onnx"))
    chosen = weight_nodes(fp32)
    products = [n for n in fp32.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert 0 < len(chosen) < len(products)  # the attention products are left out
    quantized = [n for n in graph.node if n.op_type in QUANTIZED_OPS
                 and n.input[0] in dequantized and n.input[1] in dequantized]
    assert len(quantized) == len(chosen)


def test_int8_runs_on_onnxruntime_and_openvino(int8, fixture_model):
    batch = pixels(SIZE, 3)
    ort = open_backend(int8.artifacts, backend="onnxruntime", provider="cpu")
    assert ort.info.precision == "int8" and ort.info.details["graph"] == "vision.int8.onnx"
    assert_near(ort, fixture_model, batch, 1e-2, 2e-2)
    if not openvino_available():
        pytest.skip(NO_OPENVINO)
    ov = open_backend(int8.artifacts, backend="openvino")
    assert ov.info.name == "openvino" and ov.info.precision == "int8"
    assert ov.info.details["inference_precision"] == "f32"  # unquantized ops stay float32
    assert "FullyConnected u8" in ov.info.details["compiled"]
    assert_near(ov, fixture_model, batch, 1e-2, 2e-2)


def test_openvino_fp32_matches_pytorch(int8, fixture_model):
    """The float32 graph on OpenVINO with the f32 hint (its default here may be bf16), at
    batches other than the traced one."""
    needs("fp32", "openvino")
    ov = open_backend(int8.artifacts, backend="openvino", precision="fp32")
    assert ov.info.details["inference_precision"] == "f32" and ov.info.precision == "fp32"
    assert "FullyConnected f32" in ov.info.details["compiled"]
    for batch in (1, 3):
        assert_near(ov, fixture_model, pixels(SIZE, batch), 1e-4, 1e-4)


def test_auto_takes_the_fastest_measured_and_says_why(int8):
    backend = open_backend(int8.artifacts)
    if torch.cuda.is_available():
        pytest.skip("auto takes the GPU here")
    timing = int8.manifest.cpu_timing.ms_per_image
    runtimes = [r for r in ("onnxruntime", "openvino") if f"{r} int8" in timing]
    fastest = min(runtimes, key=lambda r: timing[f"{r} int8"])
    assert backend.info.name == fastest and backend.info.precision == "int8"
    why = backend.info.details["selected"]
    assert "int8 (this CPU has" in why
    if len(runtimes) > 1:
        assert "fastest at export on this CPU" in why


# ---------------------------------------------------------------- bf16


def test_bf16_export_is_the_fp32_graph_compiled_to_bf16(bf16, fixture_model):
    manifest = bf16.manifest
    assert manifest.precision == Precision.BF16
    assert {g.file for g in manifest.graphs} == {"vision.onnx", "full.onnx"}
    targets = [row.target for row in bf16.parity.rows]
    assert targets == ["vision.onnx", "vision.onnx (openvino bf16)"]
    row = bf16.parity.rows[1]
    assert row.precision == "bf16" and row.backend == "openvino on cpu"
    # measured on this fixture: score 4e-4, map 5e-4 (tolerance 1e-2 / 2e-2)
    assert row.passed and row.score_max_abs < 3e-3 and row.map_max_abs < 3e-3
    ov = open_backend(bf16.artifacts, backend="openvino")
    assert ov.info.precision == "bf16" and ov.info.details["inference_precision"] == "bf16"
    assert "FullyConnected bf16" in ov.info.details["compiled"]
    assert_near(ov, fixture_model, pixels(SIZE, 2), 1e-2, 2e-2)
    auto = open_backend(bf16.artifacts)
    if not torch.cuda.is_available():
        assert auto.info.name == "openvino" and "the one runtime" in auto.info.details["selected"]
    ort = open_backend(bf16.artifacts, backend="onnxruntime", provider="cpu")
    assert ort.info.precision == "fp32"  # no bf16 kernels: its float32 graph, said so


def test_onnxruntime_refuses_bf16_with_the_alternative(tiny_fp32):
    with pytest.raises(FBClipError, match="no bfloat16 MatMul/Gemm kernels.*backend='openvino'"):
        open_backend(tiny_fp32, backend="onnxruntime", provider="cpu", precision="bf16")


# ---------------------------------------------------------------- refusals and auto


def test_cpu_without_the_instructions_is_refused_at_load(tiny_fp32, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_features, "detect", lambda: OLD_CPU)
    as_int8 = _as_precision(tiny_fp32, tmp_path, "int8")
    missing = r"int8 needs avx512_vnni, avx_vnni or amx_int8, and this CPU \(Old Xeon"
    for options in ({}, {"backend": "onnxruntime", "provider": "cpu"}, {"backend": "openvino"}):
        if options.get("backend") == "openvino" and not openvino_available():
            continue
        with pytest.raises(FBClipError, match=missing + r".*precision='fp32'") as caught:
            open_backend(as_int8, **options)
        assert "\n" not in str(caught.value)
    if openvino_available():
        with pytest.raises(FBClipError, match="bf16 needs avx512_bf16 or amx_bf16"):
            open_backend(_as_precision(tiny_fp32, tmp_path, "bf16"), backend="openvino")
    opened = open_backend(as_int8, backend="onnxruntime", provider="cpu", precision="fp32")
    assert opened.info.precision == "fp32"  # the fix the message names works


def test_cpu_without_the_instructions_refuses_the_export(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_features, "detect", lambda: OLD_CPU)
    save_model(create_model("tiny", method="anomalyclip", image_size=TINY), tmp_path / "model")
    with pytest.raises(FBClipError, match="int8 needs.*export on a CPU that has them"):
        export_artifacts(tmp_path / "model", tmp_path / "out", precision="int8", targets="onnx")
    assert not (tmp_path / "out").exists()


def test_cpu_precisions_build_no_engine(tmp_path):
    save_model(create_model("tiny", method="anomalyclip", image_size=TINY), tmp_path / "model")
    with pytest.raises(FBClipError, match="CPU precision.*drop trt from --targets"):
        export_artifacts(tmp_path / "model", tmp_path / "out", precision="int8",
                         targets="onnx,trt")


def test_choose_cpu_by_timing_from_this_cpu_else_by_rule(tiny_fp32):
    here = parse_cpuinfo(ZEN4, 3)
    manifest = dataclasses.replace(read_manifest(tiny_fp32), precision=Precision.INT8)
    both = ["onnxruntime", "openvino"]
    ruled = choose_cpu(manifest, here, both)
    assert (ruled.backend, ruled.precision) == ("onnxruntime", Precision.INT8)
    assert "first by rule (no export timing from this CPU" in ruled.why
    assert "int8 (this CPU has avx512_vnni) on onnxruntime" in ruled.why
    timing = CpuTiming(here.model, 3, 2, {"onnxruntime int8": 9.0, "openvino int8": 5.0})
    timed = choose_cpu(dataclasses.replace(manifest, cpu_timing=timing), here, both)
    assert timed.backend == "openvino" and "onnxruntime 9.00, openvino 5.00" in timed.why
    other_cpu = dataclasses.replace(timing, logical_cores=64)
    assert choose_cpu(dataclasses.replace(manifest, cpu_timing=other_cpu), here, both).backend \
        == "onnxruntime"
    assert choose_cpu(manifest, here, ["openvino"]).backend == "openvino"
    fp32 = dataclasses.replace(manifest, precision=Precision.FP32)
    assert choose_cpu(fp32, here, both).backend == "onnxruntime"
    assert choose_cpu(fp32, here, []) is None  # torch runs it
    bf16 = dataclasses.replace(manifest, precision=Precision.BF16)
    with pytest.raises(FBClipError, match="run on openvino, and none is installed"):
        choose_cpu(bf16, here, ["onnxruntime"])
    assert choose_cpu(bf16, here, both, precision="fp32").precision == Precision.FP32


# ---------------------------------------------------------------- bench


def test_bench_cpu_backends_skip_with_the_reason(monkeypatch):
    monkeypatch.setattr(cpu_features, "detect", lambda: OLD_CPU)
    for name in ("onnxruntime-cpu-int8", "openvino-cpu-int8", "openvino-cpu-bf16"):
        reason = bench_backends.skip_reason(name)
        assert reason and ("this CPU has none of" in reason or "openvino" in reason), name
    assert bench_backends.skip_reason("openvino-cpu-fp32") in (None, NO_OPENVINO)
    plan = bench_backends.export_plan
    assert plan(["onnxruntime-cpu", "openvino-cpu-int8"], (1, 8)).precision == "int8"
    assert plan(["openvino-cpu-bf16", "openvino-cpu-fp32"], (1,)).precision == "bf16"
    assert plan(["onnxruntime-cpu"], (1,)).precision == "fp32"


# ---------------------------------------------------------------- AnomalyCLIP, through the CLI


def test_anomalyclip_int8_export_from_the_cli(tmp_path):
    """`fbclip-edge export --precision int8 --calibration-frames DIR` on AnomalyCLIP's tiny
    model; both runtimes within the int8 tolerance, OpenVINO's bf16 within bf16's."""
    needs("int8")
    from PIL import Image

    from fbclip_edge.cli import app

    model = create_model("tiny", method="anomalyclip", image_size=TINY)
    save_model(model, tmp_path / "model")
    # 6 good plates at the export size: MinMax ranges from 2 plates, or from plates drawn at
    # 64 px and resized, put this random-weight model's map off by 3e-2 (here: 1e-2)
    frames, labels = synthetic_frames(12, TINY)
    (tmp_path / "good").mkdir()
    good = [frame for frame, label in zip(frames, labels, strict=True) if label == 0]
    for index, frame in enumerate(good):
        Image.fromarray(frame).save(tmp_path / "good" / f"{index}.png")
    result = CliRunner().invoke(app, [
        "export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "int8"),
        "--precision", "int8", "--targets", "onnx", "--batch", "1:2:4",
        "--calibration-frames", str(tmp_path / "good"),
    ])
    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.output  # the parity table (its width follows the terminal)
    parity = json.loads((tmp_path / "int8" / "parity.json").read_text())
    assert [row["target"] for row in parity["rows"]][:2] == ["vision.onnx", "vision.int8.onnx"]
    manifest = read_manifest(tmp_path / "int8")
    assert manifest.method == "anomalyclip" and manifest.precision == Precision.INT8
    batch = pixels(TINY, 3)
    ort = open_backend(tmp_path / "int8", backend="onnxruntime", provider="cpu")
    assert_near(ort, model, batch, 1e-2, 2e-2)
    if not openvino_available():
        return
    assert_near(open_backend(tmp_path / "int8", backend="openvino"), model, batch, 1e-2, 2e-2)
    if cpu_features.detect().runs("bf16"):
        bf16 = open_backend(tmp_path / "int8", backend="openvino", precision="bf16")
        assert_near(bf16, model, batch, 1e-2, 2e-2)
    assert np.isfinite(ort.run(batch)[0].numpy()).all()

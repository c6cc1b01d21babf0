"""ONNX export of the tiny model: graphs, checker, TensorRT operators, mixed precision, parity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from rich.console import Console

from fbclip_edge import FBClipError, create_model, save_model
from fbclip_edge.artifacts.manifest import read_manifest
from fbclip_edge.artifacts.options import (
    BatchProfile,
    Precision,
    Target,
    parse_precision,
    parse_scoring,
    parse_targets,
    tensorrt_usable,
)
from fbclip_edge.export import export_artifacts, parity_table
from fbclip_edge.export.mixed_precision import FP16_OPS, FP32_OPS
from fbclip_edge.export.onnx_graph import (
    TENSORRT_ONNX_OPS,
    check_graph,
    save_graph,
    unsupported_by_tensorrt,
)

SIZE = 112


@pytest.fixture(scope="module")
def model():
    return create_model("tiny", image_size=SIZE, seed=0).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("export")
    save_model(model, root / "model")
    steps = []
    result = export_artifacts(
        root / "model",
        root / "artifacts",
        precision="fp16",
        targets="onnx",
        scoring="kernel",
        progress=lambda text, done, total: steps.append((text, done, total)),
    )
    return result, steps


def _types(path):
    """name -> elem_type of every tensor after shape inference."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*graph.input, *graph.value_info, *graph.output]
    }
    types.update({init.name: init.data_type for init in graph.initializer})
    return model, types


def test_folder_holds_graphs_text_features_weights_manifest_and_parity(exported, model):
    result, _ = exported
    names = {p.name for p in result.artifacts.iterdir()}
    assert {
        "vision.onnx",
        "full.onnx",
        "vision.fp16.onnx",
        "text_features.npy",
        "map_weights.npy",
        "manifest.json",
        "parity.json",
    } <= names
    assert not [n for n in names if n.startswith(".")]  # no scratch left behind
    text = np.load(result.artifacts / "text_features.npy")
    np.testing.assert_array_equal(text, model.text_features.numpy())
    weights = np.load(result.artifacts / "map_weights.npy")
    np.testing.assert_allclose(weights, model.map_weights().detach().numpy())


def test_graphs_have_a_dynamic_batch_and_declared_shapes(exported):
    manifest = exported[0].manifest
    vision = manifest.graph(manifest.graphs[0].role)
    assert vision.file == "vision.onnx"
    assert vision.inputs[0].shape == ["batch", 3, SIZE, SIZE]
    assert vision.outputs[0].shape == ["batch", 15, (SIZE // 14) ** 2 + 1, 768]
    full = next(g for g in manifest.graphs if g.file == "full.onnx")
    assert [o.name for o in full.outputs] == ["image_score", "patch_map"]
    assert full.outputs[1].shape == ["batch", 1, SIZE // 14, SIZE // 14]


def test_every_graph_passes_checker_and_shape_inference(exported):
    result, _ = exported
    for spec in result.manifest.graphs:
        check = check_graph(result.artifacts / spec.file)
        assert check.inputs[0].dtype == "float32" and check.outputs[0].dtype == "float32"


def test_layernorm_is_one_node_per_norm(exported, model):
    """opset 17: every nn.LayerNorm on the path is one LayerNormalization node, nothing
    decomposed into ReduceMean/Sub/Pow chains that TensorRT would run in FP16."""
    graph = onnx.load(str(exported[0].artifacts / "vision.onnx"))
    count = sum(node.op_type == "LayerNormalization" for node in graph.graph.node)
    blocks = max(model.config.feature_layers)
    assert count == 1 + 2 * blocks + 3  # ln_pre, two per block used, three in FB attention
    assert graph.opset_import[0].version >= 17


def test_operators_are_all_parsed_by_tensorrt(exported):
    result, _ = exported
    for spec in result.manifest.graphs:
        assert unsupported_by_tensorrt(spec.ops) == [], spec.file
        assert set(spec.ops) <= TENSORRT_ONNX_OPS
    assert unsupported_by_tensorrt(["MatMul", "NonMaxSuppressionX", "Unique"]) == [
        "NonMaxSuppressionX",
        "Unique",
    ]


def test_mixed_precision_keeps_sensitive_ops_in_fp32(exported):
    """The FP16 graph: matrix products in FP16, LayerNorm/Softmax/reductions/clamps in FP32,
    float32 interface."""
    path = exported[0].artifacts / "vision.fp16.onnx"
    model, types = _types(path)
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    seen = {"fp16": 0, "fp32": 0}
    for node in model.graph.node:
        floats = [types.get(n) for n in node.input if types.get(n) in (f32, f16)]
        if node.op_type in FP32_OPS:
            assert all(t == f32 for t in floats), node.name
            seen["fp32"] += 1
        elif node.op_type in FP16_OPS:
            assert all(t == f16 for t in floats), node.name
            seen["fp16"] += 1
    assert seen["fp16"] > 50 and seen["fp32"] > 50
    assert types["pixel_values"] == f32 and types["maps"] == f32
    assert model.metadata_props[0].value == "fp16-mixed"
    assert path.stat().st_size < 0.7 * (path.parent / "vision.onnx").stat().st_size


def test_fp32_and_fp16_graphs_agree_with_torch(exported, model):
    result, _ = exported
    pixels = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.encode_maps(pixels).numpy()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for name, tolerance in (("vision.onnx", 1e-4), ("vision.fp16.onnx", 2e-2)):
        session = ort.InferenceSession(
            str(result.artifacts / name), options, providers=["CPUExecutionProvider"]
        )
        (maps,) = session.run(None, {"pixel_values": pixels.numpy()})
        assert np.isfinite(maps).all()
        assert np.abs(maps - expected).max() / np.abs(expected).max() < tolerance, name


def test_cpu_graphs_hold_one_chunk_of_attention_scores_at_a_time(exported, model):
    """onnxruntime runs a graph's attention as written (MatMul-Softmax-MatMul), so no Softmax
    may hold the FB attention's scores of every map at once, (B*M, H, T, T), nor an N x N
    SEM matrix: each FB attention call holds at most one CLIP block's scores (or one map's)."""
    from onnx_scores import softmax_shapes, square_scores

    cfg, batch = model.config, 2
    tokens = cfg.grid_size**2 + 1
    clip_heads = int(model.clip.visual.transformer.resblocks[0].attn.num_heads)
    bound = batch * max(clip_heads, cfg.fb_heads * model.fb_attention.maps_per_call)
    pixels = np.random.default_rng(0).standard_normal((batch, 3, SIZE, SIZE), dtype=np.float32)
    for name in ("vision.onnx", "vision.fp16.onnx"):
        shapes = softmax_shapes(exported[0].artifacts / name, pixels)
        scores = square_scores(shapes, tokens)
        assert scores and max(scores) <= bound < batch * cfg.num_maps * cfg.fb_heads, name
        assert square_scores(shapes, tokens - 1) == [], name


def test_parity_report_is_written_and_passes(exported):
    result, _ = exported
    report = result.parity
    assert report.passed and report.synthetic and report.images == 6
    assert [row.target for row in report.rows] == ["vision.onnx", "vision.fp16.onnx"]
    fp32, fp16 = report.rows
    assert fp32.score_max_abs < 1e-4 and fp32.map_max_abs < 1e-4
    assert fp16.tolerance.score == 5e-3 and fp16.tolerance.map == 1e-2
    assert fp32.auroc == pytest.approx(fp32.reference_auroc)
    stored = json.loads((result.artifacts / "parity.json").read_text())
    assert stored["passed"] is True and len(stored["rows"]) == 2
    console = Console(width=200, record=True)
    console.print(parity_table(report))
    text = console.export_text()
    assert "vision.fp16.onnx" in text and "pass" in text and "FAIL" not in text


def test_progress_is_reported_step_by_step(exported):
    _, steps = exported
    totals = {total for _, _, total in steps}
    assert len(totals) == 1 and steps[-1] == ("done", totals.pop(), steps[-1][2])
    assert [done for _, done, _ in steps] == sorted(done for _, done, _ in steps)
    assert any("parity" in text for text, _, _ in steps)


def test_full_graph_scoring_mode(tmp_path, exported, model):
    """scoring='graph' runs full.onnx (text features and map weights inside the graph)."""
    from fbclip_edge.runtime import open as open_backend

    folder = tmp_path / "artifacts"
    shutil.copytree(exported[0].artifacts, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["scoring"] = "graph"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    backend = open_backend(folder, backend="onnxruntime", provider="cpu")
    assert backend.info.details["graph"] == "full.onnx" and backend.scorer is None
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    score, patch = backend.run(pixels)
    with torch.no_grad():
        expected = model(pixels)
    torch.testing.assert_close(score, expected.image_score, atol=1e-4, rtol=0)
    torch.testing.assert_close(patch, expected.patch_map, atol=1e-4, rtol=0)


def test_parity_failure_fails_the_export_and_writes_nothing(tmp_path, model):
    from fbclip_edge.export import ParityError, Tolerance

    save_model(model, tmp_path / "model")
    frames = [np.full((40, 40, 3), 120, np.uint8), np.full((40, 40, 3), 30, np.uint8)]
    with pytest.raises(ParityError, match="parity check failed") as caught:
        export_artifacts(
            tmp_path / "model",
            tmp_path / "out",
            precision="fp32",
            targets="onnx",
            parity_frames=frames,
            parity_labels=[0, 1],
            tolerances={Precision.FP32: Tolerance(score=-1.0, map=-1.0)},
        )
    assert not (tmp_path / "out").exists()
    assert not caught.value.report.passed and caught.value.report.images == 2


def test_trt_target_without_tensorrt_is_one_clear_line(tmp_path, model):
    if tensorrt_usable():
        pytest.skip("TensorRT is installed and usable here")
    save_model(model, tmp_path / "model")
    with pytest.raises(
        FBClipError,
        match=r"install fbclip-edge\[trt\] on a machine with an "
        "NVIDIA GPU",
    ):
        export_artifacts(tmp_path / "model", tmp_path / "out", targets="onnx,trt")
    assert not (tmp_path / "out").exists()


def test_external_data_for_large_graphs(tmp_path, monkeypatch):
    """Over protobuf's 2 GiB the graph is saved with one <file>.data beside it."""
    from fbclip_edge.export import onnx_graph

    weight = onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    node = onnx.helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
        [weight],
    )
    monkeypatch.setattr(onnx_graph, "_INLINE_LIMIT", 1000)
    files = save_graph(onnx.helper.make_model(graph), tmp_path / "g.onnx")
    assert files == ["g.onnx.data"] and (tmp_path / "g.onnx.data").stat().st_size >= 64 * 64 * 4
    check_graph(tmp_path / "g.onnx")
    session = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": np.ones((1, 64), np.float32)})
    assert out[0, 0] == 64


def test_option_parsing_errors_name_the_fix():
    assert parse_precision("FP16") == Precision.FP16
    assert parse_targets("onnx, trt,onnx") == (Target.ONNX, Target.TRT)
    assert BatchProfile.parse("1:8:32") == BatchProfile(1, 8, 32)
    assert BatchProfile.parse("4") == BatchProfile(4, 4, 4)
    for call, match in [
        (lambda: parse_precision("int4"), "fp32|fp16|bf16|int8"),
        (lambda: parse_scoring("fused"), "kernel|graph"),
        (lambda: parse_targets("onnx,tflite"), "onnx|trt"),
        (lambda: parse_targets(""), "empty"),
        (lambda: BatchProfile.parse("8:1:32"), "min <= opt <= max"),
        (lambda: BatchProfile.parse("1:x:3"), "MIN:OPT:MAX"),
        (lambda: BatchProfile.parse("1:2"), "MIN:OPT:MAX"),
    ]:
        with pytest.raises(FBClipError, match=match):
            call()


def test_manifest_records_how_it_was_made(exported):
    manifest = read_manifest(exported[0].artifacts)
    assert manifest.opset == 17 and manifest.precision == Precision.FP16
    assert manifest.image_size == SIZE and manifest.grid_size == SIZE // 14
    assert manifest.num_maps == 15 and manifest.embed_dim == 768
    assert {"torch", "onnx", "onnxruntime", "fbclip_edge"} <= set(manifest.versions)
    assert manifest.engines == [] and manifest.timing_cache is None
    assert len(manifest.model.weights_sha256) == 64


def test_parity_images_from_a_folder(tmp_path):
    from PIL import Image

    from fbclip_edge.export import read_parity_images

    for sub, value in (("good", 100), ("scratch", 20)):
        (tmp_path / "labelled" / sub).mkdir(parents=True)
        Image.new("RGB", (20, 20), (value,) * 3).save(tmp_path / "labelled" / sub / "a.png")
    frames, labels = read_parity_images(tmp_path / "labelled")
    assert labels == [0, 1] and frames[0].shape == (20, 20, 3)
    frames, labels = read_parity_images(tmp_path / "labelled" / "good")
    assert labels is None and len(frames) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(FBClipError, match="no images"):
        read_parity_images(tmp_path / "empty")
    with pytest.raises(FBClipError, match="does not exist"):
        read_parity_images(tmp_path / "missing")


def test_vision_and_full_graphs_both_over_the_inline_limit(tmp_path, monkeypatch):
    """A model whose vision graph is saved with external data still gets a full graph with
    its own data file (the merge must not see the vision proto after its weights moved out)."""
    from fbclip_edge.export import onnx_graph

    monkeypatch.setattr(onnx_graph, "_INLINE_LIMIT", 1000)
    model = create_model("tiny", image_size=56, seed=0).eval()
    vision, full = onnx_graph.export_graphs(model, tmp_path)
    assert vision.data_files == ["vision.onnx.data"] and full.data_files == ["full.onnx.data"]
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(str(tmp_path / full.file), providers=["CPUExecutionProvider"])
    score, patch = session.run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        want = model(pixels)
    assert np.abs(score - want.image_score.numpy()).max() < 1e-5
    assert np.abs(patch - want.patch_map.numpy()).max() < 1e-5

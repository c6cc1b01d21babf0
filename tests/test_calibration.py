"""INT8 calibration in a loop of our own (export/quantize.calibrate_minmax): the same ranges as
onnxruntime's MinMax calibrator to the bit, inline or with external data, the same int8 graph
out of quantize_static, a state that does not grow with the number of frames, and a peak
memory of one frame's live activations where onnxruntime's calibrator holds them all."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fbclip_edge import create_model
from fbclip_edge.export.onnx_graph import INPUT_NAME, export_graphs
from fbclip_edge.export.parity import synthetic_frames
from fbclip_edge.export.quantize import (
    QUANTIZED_OPS,
    RunningRanges,
    calibrate_minmax,
    static_options,
    weight_nodes,
)
from fbclip_edge.preprocess import preprocess

quantization = pytest.importorskip("onnxruntime.quantization")

TINY = 56


def good_pixels(count: int) -> torch.Tensor:
    frames, _ = synthetic_frames(count, TINY)
    return preprocess(frames, TINY)


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    """AnomalyCLIP's tiny vision graph at 56 px, its nodes named as quantize_int8 names them."""
    folder = tmp_path_factory.mktemp("calibration")
    model = create_model("tiny", method="anomalyclip", image_size=TINY)
    spec = export_graphs(model, folder)[0]
    graph = onnx.load(str(folder / spec.file))
    weight_nodes(graph)
    onnx.save_model(graph, str(folder / "named.onnx"))
    return folder / "named.onnx"


class Frames(quantization.CalibrationDataReader):
    """What quantize_int8 fed onnxruntime's calibrator before: one frame per run."""

    def __init__(self, pixels: torch.Tensor) -> None:
        self.frames = iter(pixels.numpy())

    def get_next(self):
        frame = next(self.frames, None)
        return None if frame is None else {INPUT_NAME: frame[None]}


def onnxruntime_ranges(path, pixels, tmp_path, symmetric=False):
    calibrator = quantization.create_calibrator(
        path,
        list(QUANTIZED_OPS),
        augmented_model_path=str(tmp_path / "ort-augmented.onnx"),
        calibrate_method=quantization.CalibrationMethod.MinMax,
        extra_options={"symmetric": symmetric},
    )
    calibrator.collect_data(Frames(pixels))
    return calibrator.compute_data()


def assert_same_ranges(ours, theirs) -> None:
    assert ours.calibration_method == theirs.calibration_method
    assert sorted(ours.keys()) == sorted(theirs.keys())
    for name in theirs.keys():
        for got, want in zip(ours[name].range_value, theirs[name].range_value, strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert np.array_equal(got, want, equal_nan=True), name


@pytest.mark.parametrize("symmetric", [False, True])
def test_ranges_equal_onnxruntime_minmax(vision, tmp_path, symmetric):
    pixels = good_pixels(5)
    theirs = onnxruntime_ranges(vision, pixels, tmp_path, symmetric)
    ours = calibrate_minmax(vision, pixels, symmetric=symmetric)
    assert len(theirs.keys()) > 20  # the MatMul/Gemm inputs and outputs of the tiny tower
    assert_same_ranges(ours, theirs)
    if symmetric:
        assert all(np.array_equal(-low, high) for low, high in
                   (data.range_value for data in ours.values()))


def test_external_data_graph_calibrates_beside_its_data_and_leaves_nothing(vision, tmp_path):
    folder = tmp_path / "external"
    folder.mkdir()
    onnx.save_model(onnx.load(str(vision)), str(folder / "named.onnx"),
                    save_as_external_data=True, location="named.onnx.data", size_threshold=0)
    before = sorted(p.name for p in folder.iterdir())
    assert before == ["named.onnx", "named.onnx.data"]
    pixels = good_pixels(3)
    ours = calibrate_minmax(folder / "named.onnx", pixels)
    assert sorted(p.name for p in folder.iterdir()) == before  # augmented graph removed
    assert_same_ranges(ours, onnxruntime_ranges(vision, pixels, tmp_path))


def test_state_does_not_grow_with_frames_and_progress_counts_them(vision):
    """The calibrator keeps two 1-element arrays per tensor, however many frames it sees."""
    calls = []
    calibrate_minmax(vision, good_pixels(6), progress=lambda *call: calls.append(call))
    assert [call[1:] for call in calls] == [(i, 6) for i in range(1, 7)]
    assert calls[-1][0] == "int8 calibration: frame 6 of 6"

    rng = np.random.default_rng(0)
    ranges = RunningRanges()
    sizes = []
    for _ in range(8):
        frame = {f"t{i}": rng.standard_normal((1, 1, 1)).astype(np.float32) for i in range(4)}
        ranges.update(frame, {name: value + 1 for name, value in frame.items()})
        sizes.append(ranges.nbytes)
    assert ranges.frames == 8 and set(sizes) == {4 * 2 * 4}


def test_nan_frames_merge_as_onnxruntime_nanmin_does():
    ranges = RunningRanges()
    for value in (np.nan, 2.0, -1.0, np.nan):
        array = np.array([value], dtype=np.float32)
        ranges.update({"t": array}, {"t": array})
    data = ranges.tensors_data(quantization.CalibrationMethod.MinMax)
    assert data["t"].range_value == (np.float32(-1.0), np.float32(2.0))


def test_int8_graph_is_the_one_onnxruntime_calibration_made(vision, tmp_path):
    """The whole path: ranges through quantize_static's calibration cache give the same QDQ
    graph, scales and zero points as quantize_static calibrating itself."""
    pixels = good_pixels(4)
    nodes = weight_nodes(onnx.load(str(vision)))
    options = static_options(quantization, nodes, external=False)
    quantization.quantize_static(str(vision), str(tmp_path / "theirs.onnx"), Frames(pixels),
                                 **options)
    cache = tmp_path / "ranges.json"
    quantization.save_tensors_data(calibrate_minmax(vision, pixels), cache)
    quantization.quantize_static(str(vision), str(tmp_path / "ours.onnx"), None,
                                 calibration_cache_path=str(cache), **options)
    theirs, ours = (onnx.load(str(tmp_path / f)).graph for f in ("theirs.onnx", "ours.onnx"))
    assert [(n.op_type, list(n.input)) for n in ours.node] == \
        [(n.op_type, list(n.input)) for n in theirs.node]
    assert sum(n.op_type == "QuantizeLinear" for n in ours.node) >= len(nodes)
    expected = {init.name: numpy_helper.to_array(init) for init in theirs.initializer}
    got = {init.name: numpy_helper.to_array(init) for init in ours.initializer}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert np.array_equal(got[name], value), name


# ---------------------------------------------------------------- peak memory

LAYERS, TOKENS, WIDTH = 16, 8192, 256
ACTIVATION_BYTES = TOKENS * WIDTH * 4  # 8 MiB; the chain makes 2 per layer: 256 MiB in all

PEAK = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    import onnxruntime.quantization as quantization
    from fbclip_edge.export.quantize import calibrate_minmax

    path, which = Path(sys.argv[1]), sys.argv[2]
    frames = np.random.default_rng(0).standard_normal((2, {tokens}, {width}), np.float32)

    def status(key):
        with open("/proc/self/status") as stream:
            return next(int(l.split()[1]) for l in stream if l.startswith(key)) * 1024

    # the peak from here on: the imports above may have peaked higher than calibration does
    try:
        with open("/proc/self/clear_refs", "w") as stream:
            stream.write("5")
    except OSError:
        print(json.dumps({{"grown": None}}))
        sys.exit(0)
    before = status("VmRSS:")
    if which == "ours":
        calibrate_minmax(path, frames, ["MatMul"], input_name="x")
    else:
        class Reader(quantization.CalibrationDataReader):
            def __init__(self):
                self.frames = iter(frames)
            def get_next(self):
                frame = next(self.frames, None)
                return None if frame is None else {{"x": frame[None]}}
        calibrator = quantization.create_calibrator(
            path, ["MatMul"], augmented_model_path=str(path.parent / "ort-augmented.onnx"))
        calibrator.collect_data(Reader())
    print(json.dumps({{"grown": status("VmHWM:") - before}}))
""").format(tokens=TOKENS, width=WIDTH)


def residual_chain(path) -> None:
    """x -> (MatMul + x) x LAYERS: small weights, 8 MiB activations, each one read twice."""
    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i in range(LAYERS):
        weight = (rng.standard_normal((WIDTH, WIDTH)) / WIDTH).astype(np.float32)
        weights.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"matmul{i}"))
        nodes.append(helper.make_node("Add", [f"m{i}", x], [f"a{i}"], name=f"add{i}"))
        x = f"a{i}"
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, TOKENS, WIDTH])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [None, TOKENS, WIDTH])],
        weights,
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                    str(path))


def peak_growth(path, which: str) -> int:
    """Peak RSS growth of one calibration in a fresh process (VmHWM reset first)."""
    run = subprocess.run([sys.executable, "-c", PEAK, str(path), which],
                         capture_output=True, text=True, check=True)
    grown = json.loads(run.stdout.strip().splitlines()[-1])["grown"]
    if grown is None:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    return grown


def test_peak_memory_is_one_frames_live_activations(tmp_path):
    """All of a frame's activations: 256 MiB. Ours must stay far under (a few live at once);
    onnxruntime's calibrator, same graph and frames, holds most of them (which is what
    OOM-killed the ViT-L @ 518 export), so the measurement can tell the two apart."""
    residual_chain(tmp_path / "chain.onnx")
    every = 2 * LAYERS * ACTIVATION_BYTES
    ours = peak_growth(tmp_path / "chain.onnx", "ours")
    assert ours < every / 3, f"calibration grew {ours / 2**20:.0f} MiB"
    theirs = peak_growth(tmp_path / "chain.onnx", "onnxruntime")
    assert theirs > every / 2, f"onnxruntime's grew {theirs / 2**20:.0f} MiB"


def test_quantize_int8_with_external_data_matches_inline(tmp_path, monkeypatch):
    """A graph over protobuf's limit (the limit lowered here) is calibrated and quantized with
    its external data: the same int8 outputs as the inline graph, every frame reported, no
    scratch files left."""
    import onnxruntime as ort

    from fbclip_edge.export import onnx_graph
    from fbclip_edge.export.quantize import quantize_int8

    model = create_model("tiny", method="anomalyclip", image_size=TINY)
    pixels = good_pixels(4)
    outputs, calls = [], []
    for kind, limit in (("inline", onnx_graph._INLINE_LIMIT), ("external", 1000)):
        folder = tmp_path / kind
        folder.mkdir()
        spec = export_graphs(model, folder)[0]
        if kind == "external":  # as save_graph writes a graph over the limit
            data = f"{spec.file}.data"
            onnx.save_model(onnx.load(str(folder / spec.file)), str(folder / spec.file),
                            save_as_external_data=True, location=data)
            spec = dataclasses.replace(spec, data_files=[data])
        monkeypatch.setattr(onnx_graph, "_INLINE_LIMIT", limit)
        int8 = quantize_int8(spec, folder, pixels, progress=lambda *call: calls.append(call))
        assert bool(int8.data_files) == (kind == "external")
        assert not list(folder.glob(".calibrate-*"))
        session = ort.InferenceSession(str(folder / int8.file), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {INPUT_NAME: pixels[:2].numpy()})[0])
    assert np.array_equal(outputs[0], outputs[1])
    assert [call[1:] for call in calls] == [(i, 4) for i in range(1, 5)] * 2

"""The Triton Inference Server model repository that `export --targets triton` writes."""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from fbclip_edge import create_model, save_model
from fbclip_edge.artifacts.manifest import read_manifest, verify_files
from fbclip_edge.export import export_artifacts

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    save_model(create_model("tiny", image_size=56, seed=0), root / "model")
    export_artifacts(
        root / "model",
        root / "artifacts",
        batch="1:4:16",
        precision="fp32",
        targets="onnx,triton",
        scoring="graph",
    )
    return root / "artifacts"


def test_config_pbtxt_parses_with_tritons_model_config(served):
    text = (served / "triton" / "fbclip" / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.name == "fbclip" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    (pixels,) = config.input
    assert pixels.name == "pixel_values" and list(pixels.dims) == [3, 56, 56]
    assert pixels.data_type == model_config_pb2.TYPE_FP32
    outputs = {o.name: o for o in config.output}
    assert list(outputs["patch_map"].dims) == [1, 4, 4]
    assert (
        list(outputs["image_score"].dims) == [1]
        and list(outputs["image_score"].reshape.shape) == []
    )


def test_repository_files_are_listed_and_verified(served):
    manifest = read_manifest(served)
    names = [n for n in manifest.files if n.startswith("triton/")]
    assert sorted(names) == ["triton/fbclip/1/model.onnx", "triton/fbclip/config.pbtxt"]
    verify_files(manifest, served, names)
    served_graph = (served / "triton" / "fbclip" / "1" / "model.onnx").read_bytes()
    assert served_graph == (served / "full.onnx").read_bytes()

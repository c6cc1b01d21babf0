"""FiLo's split export (spec 13): the fixture's model folder (FiLo + Grounding DINO, S = 518)
exported once with --precision fp16 (which writes the fp32 graphs too), then opened with
onnxruntime and compared with the golden outputs, the torch stage modules and the manifest."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

import filo_fixture  # noqa: E402

from fbclip_edge.artifacts.manifest import (  # noqa: E402
    ArtifactError,
    export_command,
    read_manifest,
)
from fbclip_edge.artifacts.options import (  # noqa: E402
    DEFAULT_TOLERANCES,
    GraphRole,
    Precision,
    Tolerance,
)
from fbclip_edge.errors import FBClipError  # noqa: E402

GOLDEN_TOLERANCE = 1e-4
STAGE_TOLERANCE = 1e-5  # relative to the output's largest magnitude (float32 sum order)


@pytest.fixture(scope="module")
def fixture() -> tuple[Path, dict]:
    folder = filo_fixture.fixture_dir()
    return folder, filo_fixture.load_golden(folder)


@pytest.fixture(scope="module")
def model_folder(fixture, tmp_path_factory):
    """The fixture saved as a FiLo model folder and loaded back (what `export` reads)."""
    from fbclip_edge.methods.filo.folder import load_filo, save_filo

    folder, golden = fixture
    root = tmp_path_factory.mktemp("filo-model")
    descriptions = filo_fixture.write_descriptions(golden, root / "descriptions-source.json")
    model = filo_fixture.load_model(folder, golden)
    detector = filo_fixture.grounding_detector(folder, golden)
    save_filo(root / "model", model, descriptions, detector, folder / "bert")
    return load_filo(root / "model")


@pytest.fixture(scope="module")
def exported(model_folder, tmp_path_factory):
    """One fp16 export (fp32 graphs + mixed-precision vision/text), batch profile 1:1:2."""
    from fbclip_edge.export.filo import export_filo

    steps: list[tuple[str, int, int]] = []
    out = tmp_path_factory.mktemp("filo-artifacts") / "artifacts"
    result = export_filo(
        model_folder,
        out,
        precision="fp16",
        batch=(1, 1, 2),
        progress=lambda text, done, total: steps.append((text, done, total)),
        parity_count=2,
    )
    return result, steps


@pytest.fixture(scope="module")
def pipeline(exported):
    from fbclip_edge.runtime.filo_onnx import open_onnx_pipeline

    result, _ = exported
    return open_onnx_pipeline(result.artifacts, result.manifest, threads=2)


def _stages(pipeline):
    from fbclip_edge.runtime.filo_onnx import OnnxFiLoStages

    assert isinstance(pipeline.stages, OnnxFiLoStages)
    return pipeline.stages


def _close(got: torch.Tensor, want: torch.Tensor, relative: float = STAGE_TOLERANCE) -> float:
    """Max abs difference over the reference's largest magnitude (at least 1)."""
    scale = max(1.0, float(want.abs().max()))
    error = float((got.float() - want.float()).abs().max())
    assert error <= relative * scale, f"max abs {error:.2e} > {relative:.0e} x {scale:.2f}"
    return error


def test_layout_manifest_and_progress(exported, model_folder):
    result, steps = exported
    root = result.artifacts
    manifest = read_manifest(root)
    expected = {
        "filo_vision.onnx",
        "filo_text.onnx",
        "filo_score.onnx",
        "grounding.onnx",
        "filo_vision.fp16.onnx",
        "filo_text.fp16.onnx",
        "filo_host.safetensors",
        "descriptions.json",
        "bert/vocab.txt",
        "parity.json",
    }
    assert set(manifest.files) == expected
    assert (root / "manifest.json").is_file()
    assert manifest.method == "filo" and manifest.precision == Precision.FP16
    roles = {(g.role, g.precision) for g in manifest.graphs}
    assert roles == {
        (GraphRole.VISION, Precision.FP32),
        (GraphRole.TEXT, Precision.FP32),
        (GraphRole.SCORE, Precision.FP32),
        (GraphRole.GROUNDING, Precision.FP32),
        (GraphRole.VISION, Precision.FP16),
        (GraphRole.TEXT, Precision.FP16),
    }
    filo = manifest.extra["filo"]
    assert filo["grounding_hw"] == [518, 518] and filo["frame_size"] == [518, 518]
    assert filo["descriptions_sha256"] == model_folder.descriptions_sha256
    assert filo["categories"] == list(model_folder.table)
    assert filo["settings"]["image_size"] == 518 and filo["settings"]["n_ctx"] == 12
    source = model_folder.path / "descriptions.json"
    assert (root / "descriptions.json").read_bytes() == source.read_bytes()
    vision = manifest.graph(GraphRole.VISION)
    assert vision is not None and [t.shape for t in vision.outputs] == [
        ["batch", 48],
        ["batch", 7, 1369, 48],
    ]
    text = manifest.graph(GraphRole.TEXT)
    assert text is not None and text.inputs[0].shape == ["prompts", 77, 16]
    assert all((root / name).stat().st_mode & 0o777 == 0o644 for name in manifest.files)
    assert export_command(manifest, root) == (
        f"fbclip-edge export --model {model_folder.path.resolve()} --out {root} --batch 1:1:2 "
        "--precision fp16 --frame-size 518x518"
    )
    assert steps[-1][0] == "done" and [s[1] for s in steps] == list(range(len(steps)))
    assert all(total == steps[-1][2] for _, _, total in steps)


def test_parity_report_passes_both_precisions(exported):
    result, _ = exported
    report = result.parity
    assert report is not None and report.passed and report.images == 2 and report.synthetic
    fp32, fp16 = report.rows
    assert fp32.precision == "fp32" and fp32.tolerance == DEFAULT_TOLERANCES[Precision.FP32]
    assert fp16.precision == "fp16" and fp16.tolerance == DEFAULT_TOLERANCES[Precision.FP16]
    assert fp32.score_max_abs < 1e-4 and fp32.map_max_abs < 1e-4
    assert fp16.map_max_abs < DEFAULT_TOLERANCES[Precision.FP16].map
    assert "filo_vision.fp16.onnx" in fp16.details["graphs"]
    saved = json.loads((result.artifacts / "parity.json").read_text())
    assert saved["passed"] and [r["precision"] for r in saved["rows"]] == ["fp32", "fp16"]


@pytest.mark.parametrize("batch", [1, 2])
def test_onnx_pipeline_reproduces_golden(pipeline, fixture, batch):
    _, golden = fixture
    pixels, gd = golden["pixel_values"], golden["gd_pixel_values"]
    results = []
    for start in range(0, 2, batch):
        stop = start + batch
        gd_list = [gd[i : i + 1] for i in range(start, stop)]
        results += pipeline.run(pixels[start:stop], golden["categories"][start:stop], gd_list)
    for index, result in enumerate(results):
        assert result.position == golden["positions"][index][0]
        score = abs(result.image_score - float(golden["image_score"][index]))
        amap = float((result.anomaly_map - golden["anomaly_map"][index]).abs().max())
        assert score <= GOLDEN_TOLERANCE and amap <= GOLDEN_TOLERANCE


def test_graphs_match_their_stage_modules(pipeline, model_folder, fixture):
    from fbclip_edge.methods.filo.stages import ScoreStage, TextStage, VisionStage

    _, golden = fixture
    stages, model = _stages(pipeline), model_folder.model
    pixels = golden["pixel_values"][:1]
    with torch.no_grad():
        want_c, want_heads = VisionStage(model)(pixels)
    c, heads = stages.vision(pixels)
    _close(c, want_c)
    _close(heads, want_heads)
    text = golden["text_features"][:1].float()
    with torch.no_grad():
        want_score, want_map = ScoreStage(model)(want_heads, text, want_c)
    score, amap = stages.score(want_heads, text, want_c)
    _close(score, want_score)
    _close(amap, want_map)
    generator = torch.Generator().manual_seed(1)
    for count in (2, 9):  # the prompt axis is dynamic
        prompts = torch.randn(count, 77, 16, generator=generator)
        ends = torch.randint(0, 77, (count,), generator=generator)
        with torch.no_grad():
            want = TextStage(model)(prompts, ends)
        got = stages.text(prompts, ends)
        assert got.shape == (count, want.shape[1])
        _close(got, want)


def test_grounding_graph_gives_the_reference_boxes(pipeline, fixture):
    """Raw outputs may differ by a near-tie slot swap in the top-900 selection (see
    test_grounding_onnx); what FiLo derives from them must be the reference's."""
    _, golden = fixture
    for index, category in enumerate(golden["categories"]):
        text = pipeline.host.category(category)
        pixels = golden["gd_pixel_values"][index : index + 1]
        logits, boxes = _stages(pipeline).grounding(pixels, torch.tensor([text.caption_ids]))
        assert logits.shape == (900, len(text.caption_ids)) and boxes.shape == (900, 4)
        found = pipeline.host.locate(text, logits, boxes)
        assert found.labels == golden["gd_phrases"][index]
        assert found.positions == golden["positions"][index]
        assert (found.boxes_final - golden["gd_boxes_final"][index]).abs().max() < 1e-2


def test_host_matches_the_model(pipeline, model_folder):
    for prefix in ("normal_prompt_learner", "abnormal_prompt_learner"):
        want = getattr(model_folder.model, prefix).state_dict()
        got = getattr(pipeline.host, prefix.replace("_prompt", "")).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k].float(), got[k]) for k in want)
    for name in model_folder.table:
        text = pipeline.host.category(name)
        embedding = model_folder.model.clip.token_embedding
        ids = text.prompts.abnormal_ids
        assert torch.equal(text.abnormal, embedding(ids).float())


def test_stage_inputs_are_checked(pipeline):
    stages = _stages(pipeline)
    with pytest.raises(FBClipError, match="filo_vision.onnx takes pixel_values") as error:
        stages.vision(torch.zeros(1, 3, 224, 224))
    assert "\n" not in str(error.value)
    with pytest.raises(FBClipError, match="float"):
        stages.vision(torch.zeros(1, 3, 518, 518, dtype=torch.float64))
    with pytest.raises(FBClipError, match="end_index values"):
        stages.text(torch.zeros(2, 77, 16), torch.tensor([3, 77]))
    with pytest.raises(FBClipError, match="named axes"):
        stages.score(torch.zeros(2, 7, 1369, 48), torch.zeros(1, 2, 48), torch.zeros(2, 48))
    ids = torch.tensor([[101, 1012, 102]])
    with pytest.raises(FBClipError, match="--frame-size WxH"):
        stages.grounding(torch.zeros(1, 3, 518, 700), ids)


def _copy(exported, tmp_path: Path) -> Path:
    result, _ = exported
    target = tmp_path / "copy"
    shutil.copytree(result.artifacts, target)
    return target


def test_tampered_or_missing_file_is_one_line_error(exported, tmp_path):
    from fbclip_edge.runtime.filo_onnx import open_onnx_pipeline

    root = _copy(exported, tmp_path)
    manifest = read_manifest(root)
    with open(root / "filo_text.onnx", "ab") as stream:
        stream.write(b"\0")
    with pytest.raises(ArtifactError, match="filo_text.onnx does not match its sha256") as error:
        open_onnx_pipeline(root, manifest)
    assert "\n" not in str(error.value)
    (root / "bert" / "vocab.txt").unlink()
    with pytest.raises(ArtifactError, match="vocab.txt is missing"):
        open_onnx_pipeline(root, manifest, precision="fp16")  # text.fp16: untouched


def test_manifest_without_filo_entry_is_refused(exported, tmp_path):
    from fbclip_edge.runtime.filo_onnx import open_onnx_pipeline

    root = _copy(exported, tmp_path)
    data = json.loads((root / "manifest.json").read_text())
    del data["filo"]
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="no usable 'filo' entry"):
        open_onnx_pipeline(root, read_manifest(root))


def test_unknown_category_names_the_known_ones(pipeline, fixture):
    _, golden = fixture
    with pytest.raises(FBClipError, match="bottle"):
        pipeline.run(golden["pixel_values"][:1], ["carpet"], golden["gd_pixel_values"][:1])


def test_refuses_cpu_precisions_before_exporting(model_folder, tmp_path):
    from fbclip_edge.export.filo import export_filo

    for precision in ("int8", "bf16"):
        with pytest.raises(FBClipError, match="fp32 or fp16"):
            export_filo(model_folder, tmp_path / "out", precision=precision)
    assert not (tmp_path / "out").exists()


def test_grounding_input_follows_the_frame_size():
    from fbclip_edge.export.filo import grounding_input_hw

    assert grounding_input_hw(518, None) == (518, 518)
    assert grounding_input_hw(518, (1920, 1080)) == (518, 920)
    assert grounding_input_hw(518, (600, 2000)) == (1333, 400)


def test_cli_refuses_options_that_do_not_apply(model_folder, tmp_path):
    from typer.testing import CliRunner

    from fbclip_edge.cli import app

    base = ["export", "--model", str(model_folder.path), "--out", str(tmp_path / "out")]
    for extra, needle in (
        (["--targets", "trt"], "--targets trt"),
        (["--scoring", "graph"], "--scoring graph"),
        (["--precision", "int8"], "fp32 or fp16"),
        (["--frame-size", "wide"], "WIDTHxHEIGHT"),
    ):
        run = CliRunner().invoke(app, [*base, *extra])
        assert run.exit_code == 1, run.output
        assert needle in run.output and run.output.count("error:") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_parity_failure_writes_nothing(model_folder, tmp_path):
    """Without a detector (no grounding graph, no boxes) and an impossible tolerance."""
    from fbclip_edge.export.filo import export_filo
    from fbclip_edge.export.parity import ParityError

    folder = dataclasses.replace(model_folder, detector=None)
    impossible = {Precision.FP32: Tolerance(score=-1.0, map=-1.0)}
    with pytest.raises(ParityError, match="filo fp32 graphs") as error:
        export_filo(folder, tmp_path / "out", tolerances=impossible, parity_count=1)
    assert not (tmp_path / "out").exists()
    row = error.value.report.rows[0]
    assert row.score_max_abs < 1e-4 and row.map_max_abs < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_detector_open_with_category_gives_the_reference(exported, fixture, backend):
    """Issue acceptance: Detector.open(artifacts, backend=..., category=...) on the fixture's
    frames gives the reference's image scores and final maps within 1e-4."""
    import numpy as np

    from fbclip_edge.line.detector import Detector

    result, _ = exported
    _, golden = fixture
    detector = Detector.open(result.artifacts, backend=backend, category="bottle")
    assert detector.backend.info.name == backend
    for i, category in enumerate(golden["categories"]):
        frame = golden["images_uint8"][i].numpy()
        found = detector.predict(frame, category=category)[0]
        assert abs(found.image_score - float(golden["image_score"][i])) <= GOLDEN_TOLERANCE
        error = np.abs(found.anomaly_map - golden["anomaly_map"][i].numpy()).max()
        assert error <= GOLDEN_TOLERANCE, f"{backend} image {i}: map {error:.1e}"
        assert [found.position] == golden["positions"][i]
        assert found.category == category and found.boxes


def test_fbclip_entry_points_refuse_filo_artifacts(exported):
    from fbclip_edge.line.detector import Detector
    from fbclip_edge.runtime import open as open_backend
    from fbclip_edge.runtime import open_frames

    result, _ = exported
    with pytest.raises(FBClipError, match="FiLo artifacts, which take frames and a category"):
        open_backend(result.artifacts)
    with pytest.raises(FBClipError, match="FiLo artifacts run on torch or onnxruntime"):
        Detector.open(result.artifacts, backend="tensorrt", category="bottle")
    assert open_frames(result.artifacts, backend="onnxruntime").categories == ("bottle", "pcb1")
    half = open_frames(result.artifacts, backend="onnxruntime", precision="fp16")
    assert half.info.precision == "fp16"

"""FiLo's deployment pipeline (four networks + host steps) in torch, against the reference.

The pipeline is the code every FiLo runtime shares; here its stages are the model itself, so
it must give the fixture's image scores, position words and final maps: exactly at batch 1
(the reference's one image per call) and to float32 rounding at batch 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from filo_fixture import fixture_dir, grounding_detector, load_golden, load_model, table  # noqa: E402

from fbclip_edge.errors import FBClipError  # noqa: E402
from fbclip_edge.methods.filo.pipeline import STAGES, FiLoPipeline, TokenTable  # noqa: E402
from fbclip_edge.methods.filo.stages import torch_pipeline  # noqa: E402
from fbclip_edge.methods.filo.text import build_category_prompts  # noqa: E402

BATCH_TOL = 1e-6  # batch 2 against one image per call: float32 rounding of batched matmuls


@pytest.fixture(scope="module")
def folder() -> Path:
    return fixture_dir()


@pytest.fixture(scope="module")
def golden(folder: Path) -> dict[str, Any]:
    return load_golden(folder)


@pytest.fixture(scope="module")
def pipeline(folder: Path, golden: dict[str, Any]) -> FiLoPipeline:
    return torch_pipeline(
        load_model(folder, golden), table(golden), grounding_detector(folder, golden)
    )


def _gd(golden: dict[str, Any], i: int) -> torch.Tensor:
    return golden["gd_pixel_values"][i : i + 1]


@pytest.mark.parametrize("i", [0, 1])
def test_one_image_per_call_is_the_reference(pipeline, golden, i):
    result = pipeline.run(
        golden["pixel_values"][i : i + 1], golden["categories"][i : i + 1], [_gd(golden, i)]
    )[0]
    assert result.image_score == float(golden["image_score"][i])
    assert torch.equal(result.anomaly_map_before_boxes, golden["anomaly_map_before_boxes"][i])
    assert torch.equal(result.anomaly_map, golden["anomaly_map"][i])
    assert result.boxes is not None and result.boxes.labels == golden["gd_phrases"][i]
    assert [result.position] == golden["positions"][i]
    assert result.category == golden["categories"][i]


def test_batch_of_two_categories(pipeline, golden):
    gd = [_gd(golden, 0), _gd(golden, 1)]
    results = pipeline.run(golden["pixel_values"], golden["categories"], gd)
    for i, result in enumerate(results):
        assert abs(result.image_score - float(golden["image_score"][i])) <= BATCH_TOL
        assert (result.anomaly_map - golden["anomaly_map"][i]).abs().max() <= BATCH_TOL
        assert [result.position] == golden["positions"][i]


def test_stage_times_are_recorded_apart(pipeline, golden):
    pipeline.times.reset()
    pipeline.run(golden["pixel_values"][:1], golden["categories"][:1], [_gd(golden, 0)])
    assert set(pipeline.times.seconds) == set(STAGES)
    assert all(pipeline.times.seconds[stage] > 0 for stage in STAGES)


def test_token_table_equals_the_embedding(pipeline, golden):
    embedding = pipeline.host.tokens
    assert isinstance(embedding, torch.nn.Embedding)
    data = pipeline.host.table["pcb1"]
    prompts = build_category_prompts(data, 12, pipeline.host.settings.context_length)
    ids = torch.cat([prompts.normal_ids, prompts.abnormal_ids])
    sub = TokenTable.from_embedding(embedding, ids)
    assert sub.rows.shape[0] == torch.unique(ids).numel() < embedding.weight.shape[0]
    assert torch.equal(sub(ids), embedding(ids))
    unused = next(i for i in range(1, 1000) if i not in set(ids.flatten().tolist()))
    with pytest.raises(FBClipError, match="not in the exported token table"):
        sub(torch.tensor([[unused]]))


def test_errors_name_the_fix(pipeline, golden):
    with pytest.raises(FBClipError, match="not in the descriptions file .*known: bottle, pcb1"):
        pipeline.run(golden["pixel_values"][:1], ["screw"], [_gd(golden, 0)])
    with pytest.raises(FBClipError, match="1 images but 2 categories"):
        pipeline.run(golden["pixel_values"][:1], ["bottle", "pcb1"], [_gd(golden, 0)])
    with pytest.raises(FBClipError, match="one Grounding DINO input per image"):
        pipeline.run(golden["pixel_values"][:1], ["bottle"], None)

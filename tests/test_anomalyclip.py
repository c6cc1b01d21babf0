"""AnomalyCLIP against the authors' reference outputs (fixtures/anomalyclip-reference-tiny).

Everything goes through the public API: import-official into a model folder, load it, run it.
Both layer modes are checked: the argparse default 6 12 18 24 and the published 24 alone.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import fbclip_edge
from fbclip_edge import FBClipError
from fbclip_edge.clip import BackboneConfig, backbone_config, build_clip
from fbclip_edge.demo import FIXTURE_ENV
from fbclip_edge.methods import get_method, identify_checkpoint
from fbclip_edge.methods.anomalyclip import AnomalyCLIP, AnomalyCLIPConfig
from fbclip_edge.methods.anomalyclip.flops import forward_flops
from fbclip_edge.methods.anomalyclip.importer import export_official, looks_like
from fbclip_edge.methods.anomalyclip.text import encode_prompts, insert_compound
from fbclip_edge.statedict import read_checkpoint_file

NAME = "anomalyclip-reference-tiny"
FILES = ("clip_openai_state_dict.pt", "anomalyclip_checkpoint.pth", "golden.pt")
ENV = "ANOMALYCLIP_FIXTURE"
TOL = 1e-5  # the fixture README: float32 CPU agreement within about 1e-5
LOSS_TOL = 1e-6


def find_anomalyclip_fixture() -> Path | None:
    """$ANOMALYCLIP_FIXTURE, the sibling of $FBCLIP_FIXTURE, or ../shared/fixtures/<NAME>."""
    candidates = [os.environ.get(ENV)]
    if os.environ.get(FIXTURE_ENV):
        candidates.append(str(Path(os.environ[FIXTURE_ENV]).parent / NAME))
    root = Path(fbclip_edge.__file__).resolve().parents[1]
    candidates += [
        str(root.parent / "shared" / "fixtures" / NAME),
        str(root / "shared" / "fixtures" / NAME),
    ]
    for candidate in candidates:
        if candidate and all((Path(candidate) / name).is_file() for name in FILES):
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def ac_dir() -> Path:
    found = find_anomalyclip_fixture()
    if found is None:
        message = f"AnomalyCLIP reference fixture not found: set {ENV} to {NAME}/"
        if os.environ.get("FBCLIP_REQUIRE_FIXTURE") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def ac_golden(ac_dir: Path) -> dict:
    return torch.load(ac_dir / "golden.pt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def ac_clip(ac_dir: Path) -> Path:
    return ac_dir / FILES[0]


@pytest.fixture(scope="module")
def ac_checkpoint(ac_dir: Path) -> Path:
    return ac_dir / FILES[1]


def _import_and_load(clip: Path, checkpoint: Path, out: Path, layers: tuple[int, ...] | None):
    fbclip_edge.import_official(clip, checkpoint, out, method="anomalyclip", feature_layers=layers)
    return fbclip_edge.load(out)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, ac_clip, ac_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("anomalyclip") / "model"
    fbclip_edge.import_official(ac_clip, ac_checkpoint, out, method="anomalyclip")
    return out


@pytest.fixture(scope="module")
def model(folder):
    return fbclip_edge.load(folder)


@pytest.fixture(scope="module")
def model24(tmp_path_factory, ac_clip, ac_checkpoint):
    out = tmp_path_factory.mktemp("anomalyclip24") / "model"
    return _import_and_load(ac_clip, ac_checkpoint, out, (24,))


@pytest.fixture(scope="module")
def stages(model, ac_golden):
    with torch.no_grad():
        return model.forward_intermediates(ac_golden["pixel_values"])


@pytest.fixture(scope="module")
def output(model, ac_golden):
    with torch.no_grad():
        return model(ac_golden["pixel_values"])


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"{tuple(a.shape)} != {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


def _layer_map(similarity: torch.Tensor) -> torch.Tensor:
    """(B, T, 2) -> (B, 1, g, g): (p_abnormal + 1 - p_normal) / 2 of the patch rows."""
    patches = similarity[:, 1:]
    side = round(patches.shape[1] ** 0.5)
    return ((patches[..., 1] + 1 - patches[..., 0]) / 2).reshape(-1, 1, side, side)


# ----- the imported folder -----
def test_folder_is_anomalyclip_with_the_reference_settings(folder, model):
    meta = json.loads((folder / "config.json").read_text())
    assert meta["method"] == "anomalyclip"
    assert isinstance(model, AnomalyCLIP) and not model.training
    cfg = model.config
    assert cfg.feature_layers == (6, 12, 18, 24) and cfg.feature_map_start == 0
    assert (cfg.n_ctx, cfg.depth, cfg.t_n_ctx, cfg.dpam_layer) == (12, 9, 4, 20)
    assert cfg.vv_start == 6 and cfg.num_maps == 4 and cfg.grid_size == 37


# ----- every stage of the reference, default layers 6 12 18 24 -----
@pytest.mark.parametrize("name", ["text_tokens", "text_embeddings", "text_features"])
def test_text_stages_match_reference(stages, ac_golden, name):
    assert _diff(getattr(stages, name), ac_golden[name]) < TOL


@pytest.mark.parametrize(
    "name",
    [
        "tokens_branch",
        "tokens_vv",
        "tokens_plain",
        "patch_features",
        "global_feature",
        "image_logits",
        "image_score",
        "similarity",
        "patch_map",
    ],
)
def test_vision_stages_match_reference(stages, ac_golden, name):
    assert _diff(getattr(stages, name), ac_golden[name]) < TOL


def test_frozen_text_features_match_reference(model, ac_golden):
    assert _diff(model.text_features, ac_golden["text_features"]) < TOL


def test_forward_and_anomaly_map_match_reference(output, ac_golden):
    assert _diff(output.image_score, ac_golden["image_score"]) < TOL
    assert _diff(output.patch_map, ac_golden["patch_map"]) < TOL
    pre = fbclip_edge.anomaly_map(output.patch_map, size=(518, 518), sigma=0)
    assert _diff(pre, ac_golden["anomaly_map_pre_gaussian"]) < TOL
    full = fbclip_edge.anomaly_map(output.patch_map, size=(518, 518), sigma=4)
    assert _diff(full, ac_golden["anomaly_map"]) < TOL


def test_maps_hold_the_global_feature_in_every_cls_row(stages):
    maps = stages.maps
    assert maps.shape == (2, 4, 1370, 32)
    for layer in range(maps.shape[1]):
        assert torch.equal(maps[:, layer, 0], stages.global_feature)


def test_feature_map_start_sums_the_later_layers_only(folder, ac_golden):
    model = fbclip_edge.load(folder)
    model.config = dataclasses.replace(model.config, feature_map_start=2)
    with torch.no_grad():
        output = model(ac_golden["pixel_values"])
    similarity = ac_golden["similarity"]
    expected = _layer_map(similarity[:, 2]) + _layer_map(similarity[:, 3])
    assert _diff(output.patch_map, expected) < TOL
    assert _diff(output.image_score, ac_golden["image_score"]) < TOL


# ----- the published mode: layer 24 alone -----
def test_layer_24_mode_matches_reference(model24, ac_golden):
    assert model24.config.feature_layers == (24,) and model24.config.num_maps == 1
    with torch.no_grad():
        output = model24(ac_golden["pixel_values"])
    expected = _layer_map(ac_golden["similarity"][:, 3])
    assert _diff(output.image_score, ac_golden["image_score"]) < TOL
    assert _diff(output.patch_map, expected) < TOL
    upsampled = F.interpolate(expected, size=(518, 518), mode="bilinear", align_corners=False)
    pre = fbclip_edge.anomaly_map(output.patch_map, size=(518, 518), sigma=0)
    assert _diff(pre, upsampled[:, 0]) < TOL
    full = fbclip_edge.anomaly_map(output.patch_map, size=(518, 518), sigma=4)
    assert _diff(full, fbclip_edge.anomaly_map(expected, size=(518, 518), sigma=4)) < TOL
    assert float(full.max()) <= 1.0  # one map: the sum of probabilities stays in [0, 1]


def test_layer_24_mode_tokens_match_reference(model24, ac_golden):
    with torch.no_grad():
        stages = model24.forward_intermediates(ac_golden["pixel_values"])
    assert _diff(stages.tokens_vv[:, 0], ac_golden["tokens_vv"][:, 3]) < TOL
    assert _diff(stages.tokens_plain[:, 0], ac_golden["tokens_plain"][:, 3]) < TOL


# ----- training loss -----
def _loss(model, golden):
    with torch.no_grad():
        return model.training_loss(golden["pixel_values"], golden["masks"], golden["labels"])


def test_loss_terms_match_reference_all_layers(model, ac_golden):
    terms = _loss(model, ac_golden)
    assert _diff(terms.focal, ac_golden["loss_focal"]) < LOSS_TOL
    assert _diff(terms.dice_abnormal, ac_golden["loss_dice_abnormal"]) < LOSS_TOL
    assert _diff(terms.dice_normal, ac_golden["loss_dice_normal"]) < LOSS_TOL
    assert _diff(terms.image_ce, ac_golden["loss_image_ce"]) < LOSS_TOL
    # The total is ~32: float32 steps there are 3.8e-6, so it is compared relatively.
    torch.testing.assert_close(terms.total, ac_golden["loss_total"], rtol=LOSS_TOL, atol=0)
    assert set(terms.as_floats()) >= {"focal", "dice_abnormal", "dice_normal", "total"}


def test_loss_terms_match_reference_layer_24(model24, ac_golden):
    terms = _loss(model24, ac_golden)
    g = ac_golden
    assert _diff(terms.focal, g["loss_focal"][3:]) < LOSS_TOL
    assert _diff(terms.dice_abnormal, g["loss_dice_abnormal"][3:]) < LOSS_TOL
    assert _diff(terms.dice_normal, g["loss_dice_normal"][3:]) < LOSS_TOL
    assert _diff(terms.image_ce, g["loss_image_ce"]) < LOSS_TOL
    expected = (
        4 * (g["loss_focal"][3] + g["loss_dice_abnormal"][3] + g["loss_dice_normal"][3])
        + g["loss_image_ce"]
    )
    torch.testing.assert_close(terms.total, expected, rtol=LOSS_TOL, atol=LOSS_TOL)


def test_loss_trains_the_prompts_only():
    model = fbclip_edge.create_model("tiny", image_size=56, method="anomalyclip").train()
    pixels = torch.randn(2, 3, 56, 56)
    masks = (torch.rand(2, 56, 56) > 0.7).float()
    model.training_loss(pixels, masks, torch.tensor([0.0, 1.0])).total.backward()
    learner = model.prompt_learner
    assert learner.ctx_pos.grad is not None and learner.ctx_pos.grad.abs().sum() > 0
    assert learner.ctx_neg.grad is not None and learner.ctx_neg.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.compound())
    assert all(p.grad is None for p in learner.compound_prompt_projections.parameters())
    assert all(p.grad is None for p in model.clip.parameters())


# ----- the float16 rounding of the compound prompts -----
def test_compound_prompt_rounding_is_needed_for_the_reference(model, ac_golden):
    with torch.no_grad():
        rounded = encode_prompts(model.clip, model.prompt_learner).features
        plain = encode_prompts(model.clip, model.prompt_learner, rounding=None).features
    assert _diff(rounded, ac_golden["text_features"]) < 1e-6
    assert _diff(plain, ac_golden["text_features"]) > 1e-5


def test_compound_rounding_is_in_the_autograd_graph():
    """Each prompt row's gradient is rounded to float16, then the rows are summed."""
    torch.manual_seed(0)
    x = torch.randn(2, 10, 8)
    prompt = torch.randn(4, 8, requires_grad=True)
    out = insert_compound(x, prompt)
    assert torch.equal(out[:, 1:5], prompt.detach().half().float().expand(2, -1, -1))
    assert torch.equal(out[:, 5:], x[:, 5:]) and torch.equal(out[:, :1], x[:, :1])
    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected = upstream[0, 1:5].half().float() + upstream[1, 1:5].half().float()
    assert torch.equal(prompt.grad, expected)
    assert not torch.equal(prompt.grad, upstream[:, 1:5].sum(0))


# ----- checkpoints: detection, wrong files, round trips -----
def test_published_layout_is_recognised(ac_checkpoint):
    published = read_checkpoint_file(ac_checkpoint)
    assert looks_like(published) and identify_checkpoint(published) == "anomalyclip"
    fbclip_like = {"prompt_learner": published["prompt_learner"], "model_trainable_params": {}}
    assert not looks_like(fbclip_like)


def test_fbclip_checkpoint_given_to_anomalyclip_names_the_fbclip_command(
    tmp_path, clip_weights, official_checkpoint
):
    with pytest.raises(FBClipError) as error:
        fbclip_edge.import_official(
            clip_weights, official_checkpoint, tmp_path / "m", method="anomalyclip"
        )
    message = str(error.value)
    assert "\n" not in message and "--method fbclip" in message
    assert not (tmp_path / "m").exists()


def test_anomalyclip_checkpoint_given_to_fbclip_names_the_anomalyclip_command(
    tmp_path, ac_clip, ac_checkpoint
):
    with pytest.raises(FBClipError) as error:
        fbclip_edge.import_official(ac_clip, ac_checkpoint, tmp_path / "m", method="fbclip")
    message = str(error.value)
    assert "\n" not in message and "--method anomalyclip" in message
    assert get_method("anomalyclip").import_hint in message


def _save_clip(path: Path, text_width: int) -> Path:
    """A small CLIP in OpenAI state-dict layout with the given text width."""
    config = BackboneConfig(
        name="small",
        embed_dim=32,
        vision={"image_size": 28, "layers": 2, "width": 64, "patch_size": 14, "head_width": 64},
        text={
            "context_length": 77,
            "vocab_size": 49408,
            "width": text_width,
            "heads": 1,
            "layers": 12,
        },
    )
    torch.manual_seed(0)
    torch.save(build_clip(config).state_dict(), path)
    return path


def test_clip_of_another_text_width_is_refused_in_one_line(tmp_path, ac_checkpoint):
    clip = _save_clip(tmp_path / "ViT-small.pt", text_width=32)
    with pytest.raises(FBClipError) as error:
        fbclip_edge.import_official(clip, ac_checkpoint, method="anomalyclip")
    message = str(error.value)
    assert "\n" not in message
    assert "text width 32" in message and "text width 64" in message
    assert "do not fit" in message and "ViT-L-14-336px.pt" in message


def test_clip_of_the_right_width_but_other_weights_is_refused(tmp_path, ac_checkpoint):
    clip = _save_clip(tmp_path / "other.pt", text_width=64)
    with pytest.raises(FBClipError) as error:
        fbclip_edge.import_official(clip, ac_checkpoint, method="anomalyclip")
    message = str(error.value)
    assert "\n" not in message and "do not fit" in message and "ViT-L-14-336px.pt" in message


def test_checkpoint_settings_that_contradict_the_shapes_are_refused(ac_clip, ac_checkpoint):
    with pytest.raises(FBClipError, match="n_ctx 12"):
        fbclip_edge.import_official(ac_clip, ac_checkpoint, method="anomalyclip", n_ctx=8)


def test_save_load_round_trip_keeps_every_tensor(tmp_path, model, ac_golden):
    fbclip_edge.save_model(model, tmp_path / "again")
    again = fbclip_edge.load(tmp_path / "again")
    assert again.config == model.config
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert "prompt_learner.compound_prompt_projections.0.weight" in theirs
    pixels = ac_golden["pixel_values"][:1, :, :56, :56]
    with torch.no_grad():
        assert torch.equal(model(pixels).patch_map, again(pixels).patch_map)


def test_published_checkpoint_round_trips(model, ac_checkpoint):
    published = read_checkpoint_file(ac_checkpoint)["prompt_learner"]
    exported = export_official(model)["prompt_learner"]
    assert exported.keys() == published.keys()
    for key, value in published.items():
        assert exported[key].dtype == value.dtype, key
        assert torch.equal(exported[key], value), key


# ----- config -----
def test_config_round_trip_and_unknown_keys(model):
    data = json.loads(json.dumps(model.config.to_dict()))
    assert AnomalyCLIPConfig.from_dict(data) == model.config
    with pytest.raises(FBClipError, match="unknown settings"):
        AnomalyCLIPConfig.from_dict({**data, "dpam_layers": 20})


def test_other_depths_get_scaled_defaults_and_clear_errors():
    vit_b = backbone_config("ViT-B-16")
    config = get_method("anomalyclip").new_config(vit_b, image_size=224)
    assert config.feature_layers == (3, 6, 9, 12)
    assert config.dpam_layer == 11 and config.vv_start == 3 and config.depth == 9
    for settings in ({"dpam_layer": 20}, {"depth": 13}, {"feature_map_start": 4}):
        with pytest.raises(FBClipError) as error:
            AnomalyCLIPConfig(backbone=vit_b, image_size=224, **settings)
        assert "\n" not in str(error.value) and "use" in str(error.value)
    vit_l = backbone_config("ViT-L-14-336")
    assert get_method("anomalyclip").new_config(vit_l) == AnomalyCLIPConfig(backbone=vit_l)


# ----- analytic FLOPs against torch's counter -----
class _RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[Any] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func)
        return func(*args, **(kwargs or {}))


def _sdpa_flops(query, key, value, *args, **kwargs) -> int:
    """From the q (..., L, E), k (..., S, E), v (..., S, Ev) shapes: q k^T and A v."""
    *lead, length, width = query
    batch_heads = 1
    for size in lead:
        batch_heads *= size
    keys = key[-2]
    return 2 * batch_heads * length * keys * width + 2 * batch_heads * length * keys * value[-1]


def _count_flops(run: Callable[[], object]) -> tuple[int, set[str]]:
    """torch's count, with every scaled-dot-product overload the run hits counted by formula
    (torch 2.14 does not count the CPU flash-attention op)."""
    with torch.no_grad(), _RecordOps() as recorder:
        run()
    attention = {op.overloadpacket for op in recorder.ops if "scaled_dot_product" in str(op)}
    with (
        torch.no_grad(),
        FlopCounterMode(
            display=False, custom_mapping=dict.fromkeys(attention, _sdpa_flops)
        ) as counter,
    ):
        run()
    return int(counter.get_total_flops()), {str(op) for op in attention}


def test_sdpa_formula_matches_torch_where_torch_counts_it():
    from torch.utils.flop_counter import sdpa_flop_count

    q, k, v = (2, 3, 10, 8), (2, 3, 12, 8), (2, 3, 12, 5)
    assert _sdpa_flops(q, k, v) == sdpa_flop_count(q, k, v)


@pytest.fixture(scope="module")
def tiny():
    """The built-in tiny backbone (24 vision blocks, random weights): for FLOPs and export."""
    return fbclip_edge.create_model("tiny", image_size=56, method="anomalyclip")


def _with_config(model, **changes):
    """A shallow copy of the model (same weights) running another config."""
    other = copy.copy(model)
    other.config = dataclasses.replace(model.config, **changes)
    return other


@pytest.mark.parametrize(
    ("size", "layers", "start"),
    [(56, (6, 12, 18, 24), 0), (112, (6, 12, 18, 24), 0), (56, (24,), 0), (84, (3, 12), 1)],
)
def test_analytic_flops_equal_torch_flop_counter(tiny, size, layers, start):
    model = _with_config(tiny, image_size=size, feature_layers=layers, feature_map_start=start)
    pixels = torch.randn(1, 3, size, size)
    counted, by_formula = _count_flops(lambda: model(pixels))
    assert by_formula, "the model runs attention through scaled_dot_product_attention"
    assert forward_flops(model.config).total == counted, f"attention by formula: {by_formula}"


def test_flop_check_bites_on_one_vv_block_more_or_less(tiny):
    model = _with_config(tiny, feature_layers=(6, 12, 18, 23))
    counted, _ = _count_flops(lambda: model(torch.randn(1, 3, 56, 56)))
    assert forward_flops(model.config).total == counted
    assert forward_flops(tiny.config).total != counted


def test_flops_split_for_vit_l_14_336_at_518():
    count = forward_flops(get_method("anomalyclip").new_config(backbone_config("ViT-L-14-336")))
    # 24 plain blocks of 1370 tokens at width 1024 (~1.0 TFLOP); heads: 19 V-V attentions
    # (scores, mixing, out_proj: ~10.6 GFLOPs each) and 4 maps' projections (~8.6 GFLOPs).
    assert 1.0e12 < count.backbone < 1.03e12
    assert 0.2e12 < count.heads < 0.22e12


# ----- export-friendly vision graph -----
def test_vision_graph_exports_to_onnx_with_a_dynamic_batch(tiny, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from fbclip_edge.export.onnx_graph import VisionGraph

    model = _with_config(tiny, image_size=28)
    path = tmp_path / "vision.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes
        torch.onnx.export(
            VisionGraph(model),
            (torch.randn(2, 3, 28, 28),),
            str(path),
            opset_version=17,
            input_names=["pixel_values"],
            output_names=["maps"],
            dynamic_axes={"pixel_values": {0: "batch"}, "maps": {0: "batch"}},
            dynamo=False,
        )
    pixels = torch.randn(3, 3, 28, 28)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"pixel_values": pixels.numpy()})[0]
    with torch.no_grad():
        expected = model.encode_maps(pixels)
    assert exported.shape == tuple(expected.shape)
    assert abs(exported - expected.numpy()).max() < 1e-4
    # onnxruntime runs attention as written: the dual-path blocks' plain and V-V attention
    # are two calls, each holding one block's (B, H, T, T) scores, not one stacked (2B, ...).
    from onnx_scores import softmax_shapes, square_scores

    heads = int(model.clip.visual.transformer.resblocks[0].attn.num_heads)
    scores = square_scores(softmax_shapes(path, pixels.numpy()), (28 // 14) ** 2 + 1)
    assert scores and max(scores) == 3 * heads

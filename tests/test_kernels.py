"""Fused kernels: torch reference vs scipy, Triton (interpreted on CPU) vs torch, dispatch.

TRITON_INTERPRET only works if set before anything imports triton, and conftest's imports
already pull triton in (via torch._dynamo), so the interpreted kernels run in one child Python
started with TRITON_INTERPRET=1; this process keeps compiled Triton for the gpu tests.
"""

import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import fbclip_edge.kernels as kernels
from fbclip_edge.errors import FBClipError
from fbclip_edge.kernels import (
    anomaly_map,
    anomaly_map_torch,
    backend_info,
    dispatch,
    score_maps,
    score_maps_torch,
    selected_impl,
)
from fbclip_edge.kernels.separable import (
    axis_operator,
    axis_operator_on,
    bilinear_matrix,
    gaussian_matrix,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
SCORE = "fbclip_edge.kernels.triton_score:score_maps_triton"
MAP = "fbclip_edge.kernels.triton_map:anomaly_map_triton"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
SCORE_SHAPES = [(2, 15, 50, 40), (3, 1, 37, 40), (1, 4, 17, 300)]  # (B, M, T, D)
MAP_CASES = [((33, 47), 4.0), ((5, 9), 4.0), ((20, 20), 0.0), ((64, 70), 1.5)]


@pytest.fixture(autouse=True)
def _fresh_auto_choice():
    """Each test sees the auto choice made anew (it is cached per device type)."""
    dispatch._auto_choice.cache_clear()
    yield
    dispatch._auto_choice.cache_clear()


def _score_inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, m, t, d = shape
    maps = (torch.randn(b, m, t, d, generator=gen) * 3).to(dtype)
    text = torch.randn(2, d, generator=gen).to(dtype)
    weights = torch.randn(m, generator=gen).softmax(0)
    return maps, text, weights


def _poisoned_score_out(b, t):
    return torch.full((b,), float("nan")), torch.full((b, t - 1), float("nan"))


# ---------------------------------------------------------------- torch reference


def test_score_reference_matches_definition():
    maps, text, weights = _score_inputs((2, 3, 5, 8), torch.float64)
    weights = weights.double()
    score, patch = score_maps_torch(maps, text, weights, temperature=0.1)
    unit = maps / maps.norm(dim=-1, keepdim=True)
    logits = torch.einsum("bmtd,kd,m->btk", unit, text, weights) / 0.1
    expected = torch.sigmoid(logits[..., 1] - logits[..., 0]).float()
    torch.testing.assert_close(score, expected[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(patch, expected[:, 1:], atol=1e-6, rtol=0)
    assert score.dtype == patch.dtype == torch.float32


def test_prob_sum_reference_matches_definition():
    """AnomalyCLIP's rule: softmax per map, weighted sum of abnormal probabilities; the image
    score is map 0's CLS row alone."""
    maps, text, weights = _score_inputs((2, 3, 5, 8), torch.float64)
    weights = weights.double()
    score, patch = score_maps_torch(maps, text, weights, temperature=0.1, rule="prob_sum")
    unit = maps / maps.norm(dim=-1, keepdim=True)
    logits = torch.einsum("bmtd,kd->bmtk", unit, text) / 0.1
    prob = torch.sigmoid(logits[..., 1] - logits[..., 0])
    expected_patch = torch.einsum("bmt,m->bt", prob[:, :, 1:], weights).float()
    torch.testing.assert_close(score, prob[:, 0, 0].float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(patch, expected_patch, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown scoring rule"):
        score_maps_torch(maps, text, weights, rule="mean")


def _scipy_map(grid, size, sigma):
    up = F.interpolate(grid[:, None].double(), size=size, mode="bilinear", align_corners=False)
    up = up[:, 0].numpy()
    if sigma <= 0:
        return up
    return np.stack(
        [ndimage.gaussian_filter(img, sigma, mode="reflect", truncate=4.0) for img in up]
    )


@pytest.mark.parametrize(("size", "sigma"), MAP_CASES + [((3, 2), 4.0), ((40, 1), 2.0)])
def test_map_reference_matches_scipy(size, sigma):
    grid = torch.rand(2, 7, 7, generator=torch.Generator().manual_seed(1))
    out = anomaly_map_torch(grid, size, sigma)
    assert out.shape == (2, *size) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _scipy_map(grid, size, sigma), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(2, 49), (2, 7, 7), (2, 1, 7, 7)])
def test_map_reference_accepts_layouts(shape):
    grid = torch.rand(2, 7, 7)
    out = anomaly_map_torch(grid.reshape(shape), (12, 12), 1.0)
    torch.testing.assert_close(out, anomaly_map_torch(grid, (12, 12), 1.0))


@pytest.mark.parametrize("shape", [(2, 48), (2, 2, 7, 7), (7,)])
def test_map_reference_rejects_bad_layouts(shape):
    with pytest.raises(ValueError, match="patch_prob"):
        anomaly_map_torch(torch.rand(shape), (8, 8))


# ---------------------------------------------------------------- separable operator


def test_bilinear_matrix_is_interpolate():
    grid = torch.rand(5, 6, dtype=torch.float64)
    want = F.interpolate(grid[None, None], size=(13, 4), mode="bilinear", align_corners=False)
    got = bilinear_matrix(5, 13) @ grid @ bilinear_matrix(6, 4).T
    torch.testing.assert_close(got, want[0, 0])


def test_gaussian_matrix_is_scipy_filter():
    signal = np.random.default_rng(0).random(11)
    want = ndimage.gaussian_filter1d(signal, 4.0, mode="reflect", truncate=4.0)
    got = gaussian_matrix(11, 4.0).numpy() @ signal
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert torch.equal(gaussian_matrix(4, 0.0), torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize(("size", "sigma"), MAP_CASES)
def test_axis_operators_reproduce_reference(size, sigma):
    grid = torch.rand(3, 6, 8, generator=torch.Generator().manual_seed(2))
    a_h, a_w = axis_operator(6, size[0], sigma), axis_operator(8, size[1], sigma)
    got = (a_h @ grid.double() @ a_w.T).float()
    torch.testing.assert_close(got, anomaly_map_torch(grid, size, sigma), atol=1e-6, rtol=0)


def test_axis_operator_is_cached_per_device():
    first = axis_operator_on(7, 30, 4.0, torch.device("cpu"))
    assert first.dtype == torch.float32
    assert axis_operator_on(7, 30, 4, torch.device("cpu")) is first


# ---------------------------------------------------------------- Triton vs torch (CPU)

_WORKER = r"""
import importlib, pickle, sys
replies = sys.stdout.buffer
sys.stdout = sys.stderr  # stray prints must not corrupt the reply stream
while True:
    try:
        target, args, kwargs = pickle.load(sys.stdin.buffer)
    except EOFError:
        break
    module, name = target.split(":")
    try:
        reply = ("ok", getattr(importlib.import_module(module), name)(*args, **kwargs), kwargs)
    except Exception as exc:
        reply = ("error", exc, kwargs)
    pickle.dump(reply, replies)
    replies.flush()
"""


class Interpreted:
    """Calls 'module:function' in a child Python where TRITON_INTERPRET=1 was set first."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "TRITON_INTERPRET": "1"},
            cwd=Path(__file__).resolve().parents[1],
        )

    def __call__(self, target, *args, **kwargs):
        """The function's result; out= tensors come back as the same objects when returned."""
        pickle.dump((target, args, kwargs), self.proc.stdin)
        self.proc.stdin.flush()
        status, value, sent = pickle.load(self.proc.stdout)
        if status == "error":
            raise value
        return value, sent

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def interp():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    worker = Interpreted()
    yield worker
    worker.close()


def test_child_runs_interpreted(interp):
    mode, _ = interp("fbclip_edge.kernels.dispatch:kernel_mode")
    assert mode == "interpreted"
    info, _ = interp("fbclip_edge.kernels:backend_info", "cuda")
    assert info.impl == "torch" and "TRITON_INTERPRET=1" in info.reason
    assert info.triton_mode == "interpreted"


@pytest.mark.parametrize("rule", ["logit_sum", "prob_sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SCORE_SHAPES)
def test_triton_score_matches_torch(interp, shape, dtype, rule):
    maps, text, weights = _score_inputs(shape, dtype)
    (score, patch), sent = interp(
        SCORE, maps, text, weights, 0.07, rule, out=_poisoned_score_out(shape[0], shape[2])
    )
    assert score is sent["out"][0] and patch is sent["out"][1]
    want_score, want_patch = score_maps_torch(maps, text, weights, 0.07, rule)
    assert torch.isfinite(score).all() and torch.isfinite(patch).all()
    torch.testing.assert_close(score, want_score, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(patch, want_patch, atol=TOL[dtype], rtol=0)


def test_triton_score_reads_strided_maps(interp):
    maps, text, weights = _score_inputs((2, 3, 10, 40), torch.float32)
    strided = maps.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)  # (M, B) storage order
    last_dim_strided = maps.transpose(2, 3).contiguous().transpose(2, 3)
    want = score_maps_torch(maps, text, weights)
    for view in (strided, last_dim_strided):
        got, _ = interp("fbclip_edge.kernels:score_maps", view, text, weights, impl="triton")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_triton_score_validates_inputs(interp):
    maps, text, weights = _score_inputs((1, 2, 5, 8), torch.float32)
    bad_cases = [
        (maps[0], text, weights, "maps"),
        (maps[:, :, :0], text, weights, "CLS"),
        (maps, text[:1], weights, "text"),
        (maps, text, weights[:1], "map_weights"),
        (maps, text.to("meta"), weights, "same device"),
    ]
    for bad_maps, bad_text, bad_weights, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            interp(SCORE, bad_maps, bad_text, bad_weights)
    with pytest.raises(ValueError, match="out tensor"):
        interp(SCORE, maps, text, weights, out=(torch.empty(1), torch.empty(1, 5)))
    (score, patch), _ = interp(SCORE, maps[:0], text, weights)
    assert score.shape == (0,) and patch.shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("size", "sigma"), MAP_CASES)
def test_triton_map_matches_torch(interp, size, sigma, dtype):
    grid = torch.rand(2, 49, generator=torch.Generator().manual_seed(3)).to(dtype)
    got, sent = interp(MAP, grid, size, sigma, out=torch.full((2, *size), float("nan")))
    assert got is sent["out"] and torch.isfinite(got).all()
    torch.testing.assert_close(got, anomaly_map_torch(grid, size, sigma), atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["flat", "grid", "channel", "rect", "transposed"])
def test_triton_map_input_layouts(interp, layout):
    base = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(4))
    grid = {
        "flat": base[:, :5, :5].reshape(2, 25),
        "grid": base,
        "channel": base[:, None],
        "rect": base[:, :3],
        "transposed": base.transpose(1, 2),
    }[layout]
    got, _ = interp("fbclip_edge.kernels:anomaly_map", grid, (19, 23), 2.0, impl="triton")
    torch.testing.assert_close(got, anomaly_map_torch(grid, (19, 23), 2.0), atol=1e-5, rtol=0)


def test_triton_map_validates_inputs(interp):
    grid = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="float"):
        interp(MAP, grid.to(torch.int32), (8, 8))
    with pytest.raises(ValueError, match="size"):
        interp(MAP, grid, (0, 8))
    with pytest.raises(ValueError, match="out must"):
        interp(MAP, grid, (8, 8), out=torch.empty(2, 8, 7))
    got, _ = interp(MAP, grid[:0], (8, 8))
    assert got.shape == (0, 8, 8)


# ---------------------------------------------------------------- dispatch


def test_auto_uses_torch_on_cpu():
    info = backend_info("cpu")
    assert info.impl == "torch" and "cpu" in info.reason
    assert selected_impl(torch.device("cpu")) == "torch"
    assert info.as_dict()["impl"] == "torch"
    maps, text, weights = _score_inputs((1, 2, 5, 8), torch.float32)
    want = score_maps_torch(maps, text, weights)
    torch.testing.assert_close(score_maps(maps, text, weights), want)
    grid = torch.rand(1, 4, 4)
    torch.testing.assert_close(anomaly_map(grid, (9, 9)), anomaly_map_torch(grid, (9, 9)))


def test_backend_info_for_cuda_explains_choice():
    info = backend_info("cuda")
    mode = dispatch.kernel_mode()
    assert info.triton_mode == mode
    if mode == "compiled":
        assert info.impl == "triton" and info.triton_version
    else:
        assert info.impl == "torch" and info.reason


def test_backend_info_default_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert backend_info().device == expected


def _fake_kernels(mode, map_mode=None):
    score = type("FakeScore", (), {"MODE": mode, "TRITON_VERSION": "9.9"})
    amap = type("FakeMap", (), {"MODE": map_mode or mode, "TRITON_VERSION": "9.9"})
    return lambda: (score, amap, "")


def test_missing_triton_falls_back_and_explains(monkeypatch):
    monkeypatch.setattr(dispatch, "_load_triton", lambda: (None, None, "triton is broken"))
    info = backend_info("cuda")
    assert info.impl == "torch" and info.reason == "triton is broken"
    assert info.triton_mode == "unavailable" and not dispatch.kernels_interpreted()
    maps, text, weights = _score_inputs((1, 2, 5, 8), torch.float32)
    with pytest.raises(FBClipError, match="triton is broken"):
        score_maps(maps, text, weights, impl="triton")


@pytest.mark.parametrize(
    ("modes", "impl", "reason"),
    [
        (("compiled",), "triton", "Triton 9.9"),
        (("interpreted",), "torch", "interpreter"),
        (("mixed",), "torch", "after triton was imported"),
        (("compiled", "interpreted"), "torch", "after triton was imported"),
    ],
)
def test_auto_choice_on_cuda_follows_kernel_mode(monkeypatch, modes, impl, reason):
    monkeypatch.setattr(dispatch, "_load_triton", _fake_kernels(*modes))
    info = backend_info(torch.device("cuda", 0))
    assert info.impl == impl and reason in info.reason and info.triton_version == "9.9"
    assert selected_impl("cuda") == impl


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(dispatch, "_load_triton", _fake_kernels("compiled"))
    with pytest.raises(FBClipError, match="set TRITON_INTERPRET=1 in the environment before"):
        score_maps(*_score_inputs((1, 2, 5, 8), torch.float32), impl="triton")
    with pytest.raises(FBClipError, match="TRITON_INTERPRET=1"):
        anomaly_map(torch.rand(1, 4, 4), (8, 8), impl="triton")


def test_mixed_mode_is_refused(monkeypatch):
    monkeypatch.setattr(dispatch, "_load_triton", _fake_kernels("mixed"))
    with pytest.raises(FBClipError, match="before anything imports triton"):
        dispatch.resolve_impl("triton", torch.device("cuda"), needs_grad=False)


def test_triton_accepts_cuda_and_interpreted_cpu(monkeypatch):
    monkeypatch.setattr(dispatch, "_load_triton", _fake_kernels("interpreted"))
    assert dispatch.resolve_impl("triton", torch.device("cpu"), needs_grad=False) == "triton"
    assert dispatch.resolve_impl("triton", torch.device("cuda"), needs_grad=False) == "triton"
    with pytest.raises(FBClipError, match="meta"):
        dispatch.resolve_impl("triton", torch.device("meta"), needs_grad=False)


@needs_triton
def test_kernel_mode_detects_late_interpret_flag():
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from fbclip_edge.kernels.triton_score import kernel_mode

    def body(x):
        return x

    library = type(tl.zeros).__name__ == "InterpretedFunction"
    assert kernel_mode(InterpretedFunction(body)) == ("interpreted" if library else "mixed")
    assert kernel_mode(JITFunction(body)) == ("mixed" if library else "compiled")


def test_impl_is_validated():
    with pytest.raises(ValueError, match="impl must be one of"):
        score_maps(*_score_inputs((1, 2, 5, 8), torch.float32), impl="cuda")
    assert dispatch.resolve_impl("torch", torch.device("cuda"), needs_grad=False) == "torch"


def test_triton_has_no_backward():
    maps, text, weights = _score_inputs((1, 2, 5, 8), torch.float32)
    with pytest.raises(FBClipError, match="no backward"):
        score_maps(maps.requires_grad_(), text, weights, impl="triton")


@pytest.mark.parametrize("grad_input", [0, 1, 2])
def test_auto_keeps_autograd_on_torch(monkeypatch, grad_input):
    monkeypatch.setattr(dispatch, "selected_impl", lambda device: "triton")
    inputs = list(_score_inputs((2, 3, 5, 8), torch.float32))
    inputs[grad_input].requires_grad_()
    score, patch = score_maps(*inputs)
    (score.sum() + patch.sum()).backward()
    assert inputs[grad_input].grad is not None and torch.isfinite(inputs[grad_input].grad).all()
    grid = torch.rand(1, 4, 4, requires_grad=True)
    anomaly_map(grid, (8, 8)).sum().backward()
    assert grid.grad is not None
    with torch.no_grad():
        assert not dispatch.needs_grad(*inputs)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
def test_auto_uses_torch_while_tracing(monkeypatch):
    monkeypatch.setattr(dispatch, "selected_impl", lambda device: "triton")
    maps, text, weights = _score_inputs((1, 2, 5, 8), torch.float32)
    traced = torch.jit.trace(lambda m: score_maps(m, text, weights)[1], (maps,), check_trace=False)
    torch.testing.assert_close(traced(maps), score_maps_torch(maps, text, weights)[1])


def test_auto_runs_triton_when_selected(monkeypatch):
    calls = []

    class FakeScore:
        @staticmethod
        def score_maps_triton(*args):
            calls.append("score")
            return score_maps_torch(*args)

    class FakeMap:
        @staticmethod
        def anomaly_map_triton(*args):
            calls.append("map")
            return anomaly_map_torch(*args)

    monkeypatch.setattr(dispatch, "selected_impl", lambda device: "triton")
    monkeypatch.setattr(kernels, "triton_modules", lambda: (FakeScore, FakeMap))
    score_maps(*_score_inputs((1, 2, 5, 8), torch.float32))
    anomaly_map(torch.rand(1, 4, 4), (9, 9))
    assert calls == ["score", "map"]


# ---------------------------------------------------------------- CUDA (compiled Triton)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _require_compiled():
    if dispatch.kernel_mode() != "compiled":
        pytest.skip(f"Triton kernels are {dispatch.kernel_mode()} in this process")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 15, 1370, 768), (3, 1, 50, 40), (1, 4, 17, 300)])
def test_cuda_score_matches_torch(shape, dtype):
    _require_compiled()
    from fbclip_edge.kernels.triton_score import score_maps_triton

    maps, text, weights = (x.cuda() for x in _score_inputs(shape, dtype))
    out = tuple(x.cuda() for x in _poisoned_score_out(shape[0], shape[2]))
    score, patch = score_maps_triton(maps, text, weights, 0.07, out=out)
    want_score, want_patch = score_maps_torch(maps, text, weights, 0.07)
    torch.testing.assert_close(score, want_score, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(patch, want_patch, atol=TOL[dtype], rtol=0)
    assert backend_info("cuda").impl == "triton"
    auto_score, _ = score_maps(maps, text, weights)
    torch.testing.assert_close(auto_score, want_score, atol=TOL[dtype], rtol=0)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    ("grid_side", "size", "sigma"),
    [(37, (518, 518), 4.0), (37, (9, 700), 4.0), (74, (1036, 1036), 4.0)],
)
def test_cuda_map_matches_torch(grid_side, size, sigma):
    _require_compiled()
    from fbclip_edge.kernels.triton_map import anomaly_map_triton

    grid = torch.rand(3, grid_side * grid_side, device="cuda")
    out = torch.full((3, *size), float("nan"), device="cuda")
    got = anomaly_map_triton(grid, size, sigma, out=out)
    torch.testing.assert_close(got, anomaly_map_torch(grid, size, sigma), atol=1e-5, rtol=0)

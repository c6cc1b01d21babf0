"""Fused kernels: torch reference vs scipy, Triton (interpreted on CPU) vs torch, dispatch."""

import os

import torch

# The interpreter must be on before the Triton kernels are defined; on a CUDA machine the
# compiled kernels are tested instead (gpu-marked tests below).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy import ndimage  # noqa: E402

from fbclip_edge.errors import FBClipError  # noqa: E402
from fbclip_edge.kernels import (  # noqa: E402
    anomaly_map,
    anomaly_map_torch,
    backend_info,
    dispatch,
    score_maps,
    score_maps_torch,
    selected_impl,
)
from fbclip_edge.kernels.separable import (  # noqa: E402
    axis_operator,
    axis_operator_on,
    bilinear_matrix,
    gaussian_matrix,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
CPU_TRITON = pytest.mark.skipif(
    not HAS_TRITON or torch.cuda.is_available(),
    reason="interpreted Triton-on-CPU tests run where there is no CUDA device",
)
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


@CPU_TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SCORE_SHAPES)
def test_triton_score_matches_torch(shape, dtype):
    from fbclip_edge.kernels.triton_score import score_maps_triton

    maps, text, weights = _score_inputs(shape, dtype)
    out = _poisoned_score_out(shape[0], shape[2])
    score, patch = score_maps_triton(maps, text, weights, 0.07, out=out)
    assert score is out[0] and patch is out[1]
    want_score, want_patch = score_maps_torch(maps, text, weights, 0.07)
    assert torch.isfinite(score).all() and torch.isfinite(patch).all()
    torch.testing.assert_close(score, want_score, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(patch, want_patch, atol=TOL[dtype], rtol=0)


@CPU_TRITON
def test_triton_score_reads_strided_maps():
    maps, text, weights = _score_inputs((2, 3, 10, 40), torch.float32)
    strided = maps.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)  # (M, B) storage order
    last_dim_strided = maps.transpose(2, 3).contiguous().transpose(2, 3)
    want = score_maps_torch(maps, text, weights)
    for view in (strided, last_dim_strided):
        got = score_maps(view, text, weights, impl="triton")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@CPU_TRITON
def test_triton_score_validates_inputs():
    from fbclip_edge.kernels.triton_score import score_maps_triton

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
            score_maps_triton(bad_maps, bad_text, bad_weights)
    with pytest.raises(ValueError, match="out tensor"):
        score_maps_triton(maps, text, weights, out=(torch.empty(1), torch.empty(1, 5)))
    score, patch = score_maps_triton(maps[:0], text, weights)
    assert score.shape == (0,) and patch.shape == (0, 4)


@CPU_TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("size", "sigma"), MAP_CASES)
def test_triton_map_matches_torch(size, sigma, dtype):
    from fbclip_edge.kernels.triton_map import anomaly_map_triton

    grid = torch.rand(2, 49, generator=torch.Generator().manual_seed(3)).to(dtype)
    out = torch.full((2, *size), float("nan"))
    got = anomaly_map_triton(grid, size, sigma, out=out)
    assert got is out and torch.isfinite(got).all()
    torch.testing.assert_close(got, anomaly_map_torch(grid, size, sigma), atol=1e-5, rtol=0)


@CPU_TRITON
@pytest.mark.parametrize("layout", ["flat", "grid", "channel", "rect", "transposed"])
def test_triton_map_input_layouts(layout):
    base = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(4))
    grid = {
        "flat": base[:, :5, :5].reshape(2, 25),
        "grid": base,
        "channel": base[:, None],
        "rect": base[:, :3],
        "transposed": base.transpose(1, 2),
    }[layout]
    got = anomaly_map(grid, (19, 23), 2.0, impl="triton")
    torch.testing.assert_close(got, anomaly_map_torch(grid, (19, 23), 2.0), atol=1e-5, rtol=0)


@CPU_TRITON
def test_triton_map_validates_inputs():
    from fbclip_edge.kernels.triton_map import anomaly_map_triton

    grid = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="float"):
        anomaly_map_triton(grid.to(torch.int32), (8, 8))
    with pytest.raises(ValueError, match="size"):
        anomaly_map_triton(grid, (0, 8))
    with pytest.raises(ValueError, match="out must"):
        anomaly_map_triton(grid, (8, 8), out=torch.empty(2, 8, 7))
    assert anomaly_map_triton(grid[:0], (8, 8)).shape == (0, 8, 8)


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
    if not HAS_TRITON:
        assert info.impl == "torch" and "not installed" in info.reason
    elif dispatch.kernels_interpreted():
        assert info.impl == "torch" and "TRITON_INTERPRET" in info.reason and info.interpret
    else:
        assert info.impl == "triton" and info.triton_version


def test_backend_info_default_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert backend_info().device == expected


def test_missing_triton_falls_back_and_explains(monkeypatch):
    monkeypatch.setattr(dispatch, "_load_triton", lambda: (None, None, "triton is broken"))
    info = backend_info("cuda")
    assert info.impl == "torch" and info.reason == "triton is broken"
    assert not dispatch.kernels_interpreted()
    maps, text, weights = _score_inputs((1, 2, 5, 8), torch.float32)
    with pytest.raises(FBClipError, match="triton is broken"):
        score_maps(maps, text, weights, impl="triton")


def test_compiled_triton_is_chosen_on_cuda(monkeypatch):
    class _Compiled:
        INTERPRETED = False
        TRITON_VERSION = "9.9"

    monkeypatch.setattr(dispatch, "_load_triton", lambda: (_Compiled, _Compiled, ""))
    info = backend_info("cuda")
    assert info.impl == "triton" and "9.9" in info.reason and not info.interpret


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(dispatch, "kernels_interpreted", lambda: False)
    monkeypatch.setattr(dispatch, "triton_modules", lambda: (None, None))
    with pytest.raises(FBClipError, match="TRITON_INTERPRET=1"):
        score_maps(*_score_inputs((1, 2, 5, 8), torch.float32), impl="triton")
    with pytest.raises(FBClipError, match="TRITON_INTERPRET=1"):
        anomaly_map(torch.rand(1, 4, 4), (8, 8), impl="triton")


def test_triton_rejects_other_devices(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_modules", lambda: (None, None))
    with pytest.raises(FBClipError, match="meta"):
        dispatch.resolve_impl("triton", torch.device("meta"), needs_grad=False)


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
    traced = torch.jit.trace(lambda m: score_maps(m, text, weights)[1], (maps,))
    torch.testing.assert_close(traced(maps), score_maps_torch(maps, text, weights)[1])


@CPU_TRITON
def test_auto_runs_triton_when_selected(monkeypatch):
    calls = []
    _, amap = dispatch.triton_modules()
    real = amap.anomaly_map_triton
    monkeypatch.setattr(dispatch, "selected_impl", lambda device: "triton")
    monkeypatch.setattr(amap, "anomaly_map_triton", lambda *a: calls.append(a) or real(*a))
    grid = torch.rand(1, 4, 4)
    torch.testing.assert_close(anomaly_map(grid, (9, 9)), anomaly_map_torch(grid, (9, 9)))
    assert len(calls) == 1


@CPU_TRITON
def test_kernels_report_interpreter():
    assert dispatch.kernels_interpreted()
    assert dispatch.interpret_requested()


@pytest.mark.parametrize(("value", "on"), [("1", True), ("TRUE", True), ("0", False), ("", False)])
def test_interpret_requested_reads_env_like_triton(monkeypatch, value, on):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert dispatch.interpret_requested() is on


# ---------------------------------------------------------------- CUDA (compiled Triton)

@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 15, 1370, 768), (3, 1, 50, 40)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_triton
def test_cuda_score_matches_torch(shape, dtype):
    from fbclip_edge.kernels.triton_score import score_maps_triton

    maps, text, weights = (x.cuda() for x in _score_inputs(shape, dtype))
    out = tuple(x.cuda() for x in _poisoned_score_out(shape[0], shape[2]))
    score, patch = score_maps_triton(maps, text, weights, 0.07, out=out)
    want_score, want_patch = score_maps_torch(maps, text, weights, 0.07)
    torch.testing.assert_close(score, want_score, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(patch, want_patch, atol=TOL[dtype], rtol=0)
    assert backend_info("cuda").impl == "triton"


@pytest.mark.parametrize(("size", "sigma"), [((518, 518), 4.0), ((9, 700), 4.0)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_triton
def test_cuda_map_matches_torch(size, sigma):
    from fbclip_edge.kernels.triton_map import anomaly_map_triton

    grid = torch.rand(3, 37 * 37, device="cuda")
    out = torch.full((3, *size), float("nan"), device="cuda")
    got = anomaly_map_triton(grid, size, sigma, out=out)
    torch.testing.assert_close(got, anomaly_map_torch(grid, size, sigma), atol=1e-5, rtol=0)

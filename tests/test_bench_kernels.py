"""Kernel microbenchmark: runs at reduced size on CPU, byte accounting, JSON/Markdown output."""

import json

import pytest
import torch

from fbclip_edge.bench import (
    FULL,
    REDUCED,
    BenchShape,
    KernelBenchReport,
    KernelCase,
    run_kernel_bench,
    write_kernel_bench,
)
from fbclip_edge.bench.kernels import (
    FUSION_WORTH,
    copy_bandwidth,
    map_bytes,
    markdown,
    projection_fusion_bound,
    score_bytes,
    time_ms,
)
from fbclip_edge.clip.backbone import backbone_config
from fbclip_edge.methods.fbclip.config import FBCLIPConfig
from fbclip_edge.methods.fbclip.flops import forward_flops

TINY = BenchShape("tiny", maps=2, tokens=17, dim=8, image=12)


@pytest.fixture(scope="module")
def tiny_report():
    return run_kernel_bench(device="cpu", batches=(1, 3), shape=TINY, iters=2)


def test_cpu_run_covers_every_case(tiny_report):
    cases = tiny_report.cases
    assert [(c.kernel, c.batch) for c in cases] == [
        ("score_maps", 1),
        ("anomaly_map", 1),
        ("score_maps", 3),
        ("anomaly_map", 3),
    ]
    assert tiny_report.device.startswith("CPU") and tiny_report.device_type == "cpu"
    assert tiny_report.backend["impl"] == "torch" and tiny_report.dtype == "float32"
    assert tiny_report.copy_gbps > 0 and not tiny_report.flush_l2
    for case in cases:
        assert case.impl == "torch" and case.fused_ms > 0 and case.torch_ms > 0
        assert case.gbps == pytest.approx(case.bytes_moved / case.fused_ms / 1e6)
        assert case.copy_share == pytest.approx(case.gbps / tiny_report.copy_gbps)
        assert case.speedup == pytest.approx(case.torch_ms / case.fused_ms)
    assert cases[2].bytes_moved == score_bytes(3, TINY, 4)
    assert cases[3].bytes_moved == map_bytes(3, TINY)
    assert tiny_report.target_met() is None


def test_byte_accounting_for_the_issue_shape():
    maps = 8 * 15 * 1370 * 768 * 2
    assert score_bytes(8, FULL, 2) == maps + 2 * 768 * 2 + 15 * 4 + 8 * 1370 * 4
    assert map_bytes(8, FULL) == 8 * (37 * 37 + 518 * 518) * 4
    assert FULL.grid == 37 and REDUCED.grid == 8


def test_projection_fusion_bound_arithmetic():
    # the issue's deployment: 15 maps of 1370 tokens x 768 dims in fp16, written and re-read
    bound = projection_fusion_bound(copy_gbps=3000.0, matmul_tflops=800.0, itemsize=2)
    assert bound.bytes_saved == 2 * 15 * 1370 * 768 * 2
    assert bound.saved_us == pytest.approx(bound.bytes_saved / 3000e9 * 1e6)
    flops = forward_flops(FBCLIPConfig(backbone=backbone_config("ViT-L-14-336"))).total
    assert bound.network_gflop == pytest.approx(flops / 1e9)
    assert bound.network_floor_us == pytest.approx(flops / 800e12 * 1e6)
    assert bound.share == pytest.approx(bound.saved_us / bound.network_floor_us)
    assert bound.model == "ViT-L-14-336 @ 518" and not bound.worth_fusing
    # a device with a matmul rate far above its bandwidth would make fusion worth it
    lopsided = projection_fusion_bound(copy_gbps=100.0, matmul_tflops=800.0, itemsize=2)
    assert lopsided.share >= FUSION_WORTH and lopsided.worth_fusing


def test_report_carries_fusion_bound(tiny_report, tmp_path):
    bound = tiny_report.projection_fusion
    assert bound is not None and bound.matmul_tflops > 0
    assert bound.saved_us == pytest.approx(bound.bytes_saved / (tiny_report.copy_gbps * 1e3))
    assert bound.bytes_saved == 2 * 15 * 1370 * 768 * 4  # float32 maps on CPU
    json_path, md_path = write_kernel_bench(tiny_report, tmp_path)
    data = json.loads(json_path.read_text())["projection_fusion"]
    assert data["share"] == pytest.approx(bound.share)
    assert data["worth_fusing"] is bound.worth_fusing
    assert f"at most {bound.share:.2%}" in md_path.read_text()


def test_shape_needs_square_grid():
    with pytest.raises(ValueError, match="square"):
        _ = BenchShape("bad", maps=1, tokens=11, dim=4, image=8).grid


def test_cpu_defaults_use_reduced_shape():
    report = run_kernel_bench(device="cpu", batches=(1,), iters=1)
    assert report.shape == REDUCED and report.iters == 1 and len(report.cases) == 2


def _report(device_type, share, speedup, batch=1):
    case = KernelCase("score_maps", batch, "triton", 100, 1.0, speedup, 100.0, share, speedup)
    return KernelBenchReport(
        "dev",
        device_type,
        "2",
        {"impl": "triton", "reason": "r"},
        FULL,
        "float16",
        1000.0,
        1 << 30,
        5,
        True,
        [case],
    )


@pytest.mark.parametrize(
    ("device_type", "share", "speedup", "batch", "met"),
    [
        ("cuda", 0.8, 6.0, 1, True),
        ("cuda", 0.6, 6.0, 1, False),
        ("cuda", 0.8, 4.0, 1, False),
        ("cuda", 0.8, 6.0, 8, None),
        ("cpu", 0.8, 6.0, 1, None),
    ],
)
def test_target_verdict(device_type, share, speedup, batch, met):
    report = _report(device_type, share, speedup, batch)
    assert report.target_met() is met
    verdict = {True: ": met", False: ": not met", None: ": not applicable"}[met]
    assert verdict in markdown(report)


def test_writes_json_and_markdown(tiny_report, tmp_path):
    json_path, md_path = write_kernel_bench(tiny_report, tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert data["device"] == tiny_report.device and data["target_met"] is None
    assert [c["kernel"] for c in data["cases"]] == [c.kernel for c in tiny_report.cases]
    assert data["shape"]["tokens"] == TINY.tokens and data["backend"]["impl"] == "torch"
    text = md_path.read_text()
    assert tiny_report.device in text and "copy bandwidth" in text
    assert text.count("| score_maps |") == 2 and text.count("| anomaly_map |") == 2


def test_time_ms_runs_warmup_then_iters():
    calls = []
    assert time_ms(lambda: calls.append(1), torch.device("cpu"), iters=3, warmup=2) >= 0
    assert len(calls) == 5


def test_copy_bandwidth_is_positive_on_cpu():
    assert copy_bandwidth(torch.device("cpu"), 1 << 20, iters=2) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_reports_triton(tmp_path):
    report = run_kernel_bench(device="cuda", batches=(1,), iters=3)
    assert report.device_type == "cuda" and report.flush_l2 and report.shape == FULL
    assert {c.impl for c in report.cases} == {report.backend["impl"]}
    assert report.target_met() in (True, False)
    write_kernel_bench(report, tmp_path)

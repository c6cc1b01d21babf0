"""The Triton kernels compile for real GPU architectures on this CPU machine, without spills.

The interpreter tests check the arithmetic; these check what only the compiler sees (block
shapes, dtypes, register pressure) with the block sizes a launch on that GPU would pick.
"""

import importlib.util

import pytest
import torch

from fbclip_edge.errors import FBClipError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


@pytest.fixture(scope="module")
def aot():
    from fbclip_edge.kernels import aot

    return aot


@pytest.fixture(scope="module")
def hopper_builds(aot):
    """Every default case of both kernels, built for sm_90 (H100 / H200)."""
    return aot.build_all(archs=(90,))


def test_every_case_builds_for_hopper_without_spills(aot, hopper_builds):
    expected = len(aot.SCORE_CASES) + len(aot.MAP_CASES)
    assert len(hopper_builds) == expected
    assert {b.arch for b in hopper_builds} == {"sm_90a"}
    for build in hopper_builds:
        assert 0 < build.registers <= 255, build
        assert not build.spills, build
        assert build.stack_bytes == 0, build


def test_builds_use_the_launch_block_sizes(aot, hopper_builds):
    from fbclip_edge.kernels import triton_map, triton_score

    vitl = next(b for b in hopper_builds if b.kernel == "score_maps" and "fp16" in b.config)
    block_m, block_t, block_d, warps = triton_score.block_sizes(15, 1370, 768)
    assert f"BLOCK_M={block_m} BLOCK_T={block_t} BLOCK_D={block_d} warps={warps}" in vitl.config
    big = next(b for b in hopper_builds if b.case == "128-wide grid")
    assert f"GHP={triton_map.block_sizes(128, 128)[2]}" in big.config
    # the map kernel stages its dot operands in shared memory, within Ampere's 99 KiB per block
    assert 0 < big.shared_bytes <= 99 * 1024


def test_ampere_build_and_table(aot):
    builds = [
        aot.build_score(aot.ScoreCase("x", 15, 1370, 768, torch.float16), 80),
        aot.build_map(aot.MapCase("x", 37), 80),
    ]
    assert [b.arch for b in builds] == ["sm_80", "sm_80"]
    assert not any(b.spills for b in builds)
    rows = aot.table(builds).splitlines()
    assert len(rows) == 4 and rows[2].startswith("| score_maps | x | sm_80 |")


def test_arch_names_follow_triton():
    from fbclip_edge.kernels.aot import gpu_arch_name

    assert [gpu_arch_name(c) for c in (80, 89, 90, 100)] == ["sm_80", "sm_89", "sm_90a", "sm_100a"]


def test_ptxas_failure_is_one_line(aot):
    with pytest.raises(FBClipError, match=r"^ptxas failed for sm_90a: "):
        aot.ptxas_resources(".version 8.0\n.target sm_90a\nnot ptx at all\n", 90)


def test_main_exit_code_reports_spills(aot, monkeypatch, capsys):
    def fake(archs):
        build = aot.KernelBuild("score_maps", "c", "sm_90a", "cfg", 255, 8, 8, 16, 0)
        return [build]

    monkeypatch.setattr(aot, "build_all", fake)
    assert aot.main(["--arch", "90"]) == 1
    assert "SPILLS: score_maps c on sm_90a" in capsys.readouterr().out

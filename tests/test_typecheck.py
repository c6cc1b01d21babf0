"""mypy checks TensorRT calls against tensorrt-stubs: a wrong argument name fails the check.

The TensorRT builder and runtime cannot run without a GPU, so this is what keeps them honest on
a CPU: the same small module passes with TensorRT 10's argument names and fails with a typo.
Skipped where mypy or tensorrt-stubs (`pip install --no-deps tensorrt-stubs==10.13.0.35.1`)
is missing. A few seconds: mypy reads the 10k-line stub once, into a cache under tmp_path.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "pyproject.toml"
STUBS_TOOL = ROOT / "tools" / "tensorrt_stubs.py"

mypy_api = pytest.importorskip("mypy.api", reason="mypy is not installed (pip install -e .[dev])")
try:
    importlib.metadata.distribution("tensorrt-stubs")
except importlib.metadata.PackageNotFoundError:
    pytest.skip(
        "tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs==10.13.0.35.1",
        allow_module_level=True,
    )

# TensorRT 10: IBuilderConfig.set_memory_pool_limit(pool, pool_size) and
# Builder.build_serialized_network(network, config).
BUILD = """\
import tensorrt as trt


def build(builder: trt.Builder, network: trt.INetworkDefinition, size: int) -> bytes:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, {pool}=size)
    return bytes(builder.build_serialized_network(network, {config}=config))
"""


@pytest.fixture(scope="module")
def run_mypy(tmp_path_factory):
    """mypy with the project's settings over one module; the stubs come from a fixed copy."""
    root = tmp_path_factory.mktemp("typecheck")
    spec = importlib.util.spec_from_file_location("tensorrt_stubs", STUBS_TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.write_stubs(root / "typings")

    def run(name: str, source: str) -> tuple[str, int]:
        module = root / name
        module.write_text(source)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MYPYPATH", str(root / "typings"))  # searched before mypy_path
            stdout, stderr, status = mypy_api.run(
                [
                    "--config-file",
                    str(CONFIG),
                    "--cache-dir",
                    str(root / "cache"),
                    "--no-error-summary",
                    str(module),
                ]
            )
        return stdout + stderr, status

    return run


def test_tensorrt_10_argument_names_pass(run_mypy):
    output, status = run_mypy("good.py", BUILD.format(pool="pool_size", config="config"))
    assert status == 0, output


def test_a_wrong_tensorrt_argument_name_fails(run_mypy):
    output, status = run_mypy("bad.py", BUILD.format(pool="pool_sizee", config="configg"))
    assert status == 1, output
    assert (
        'Unexpected keyword argument "pool_sizee" for "set_memory_pool_limit" of '
        '"IBuilderConfig"' in output
    )
    assert 'Unexpected keyword argument "configg" for "build_serialized_network"' in output
    assert output.count("[call-arg]") == 2, output

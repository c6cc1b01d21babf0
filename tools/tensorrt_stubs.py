"""Copy the installed tensorrt-stubs into a mypy_path folder, fixing what mypy cannot parse.

tensorrt-stubs (pybind11-stubgen output) is the only typed view of the TensorRT 10 Python API
we can have on a machine without TensorRT, but as published mypy cannot use it:

- it is not valid Python in five places (plugin methods with a parameter named `in`,
  `add_scale_nd` with a required parameter after defaulted ones), and mypy treats a syntax
  error in any module it reads as fatal;
- the modules define `bool: DataType` (TensorRT's `trt.bool`), which shadows the builtin in
  every `-> bool` and `x: bool` of the same file, so mypy would drop those types to Any.

So `make lint` runs this first and mypy reads the fixed copy (`mypy_path` in pyproject.toml)
instead of the files in site-packages. Only those spots change: parameters renamed `in_` or
given a default, and annotations' `bool` spelled `_builtins.bool`; every other signature is
the package's own.

    pip install --no-deps tensorrt-stubs==10.13.0.35.1   # its tensorrt dependency cannot install
    python tools/tensorrt_stubs.py                        # -> build/typings
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import re
import shutil
import sys
from pathlib import Path

DISTRIBUTION = "tensorrt-stubs"
PIN = "10.13.0.35.1"
DEFAULT_DEST = Path(__file__).resolve().parent.parent / "build" / "typings"
_SIGNATURE = re.compile(r"^(?P<head>\s*def \w+\()(?P<params>.*)(?P<tail>\)\s*(->.*)?:.*)$")


def _split_params(params: str) -> list[str]:
    """Top-level comma split of one signature's parameter list."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(params):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(params[start:i])
            start = i + 1
    parts.append(params[start:])
    return [p.strip() for p in parts]


def _fix_line(line: str) -> str:
    """Rename keyword-named parameters (`in` -> `in_`) and give a required parameter that
    follows a defaulted one the default `...` (it is positional either way)."""
    match = _SIGNATURE.match(line)
    if match is None:
        raise ValueError(f"cannot fix: {line.strip()}")
    fixed, defaulted = [], False
    for param in _split_params(match["params"]):
        name, _, rest = param.partition(":")
        if name.strip() in ("in", "is", "from", "lambda", "global", "class"):
            param = f"{name.strip()}_:{rest}"
        if "=" in param:
            defaulted = True
        elif defaulted and param and not param.startswith("*"):
            param += " = ..."
        fixed.append(param)
    return f"{match['head']}{', '.join(fixed)}{match['tail']}"


def fix_source(text: str, name: str = "<stub>") -> tuple[str, int]:
    """(parseable text, number of lines fixed); raises ValueError if a fix does not help."""
    lines = text.splitlines()
    count = 0
    while True:
        try:
            ast.parse("\n".join(lines), filename=name, feature_version=(3, 10))
        except SyntaxError as error:
            index = (error.lineno or 0) - 1
            if not 0 <= index < len(lines) or count > len(lines):
                raise ValueError(f"{name}: {error}") from None
            fixed = _fix_line(lines[index])
            if fixed == lines[index]:
                raise ValueError(f"{name}:{index + 1}: {error.msg}: {fixed.strip()}") from None
            lines[index] = fixed
            count += 1
        else:
            return "\n".join(lines) + "\n", count


def unshadow_bool(text: str) -> tuple[str, int]:
    """Where the module binds `bool` itself, point its annotations at the builtin instead."""
    tree = ast.parse(text, feature_version=(3, 10))
    binds = any(
        (isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "bool")
        or (isinstance(node, ast.ImportFrom) and any(a.name == "bool" for a in node.names))
        for node in tree.body
    )
    if not binds:
        return text, 0
    annotations: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
            annotations += [a.annotation for a in every if a is not None and a.annotation]
            annotations += [node.returns] if node.returns else []
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
    spots = sorted(
        {
            (name.lineno, name.col_offset)
            for annotation in annotations
            for name in ast.walk(annotation)
            if isinstance(name, ast.Name) and name.id == "bool"
        },
        reverse=True,
    )
    lines = text.splitlines()
    for lineno, col in spots:  # from the end, so earlier offsets stay valid (ASCII source)
        line = lines[lineno - 1]
        lines[lineno - 1] = f"{line[:col]}_builtins.bool{line[col + len('bool') :]}"
    if spots:  # after any `from __future__` imports, which must come first
        future = [n.end_lineno or 0 for n in tree.body if getattr(n, "module", "") == "__future__"]
        lines.insert(max(future, default=0), "import builtins as _builtins")
    return "\n".join(lines) + "\n", len(spots)


def write_stubs(dest: Path) -> tuple[str, int]:
    """Fixed copies of the distribution's .pyi files under `dest`: (version, lines fixed)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            f"{DISTRIBUTION} is not installed: pip install --no-deps {DISTRIBUTION}=={PIN}"
        ) from None
    stubs = [f for f in dist.files or [] if f.suffix == ".pyi"]
    if not stubs:
        raise SystemExit(f"{DISTRIBUTION} {dist.version} has no .pyi files")
    shutil.rmtree(dest, ignore_errors=True)
    total = 0
    for stub in stubs:
        text, count = fix_source(Path(dist.locate_file(stub)).read_text(), str(stub))
        text, _ = unshadow_bool(text)
        target = dest / str(stub)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        total += count
    return dist.version, total


def main(argv: list[str] | None = None) -> int:
    """Command line: write the fixed stubs (default build/typings)."""
    parser = argparse.ArgumentParser(description="Write mypy-readable tensorrt-stubs.")
    parser.add_argument("dest", nargs="?", type=Path, default=DEFAULT_DEST)
    args = parser.parse_args(argv)
    version, fixed = write_stubs(args.dest)
    print(f"{DISTRIBUTION} {version} -> {args.dest} ({fixed} lines fixed)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

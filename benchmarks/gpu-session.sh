#!/usr/bin/env bash
# The GPU checks of issues #5 (kernels), #6 (bench) and #12 (both methods side by side), in a
# few device calls.
#
# Here, with network access (once per session):
#   benchmarks/gpu-session.sh fetch
#     -> .whl/ (the wheels the GPU image lacks) and shared/fixtures/ (the authors' fixture,
#        so golden parity runs there too); both git-ignored, about 55 MiB with the tree.
# There (device tool: carry [".whl", "shared"], command `bash benchmarks/gpu-session.sh STEP`):
#   check    nvidia-smi, versions, the gpu/tensorrt-marked tests, AOT kernel build for the GPU,
#            and the kernel microbenchmark                                   (a few minutes)
#   bench    `fbclip-edge bench --method all` (FB-CLIP, AnomalyCLIP, FiLo: torch rows, stages) for ViT-L-14-336 @ 518,
#            batch 1, 8, 32, every GPU backend,
#            started detached (it can outlast one 10-minute call); then
#   wait     polls up to 9 minutes and copies whatever is finished into $OUT (call again
#            until it reports "done"). Call it right after `bench`: a machine with no call in
#            flight is given back after about 30 s, and the detached run dies with it.
# Results land in $OUT (up to 8 files come back); commit them under
# benchmarks/results/<device>-<date>/ with the exact command, and update benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:?usage: benchmarks/gpu-session.sh fetch|check|bench|wait}
out=${OUT:-bench-out/gpu-session}
run_dir=/tmp/fbclip-gpu-bench
wheels=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4)
# BENCH_ARGS overrides the bench arguments (e.g. a quick dry run of the steps on a CPU).
default_args="--method all --backbone ViT-L-14-336 --image-size 518 --batch 1,8,32 --max-seconds 20 \
--backends torch-eager-fp32,torch-fp16-sdpa,torch-compile,onnxruntime-cuda,onnxruntime-tensorrt,tensorrt"
read -r -a bench_args <<<"${BENCH_ARGS:-$default_args}"

use_wheels() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
}

case $step in
fetch)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${wheels[@]}"
  mkdir -p shared/fixtures
  # only FB-CLIP's fixture fits the 64 MiB carry beside the wheels (AnomalyCLIP's is 42 MiB);
  # the AnomalyCLIP rows of the bench use random weights, which time the same.
  cp -r ../shared/fixtures/fbclip-reference-tiny shared/fixtures/
  du -sh .whl shared
  ;;
check)
  use_wheels
  mkdir -p "$out"
  nvidia-smi 2>&1 | tee "$out/nvidia-smi.txt" || true
  python3 -m pytest -q -m "gpu or tensorrt" -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" || true
  python3 -m fbclip_edge.kernels.aot --arch 90 2>&1 | tee "$out/kernels-aot.md" || true
  python3 -m fbclip_edge bench-kernels --out "$out"
  ;;
bench)
  use_wheels
  rm -rf "$run_dir" && mkdir -p "$run_dir"
  echo "fbclip-edge bench ${bench_args[*]}" >"$run_dir/command"
  setsid nohup bash -c "python3 -m fbclip_edge bench ${bench_args[*]} --out $run_dir/vitl-518 \
    >$run_dir/bench.log 2>&1; echo \$? >$run_dir/exit" >/dev/null 2>&1 &
  sleep 20 && tail -5 "$run_dir/bench.log"
  ;;
wait)
  for _ in $(seq 108); do [ -f "$run_dir/exit" ] && break; sleep 5; done
  mkdir -p "$out"
  cp "$run_dir/bench.log" "$run_dir/command" "$out/" 2>/dev/null || true
  if [ -f "$run_dir/exit" ]; then
    cp "$run_dir"/vitl-518/results.* "$out/" 2>/dev/null || true
    echo "done (exit $(cat "$run_dir/exit"))"
  else
    tail -3 "$run_dir/bench.log"; echo "still running: call wait again"
  fi
  ;;
*) echo "unknown step '$step'; use fetch, check, bench or wait" >&2; exit 2 ;;
esac

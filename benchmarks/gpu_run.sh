#!/usr/bin/env bash
# The GPU runs, in stages of at most about 10 minutes each. Run from the repository root; results go to $OUT
# (or ./out). Stages, in the order a session should take them:
#
#   tests-ops      pytest -m gpu on the op files                                  (~7 min)
#   tests-models   pytest -m gpu on the backend and the model suite, the bi kernels called as ops (~7 min)
#   tests-native   pytest -m gpu on the native launches (design.md, pass 6) and the model suite with them: ~40 s
#                  for tests/test_native_launch.py, then 90-115 s a model case on the H100 (~30 s through the ops),
#                  so the model cases a few a call: TESTS_K="qwen3", "llama or gemma or gpt2", "pythia or phi or
#                  starcoder" (a TESTS_K leaves test_native_launch.py out: its tests' names hold no model's)
#                  (all three with BI_COMPILE_CHECK_LAUNCH_KEYS=1: every keyed kernel launch is checked against
#                  Triton's own choice of binary, bi_compile/kernels/launch.py; a line per test in the log, and
#                  pytest is interrupted after TESTS_TIMEOUT seconds (540) so that it still prints its failures;
#                  TESTS_K narrows the model cases of tests-models and tests-native, a pytest -k expression)
#   bits           benchmarks/cuda_bits.py: every bi op's output bits from the source in BITS_BEFORE (e.g. a
#                  `git archive` of the last GPU-verified commit, unpacked) against this tree's; fails if any differ.
#                  BITS_ONLY="layer_norm var_mean" keeps those ops' outputs (the whole set needs minutes)
#   warm           compile the decode step of both compiled variants, in parallel processes, to fill the Inductor
#                  cache (cold: 110-175 s per batch class and variant; the measured run then loads the graphs)
#   decode         benchmarks/decode.py, all five variants in one run: table, plot, kernel profile
#   kernels        benchmarks/kernels.py, every op under CUDA graphs (KERNELS_ARGS narrows it, e.g. "--shapes
#                  layer-norm --ops layer_norm --ms 256 2048 8192"; PYTHONPATH=<old source> times that source)
#   tiles          benchmarks/tiles.py, every matmul tile candidate on the issue-7 shapes, with the bit check (~2 min)
#   attention-tiles  benchmarks/attention_tiles.py: every attention config candidate on prefill and decode cases of
#                  GQA 32/8 and 16/8 at head dim 128, against SDPA, each checked for invariance first (not yet run on a
#                  GPU: time it with one head shape first, ATTENTION_TILES_ARGS="--heads 32/8x128")
#   rows           benchmarks/rows.py, one row blocking per width searched across every row op, with an invariance
#                  check each (~2 min with ROWS_ARGS="--ms 2048 8192 32768"; a 9-minute timeout keeps what it measured)
#   prefill        benchmarks/prefill.py: compiled prefill outside CUDA graphs, bi_ascend (with and without its
#                  native launches) vs stock Inductor, 28 layers of Qwen3-0.6B, and the eager per-call cost of
#                  bi.linear / bi.rms_norm. Each variant is
#                  compiled first in a process of its own, in parallel, to fill the Inductor cache (~4 min on the
#                  H200 host; each compile's time is a "first call" line of $OUT/prefill_warm_VARIANT.log), then
#                  the measured run loads the graphs (Dynamo still traces: ~2.5 min a backend).
#                  Run it alone in a call (~9 min). PREFILL_BACKENDS picks the variants, e.g.
#                  PREFILL_BACKENDS="inductor bi_ascend+native" PREFILL_ARGS="--layers 12" (two variants fit sooner)
#   vllm-stage     for a machine without vLLM: copy the parts of the offline vLLM bundle carried in this call
#                  (.gpu-vllm/parts/, from ../shared/gpu-vllm/build_bundle.sh; one part per call, back to back) to
#                  /tmp/stage; once the parts there match .gpu-vllm/MANIFEST's checksum, extract them to /tmp/site and
#                  install the server's wheels carried in .gpu-vllm/server/ there. The vllm stages then run with
#                  PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 (docs/vllm.md, "On a GPU")
#   vllm-tests     pytest -m gpu tests/vllm/test_vllm_gpu.py: the seed tests through real vLLM, every route's engine
#                  side by side (needs vLLM importable; results and logs in $OUT/vllm-gpu.tgz; ~3 min)
#   vllm-moe       benchmarks/moe.py: vLLM's fused MoE experts with their per-M config, with bi-compile's pinned one,
#                  and through bi.grouped_mm, timed and bit-checked side by side (needs vLLM importable; ~1 min)
#   vllm-profile   where a served step's GPU time goes: stock vLLM and the bi-graph route one after the other, 8
#                  requests decoding 64 tokens under torch.profiler (tests/vllm/llm_runner.py --workloads profile),
#                  GPU time per decode step by kind of kernel with the routes side by side, then each route's top
#                  kernels ($OUT/profile.md; ~3 min)
#   vllm-serve     benchmarks/serve.py on the same Qwen3-0.6B-shaped checkpoint: every route back to back, 512 in /
#                  256 out, concurrency 1 8 64 (extra arguments in SERVE_ARGS; table in $OUT/serve.md, logs in
#                  $OUT/serve-logs.tgz). A route takes 2-3 minutes: name two a call, e.g. SERVE_ARGS="--routes stock
#                  bi-graph --concurrency 8 64 --output-len 128", then the same with "--resume --routes vllm-bi
#                  bi-piecewise" in the next call to the still-warm machine, for one table
#
# DEADLINE=N: the stages named share N seconds (a call's limit less its start, e.g. 540), for one call that returns
# whatever it finished. Each stage runs under `timeout` of the time left, interrupted with SIGINT so that pytest and
# the benchmarks still print what they have; a stage that would start with under 30 s left is skipped, with a line.
#
# `warm` and `decode` must run on the same machine (the cache lives in /tmp there): call them back to back, or
# together (`benchmarks/gpu_run.sh warm decode`) when the model is small enough to fit 10 minutes.
# Extra arguments for decode.py go in DECODE_ARGS, e.g. DECODE_ARGS="--models qwen3-8b --layers 8", and for tiles.py
# in TILES_ARGS, e.g. TILES_ARGS="--shapes 1024x2048 1024x1024 2048x1024 1024x3072 3072x1024" (the 0.6B projections),
# and for rows.py in ROWS_ARGS, e.g. ROWS_ARGS="--ops sum mean --ms 8192".
set -euo pipefail
export PYTHONUNBUFFERED=1
for stage in "$@"; do
  case $stage in
    tests-ops | tests-models | tests-native | bits | warm | decode | prefill | kernels | tiles | attention-tiles | rows | vllm-stage | vllm-tests | vllm-moe | vllm-profile | vllm-serve) ;;
    *) echo "unknown stage: $stage (tests-ops, tests-models, tests-native, bits, warm, decode, prefill, kernels, tiles, attention-tiles, rows, vllm-stage, vllm-tests, vllm-moe, vllm-profile, vllm-serve)" >&2
       exit 2 ;;
  esac
done
[[ ${DEADLINE:-0} =~ ^[0-9]+$ ]] || { echo "DEADLINE must be a whole number of seconds, got: $DEADLINE" >&2; exit 2; }
if [ -n "${DEADLINE:-}" ]; then
  end=$((SECONDS + DEADLINE))
  for stage in "$@"; do
    left=$((end - SECONDS))
    if [ "$left" -lt 30 ]; then
      echo "== $stage: skipped, ${left} s left of DEADLINE=$DEADLINE"
      continue
    fi
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1
    echo "== $stage $(date -u +%T), ${left} s left"
    DEADLINE= timeout -s INT -k 20 "$left" bash "$0" "$stage" || echo "== $stage: exit $?"
  done
  exit 0
fi
DECODE=(python3 benchmarks/decode.py --context 256 --steps 32 ${DECODE_ARGS:-})
# Kept on the machine while it stays warm, so that a later call reuses them: the vLLM checkpoints (built by
# vllm-tests, or by vllm-serve when it runs alone) and the serving results (SERVE_ARGS="--resume --routes ..." adds
# routes to the same table from a later call: each route takes 2-3 minutes, four do not fit one call).
CHECKPOINTS=/tmp/bi-compile-checkpoints
CHECKPOINT="$CHECKPOINTS/qwen3-0.6b"
SERVE_DIR=/tmp/bi-compile-serve

# pytest -m gpu over "$@", its log in $OUT/$1.log. Interrupted (SIGINT) after TESTS_TIMEOUT seconds, so that it
# still prints why each test that ran failed: a call's limit kills it with nothing printed.
gpu_tests() {
  local log=$1
  shift
  BI_COMPILE_CHECK_LAUNCH_KEYS=1 timeout -s INT -k 20 "${TESTS_TIMEOUT:-540}" python3 -m pytest -m gpu -v --tb=short \
    -p no:cacheprovider --durations=10 -rfEs "$@" 2>&1 | tee "$OUT/$log.log" | tail -20
}

for stage in "$@"; do
  case $stage in
    tests-ops)
      gpu_tests tests_ops tests/test_ops_*.py ;;
    tests-models)
      gpu_tests tests_models tests/test_backend_gpu.py tests/test_models_gpu.py \
        -k "not native_launch${TESTS_K:+ and ($TESTS_K)}" ;;
    tests-native)
      gpu_tests tests_native tests/test_native_launch.py tests/test_models_gpu.py \
        -k "native_launch${TESTS_K:+ and ($TESTS_K)}" ;;
    bits)
      [ -d "${BITS_BEFORE:-}" ] || { echo "bits: BITS_BEFORE must name the old source tree" >&2; exit 2; }
      only=(${BITS_ONLY:+--only $BITS_ONLY})
      PYTHONPATH="$BITS_BEFORE" python3 benchmarks/cuda_bits.py save "$OUT/bits_before.json" "${only[@]}"
      PYTHONPATH=. python3 benchmarks/cuda_bits.py save "$OUT/bits_after.json" "${only[@]}"
      python3 benchmarks/cuda_bits.py compare "$OUT/bits_before.json" "$OUT/bits_after.json" | tee "$OUT/bits.log" ;;
    warm)
      i=0
      for variant in inductor+graph bi_ascend+graph; do  # same cache shapes as `decode`: batch 1 and max batch 64
        i=$((i + 1))
        "${DECODE[@]}" --batch-sizes 1 64 --variants "$variant" >"$OUT/warm_$i.log" 2>&1 &
      done
      wait
      grep -h "TPOT" "$OUT"/warm_*.log ;;
    decode)
      "${DECODE[@]}" --batch-sizes 1 8 32 64 --markdown "$OUT/decode.md" --plot "$OUT/decode.png" \
        --profile "$OUT/profile.txt" 2>&1 | grep -v -i warn | tee "$OUT/decode.log" | tail -40 ;;
    prefill)
      backends=(${PREFILL_BACKENDS:-inductor bi_ascend bi_ascend+native})
      for backend in "${backends[@]}"; do
        python3 benchmarks/prefill.py --backends "$backend" --repeats 1 ${PREFILL_ARGS:-} >"$OUT/prefill_warm_$backend.log" 2>&1 &
      done
      wait
      python3 benchmarks/prefill.py --backends "${backends[@]}" --markdown "$OUT/prefill.md" --json "$OUT/prefill.json" \
        ${PREFILL_ARGS:-} 2>&1 \
        | grep --line-buffered -v -i warn | tee "$OUT/prefill.log" | tail -30 ;;
    kernels)
      python3 benchmarks/kernels.py --cuda-graph ${KERNELS_ARGS:-} --markdown "$OUT/kernels.md" >"$OUT/kernels.log" 2>&1
      tail -5 "$OUT/kernels.md" ;;
    tiles)
      python3 benchmarks/tiles.py ${TILES_ARGS:-} --json "$OUT/tiles.json" --markdown "$OUT/tiles.md" 2>&1 | grep -v "it/s" | tail -45 ;;
    attention-tiles)  # a 9-minute timeout keeps the head shapes it finished (--json is written after each)
      timeout 540 python3 benchmarks/attention_tiles.py ${ATTENTION_TILES_ARGS:-} --json "$OUT/attention_tiles.json" \
        --markdown "$OUT/attention_tiles.md" 2>&1 | grep -v "it/s" | tail -40 ;;
    rows)
      timeout 540 python3 benchmarks/rows.py ${ROWS_ARGS:-} --json "$OUT/rows.json" --markdown "$OUT/rows.md" 2>&1 | grep -v "it/s" | tail -30 ;;
    vllm-stage)
      mkdir -p /tmp/stage /tmp/site
      cp .gpu-vllm/parts/site.tar.xz.part* /tmp/stage/ 2>/dev/null || true
      want=$(awk '/site.tar.xz$/ {print $1}' .gpu-vllm/MANIFEST)
      have=$(cat /tmp/stage/site.tar.xz.part* | sha256sum | cut -d' ' -f1)
      if [ "$have" = "$want" ]; then
        cat /tmp/stage/site.tar.xz.part* | xz -dc -T0 | tar -xf - -C /tmp/site
        ! ls .gpu-vllm/server/*.whl >/dev/null 2>&1 ||
          python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-vllm/server/*.whl
        echo "vllm-stage: bundle extracted to /tmp/site"
      else
        echo "vllm-stage: parts so far: $(cd /tmp/stage && ls site.tar.xz.part* | tr '\n' ' ')(carry the next one)"
      fi ;;
    vllm-tests)  # a failing test must not stop the benchmark stage after it; results as one archive (a call
      # returns few files)
      BI_COMPILE_VLLM_GPU_OUT="$OUT/vllm-gpu" BI_COMPILE_VLLM_GPU_CHECKPOINTS="$CHECKPOINTS" python3 -m pytest -m gpu \
        -q -p no:cacheprovider -rfEs tests/vllm/test_vllm_gpu.py 2>&1 | tee "$OUT/vllm_tests.log" | tail -30 || true
      [ -d "$OUT/vllm-gpu" ] && tar czf "$OUT/vllm-gpu.tgz" -C "$OUT" vllm-gpu && rm -rf "$OUT/vllm-gpu" ;;
    vllm-moe)
      python3 benchmarks/moe.py --markdown "$OUT/moe.md" 2>&1 | grep -v -i warn | tee "$OUT/moe.log" | tail -15 ;;
    vllm-profile)
      [ -f "$CHECKPOINT/config.json" ] || python3 tests/vllm/checkpoint.py "$CHECKPOINT" --shape qwen3-0.6b --device cuda
      for route in stock bi-graph; do
        python3 tests/vllm/llm_runner.py --model "$CHECKPOINT" --route $route --engine gpu --workloads profile \
          --out "$OUT/profile-$route.json" >"$OUT/profile-$route.log" 2>&1 || tail -20 "$OUT/profile-$route.log"
      done
      python3 benchmarks/profile_table.py "$OUT"/profile-*.json | tee "$OUT/profile.md" ;;
    vllm-serve)
      [ -f "$CHECKPOINT/config.json" ] || python3 tests/vllm/checkpoint.py "$CHECKPOINT" --shape qwen3-0.6b --device cuda
      python3 benchmarks/serve.py --model "$CHECKPOINT" --input-len 512 --output-len 256 --concurrency 1 8 64 \
        --out-dir "$SERVE_DIR" ${SERVE_ARGS:-} 2>&1 | tee "$OUT/serve.log" | tail -30 || true
      cp "$SERVE_DIR"/serve.* "$OUT/" 2>/dev/null || true
      [ -d "$SERVE_DIR" ] && tar czf "$OUT/serve-logs.tgz" -C "$SERVE_DIR" . ;;
  esac
done

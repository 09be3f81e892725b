#!/usr/bin/env bash
# One GPU call: install what the device image lacks (carried wheels in .whl/), run the gpu-marked tests, then
# the benchmark suites. Usage on the device machine: bash benchmarks/gpu_session.sh [pytest paths] ; results in $OUT.
#   every benchmark in one call (≤ 10 min):  RUN_TESTS=0 SUITES=all bash benchmarks/gpu_session.sh
#   one suite, some modules:                 SUITES=kernels BENCH_ONLY=kernels_mhc bash benchmarks/gpu_session.sh
# SUITES: space-separated kernels|steps|e2e|all (default kernels), each into $OUT/<suite>/bench.{json,md};
# none: the tests only; BENCH_BUDGET: seconds after which no further case starts (default 420 for all, else none);
# BENCH_TIMEOUT: hard limit per suite (default 555 for all, else 300); bench.json/bench.md are rewritten after
# every module, so a run cut short keeps what it measured.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if [ "${RUN_TESTS:-1}" = 1 ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider "${@:-tests}" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
for suite in ${SUITES:-kernels}; do
  [ "$suite" = none ] && continue   # tests only
  if [ "$suite" = all ]; then budget=${BENCH_BUDGET:-420}; limit=${BENCH_TIMEOUT:-555}; else budget=${BENCH_BUDGET:-0}; limit=${BENCH_TIMEOUT:-300}; fi
  timeout "$limit" torch-dflash bench --suite "$suite" --out "$OUT/$suite" --budget "$budget" ${BENCH_ONLY:+--only $BENCH_ONLY} \
    2>&1 | tee "$OUT/bench_$suite.log" | tail -n 150
done

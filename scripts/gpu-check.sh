#!/usr/bin/env bash
# On a GPU machine: install, run the GPU tests, the sanitizer, the verification and the decode
# benchmark; logs and result JSON go to $OUT (default ./gpu-check-out). Peers' wheels, if any,
# are installed from .peers/.
set -uo pipefail
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD FLASHINFER_CUDA_ARCH_LIST=9.0
status=0
if ls .peers/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index .peers/*.whl >"$OUT/peers-install.log" 2>&1 \
    || echo "peer wheels did not install (see peers-install.log)"
fi
step() { echo "== $1"; }

step "GPU tests"
HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-gpu} python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/ \
  2>&1 | tee "$OUT/gpu-tests.log" | tail -n 15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "compute-sanitizer (memcheck, racecheck) on the verification set"
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --error-exitcode 3 python3 -m decode_attention.verify \
    >"$OUT/sanitizer-$tool.log" 2>&1
  rc=$?
  echo "$tool: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|verify:' "$OUT/sanitizer-$tool.log" | tr '\n' ' ')"
  [ $rc -eq 0 ] || status=1
done

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  step "decode benchmark"
  python3 -m gpukernels.bench --out results 2>"$OUT/bench-progress.log" | tee "$OUT/bench-table.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  for f in results/*/decode.json; do  # keep each GPU's file under its own folder
    mkdir -p "$OUT/$(basename "$(dirname "$f")")" && cp "$f" "$OUT/$(basename "$(dirname "$f")")/"
  done
fi
exit $status

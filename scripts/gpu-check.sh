#!/usr/bin/env bash
# On a GPU machine: install, run the GPU tests, the sanitizer and the benchmark suites; logs and
# result JSON go to $OUT (default ./gpu-check-out): 7 files for the default list, 2 more for each of
# shared_prefix, shared_prefix_papers, span and tree (keep a run to 7 when its files must all come
# back). Peers' wheels, if any, are installed from .peers/.
#
#   bash scripts/gpu-check.sh                      # the default list: tests sanitizer decode coverage
#   bash scripts/gpu-check.sh tests sanitizer      # only the named steps, in the order given
#   bash scripts/gpu-check.sh shared_prefix span   # suites outside the default list run when named
#   bash scripts/gpu-check.sh tree shared_prefix_papers
#   bash scripts/gpu-check.sh end_to_end            # the decoder steps (python -m decode_attention.e2e.bench)
#
# Steps: tests (pytest -m gpu), sanitizer (compute-sanitizer memcheck and racecheck over
# `python -m decode_attention.verify`), decode, coverage, shared_prefix, shared_prefix_papers, span
# and tree (`decode-attention bench --suite ...`), end_to_end (`python -m decode_attention.e2e.bench`);
# each writes bench-<suite>.log and the <gpu>/<suite>.json it wrote, nothing else. SKIP_BENCH=1 drops the benchmark steps from the default list.
# VERIFY_ONLY=hydragen (a kind of case, see `decode-attention verify --only`) sanitizes only those
# cases; GPU_TESTS=tests/test_x.py (pytest arguments) runs only those GPU tests.
set -uo pipefail
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD FLASHINFER_CUDA_ARCH_LIST=9.0
status=0
steps=("$@")
if [ ${#steps[@]} -eq 0 ]; then
  steps=(tests sanitizer)
  [ "${SKIP_BENCH:-0}" = 1 ] || steps+=(decode coverage)
fi
for s in "${steps[@]}"; do
  case $s in tests|sanitizer|decode|coverage|shared_prefix|shared_prefix_papers|span|tree|end_to_end) ;;
  *) echo "unknown step '$s' (tests, sanitizer, decode, coverage, shared_prefix, shared_prefix_papers," \
       "span, tree, end_to_end)" >&2; exit 2;; esac
done
if ls .peers/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index .peers/*.whl >/tmp/peers-install.log 2>&1 \
    || { cp /tmp/peers-install.log "$OUT/"; echo "peer wheels did not install (see peers-install.log)"; }
fi
step() { echo "== $1 ($(date +%H:%M:%S))"; }

# Every kernel instantiation compiled at once, in parallel, into CuPy's cache: the steps below then
# load binaries instead of compiling one at a time (SKIP_WARM=1 skips it).
if [ "${SKIP_WARM:-0}" != 1 ]; then
  step "compiling the kernels"
  python3 -m gpukernels.warm || status=1
fi

for s in "${steps[@]}"; do
  case $s in
  tests)
    step "GPU tests"
    # A test that hangs on the device (a kernel that never returns) is stopped after 180 s with
    # every thread's stack in the log, instead of holding the machine (pytest-timeout, if present).
    limit=()
    python3 -c "import pytest_timeout" 2>/dev/null && limit=(--timeout=180 --timeout-method=thread)
    # Four test processes share the GPU where pytest-xdist is installed (the tests are small).
    python3 -c "import xdist" 2>/dev/null && limit+=(-n "${GPU_TEST_PROCESSES:-4}")
    HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-gpu} python3 -m pytest -q -rfs -p no:cacheprovider -m gpu \
      "${limit[@]}" ${GPU_TESTS:-tests/} 2>&1 | tee "$OUT/gpu-tests.log" | tail -n 25
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    ;;
  sanitizer)
    step "compute-sanitizer (memcheck, racecheck) on the verification set"
    for tool in memcheck racecheck; do
      compute-sanitizer --tool $tool --error-exitcode 3 python3 -m decode_attention.verify \
        ${VERIFY_ONLY:+--only $VERIFY_ONLY} >"$OUT/sanitizer-$tool.log" 2>&1
      rc=$?
      echo "$tool: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|verify:' "$OUT/sanitizer-$tool.log" | tr '\n' ' ')"
      [ $rc -eq 0 ] || status=1
    done
    ;;
  decode|coverage|shared_prefix|shared_prefix_papers|span|tree|end_to_end)
    step "$s benchmark"
    marker=$(mktemp)  # only the file this run writes comes back, not the committed ones of other GPUs
    if [ "$s" = end_to_end ]; then cmd=(python3 -m decode_attention.e2e.bench --out results)
    else cmd=(python3 -m gpukernels.bench --suite "$s" --out results); fi
    "${cmd[@]}" 2>&1 | tee "$OUT/bench-$s.log" | grep -v "^\["
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    for f in results/*/"$s".json; do  # keep each GPU's file under its own folder
      [ -e "$f" ] && [ "$f" -nt "$marker" ] || continue
      mkdir -p "$OUT/$(basename "$(dirname "$f")")" && cp "$f" "$OUT/$(basename "$(dirname "$f")")/"
    done
    rm -f "$marker"
    ;;
  esac
done
exit $status

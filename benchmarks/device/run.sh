#!/usr/bin/env bash
# One call on the GPU machine (the device tool): install the carried wheels
# (.dist-gpu: our CUDA build; .whl: the peers), then run the named stages in
# order, each under its own time limit, logs under $OUT. Prints a short
# summary last.
#
#   OPT4GPTQ_COMMIT=<short hash> bash benchmarks/device/run.sh wgmma-tests bench-quick gpu-tests
#
# Name the commit in the command: the device's copy of .git can be stale, and
# the benchmark JSON records OPT4GPTQ_COMMIT before git's HEAD.
#
# Stages: env, wgmma-tests, gpu-tests (every GPU test file), mma-tests,
# bench-quick (Llama-2-7B, few M, no peers), bench MODEL [M list] (with peers),
# peers-smoke, selfcheck, pytest SELECTION, probe WHAT, ncu K N M, anatomy,
# invariance (benchmarks/probes/invariance_probe.py).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/opt4gptq-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .dist-gpu/*.whl .whl/*.whl >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

pytest_stage() {  # name limit files...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" python3 -m pytest -q -p no:cacheprovider "$@" >"$OUT/pytest_$name.log" 2>&1
    echo "$name (rc $?, $((SECONDS - start)) s): $(tail -n 1 "$OUT/pytest_$name.log")" | tee -a "$SUMMARY"
    grep -E "^(FAILED|ERROR)" "$OUT/pytest_$name.log" | head -n 15 | tee -a "$SUMMARY"
}

while [ $# -gt 0 ]; do
    stage=$1
    shift
    case $stage in
    env)
        nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader | tee -a "$SUMMARY"
        python3 -c "import opt4gptq, torch; print('opt4gptq', opt4gptq.__version__, opt4gptq.backend(), opt4gptq.devices(), 'torch', torch.__version__)" | tee -a "$SUMMARY"
        ;;
    wgmma-tests) pytest_stage wgmma 170 -x tests/test_wgmma.py ;;
    wgmma-tests-all) pytest_stage wgmma_all 200 tests/test_wgmma.py ;;
    probe)
        what=$1
        shift
        timeout 200 python3 benchmarks/probes/wgmma_probe.py "$what" >"$OUT/probe_$what.log" 2>&1
        echo "probe $what rc $?" | tee -a "$SUMMARY"
        tail -n 40 "$OUT/probe_$what.log" | tee -a "$SUMMARY"
        ;;
    ncu)  # K N M: one wgmma launch under Nsight Compute
        k=$1 n=$2 m=$3
        shift 3
        timeout 200 ncu --clock-control none -k regex:gemm_wgmma -c 1 --section SpeedOfLight --section Occupancy \
            --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats \
            --section SourceCounters --import-source no \
            python3 benchmarks/probes/wgmma_probe.py once "$k" "$n" "$m" >"$OUT/ncu_${k}x${n}_m$m.txt" 2>&1
        echo "ncu $k x $n M=$m rc $?" | tee -a "$SUMMARY"
        grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \\(SM\\)|Issue Slots Busy|No Eligible|Active Warps Per|Eligible Warps|Registers Per|Achieved Occupancy|Stall" "$OUT/ncu_${k}x${n}_m$m.txt" | head -n 24 | tee -a "$SUMMARY"
        ;;
    anatomy)  # the kernel with parts switched off (benchmarks/probes/wgmma_anatomy.cu, built into .probe/)
        timeout 200 .probe/wgmma_anatomy >"$OUT/anatomy.log" 2>&1
        echo "anatomy rc $?" | tee -a "$SUMMARY"
        cat "$OUT/anatomy.log" | tee -a "$SUMMARY"
        ;;
    mma-tests) pytest_stage mma 300 -x tests/test_mma.py ;;
    pytest)  # one pytest selection, e.g. tests/test_mma.py::test_name
        pytest_stage "$(basename "${1%%::*}" .py)" 300 "$1"
        shift
        ;;
    gpu-tests) pytest_stage gpu 540 tests/test_wgmma.py tests/test_gpu.py tests/test_variants.py tests/test_errors.py \
        tests/test_torch_ops.py tests/test_gemm.py tests/test_shuffle.py ;;
    bench-quick)
        timeout 240 python3 benchmarks/bench_gemm.py --models llama2-7b --m 1,16,32,64,128,256,1024 --variants baseline \
            --paths default,mma,dense --peers none --out "$OUT/bench_quick" >"$OUT/bench_quick.log" 2>&1
        echo "bench-quick rc $?" | tee -a "$SUMMARY"
        grep -A 12 "^model" "$OUT/bench_quick.log" | head -n 10 | tee -a "$SUMMARY"
        ;;
    bench)
        model=$1
        shift
        ms=${1:-1,16,32,64,128,256,1024}
        [ $# -gt 0 ] && shift
        timeout 480 python3 benchmarks/bench_gemm.py --models "$model" --m "$ms" --variants baseline --paths default \
            --out "$OUT/bench_$model" >"$OUT/bench_$model.log" 2>&1
        echo "bench $model rc $?" | tee -a "$SUMMARY"
        grep -A 12 "^model" "$OUT/bench_$model.log" | head -n 10 | tee -a "$SUMMARY"
        ;;
    peers-smoke)
        timeout 240 python3 benchmarks/probes/peers_smoke.py >"$OUT/peers_smoke.log" 2>&1
        echo "peers-smoke rc $?" | tee -a "$SUMMARY"
        tail -n 25 "$OUT/peers_smoke.log" | tee -a "$SUMMARY"
        ;;
    invariance)  # batch invariance probe (issue 14)
        timeout 240 python3 benchmarks/probes/invariance_probe.py >"$OUT/invariance.log" 2>&1
        echo "invariance rc $?" | tee -a "$SUMMARY"
        tail -n 30 "$OUT/invariance.log" | cut -c1-400 | tee -a "$SUMMARY"
        ;;
    selfcheck)
        timeout 120 python3 -m opt4gptq >"$OUT/selfcheck.log" 2>&1
        echo "selfcheck rc $?: $(tail -n 1 "$OUT/selfcheck.log")" | tee -a "$SUMMARY"
        ;;
    *) echo "unknown stage $stage" | tee -a "$SUMMARY" ;;
    esac
done
echo "==== summary"
cat "$SUMMARY"

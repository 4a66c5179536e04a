#!/bin/bash
# gpu_run.sh - everything one session on a GPU machine should do, in one
# command: build, full check, sanitizers, bandwidth, and the same bench
# (plus a quick check) for three tuning variants of the rows kernels'
# launch geometry.  Logs go to $OUT (default /tmp/hkv_out); a short
# summary is printed last.
#
#   CC=/usr/bin/gcc CXX=/usr/bin/g++ tests/cuda/gpu_run.sh
set -u
cd "$(dirname "$0")"
OUT=${OUT:-/tmp/hkv_out}
mkdir -p "$OUT"
CC=${CC:-/usr/bin/gcc}
CXX=${CXX:-/usr/bin/g++}
MK="make --no-print-directory CC=$CC CXX=$CXX"
INFO=$OUT/info.txt
VARIANTS="vA vB vC"
defs_vA="-DHKV_ROWS_SPLIT_LAYERS=0"     # one token per warp, all layers
defs_vB="-DHKV_ROWS_WARP_BYTES=8192"    # bigger token tiles
defs_vC="-DHKV_ROWS_WARP_BYTES=2048"    # smaller token tiles

{
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total \
        --format=csv 2>&1
    nvcc --version | tail -2
} > "$INFO"

# Variants build in the background while the checks run.
(
    for v in $VARIANTS; do
        eval defs=\$defs_$v
        $MK -j4 BUILD=build_$v all NVCC_DEFS="$defs"
    done
) > "$OUT/variants.txt" 2>&1 &
bg=$!

if ! $MK -j8 all >> "$INFO" 2>&1; then
    tail -30 "$INFO"
    echo "BUILD FAILED"
    exit 1
fi

timeout 150 ./build/kernel_check > "$OUT/check.log" 2>&1
check_rc=$?
grep -v '^PASS' "$OUT/check.log" | tail -20

timeout 200 $MK sanitize > "$OUT/sanitize.log" 2>&1
san_rc=$?
grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|passed|FAIL|rror' "$OUT/sanitize.log" | tail -12

timeout 60 ./build/kernel_check --bench > "$OUT/bench.log" 2>&1
wait $bg
for v in $VARIANTS; do
    if [ -x build_$v/kernel_check ]; then
        echo "== $v: $(eval echo \$defs_$v)" >> "$OUT/variants.txt"
        timeout 60 ./build_$v/kernel_check --quick > "$OUT/quick_$v.log" 2>&1
        echo "$v quick check rc=$?: $(tail -1 "$OUT/quick_$v.log")" | tee -a "$OUT/variants.txt"
        grep '^FAIL' "$OUT/quick_$v.log" | head -3
        timeout 60 ./build_$v/kernel_check --bench > "$OUT/bench_$v.log" 2>&1
    else
        echo "variant $v did not build" | tee "$OUT/bench_$v.log"
    fi
done
# The quick logs are summarized above; keep the file count under 8.
cat "$OUT"/quick_v*.log >> "$OUT/variants.txt" 2>/dev/null
rm -f "$OUT"/quick_v*.log

echo
grep '^device' "$OUT/bench.log"
echo "op          D   ps    GB/s   frac | vA GB/s  frac | vB GB/s  frac | vC GB/s  frac"
rows() { awk 'NF==8 && $2 ~ /^[0-9]+$/' "$1"; }
paste <(rows "$OUT/bench.log") <(rows "$OUT/bench_vA.log") \
      <(rows "$OUT/bench_vB.log") <(rows "$OUT/bench_vC.log") |
    awk '{printf "%-9s %4s %4s %7.0f %6.3f | %7.0f %5.3f | %7.0f %5.3f | %7.0f %5.3f\n",
          $1, $2, $3, $6, $8, $14, $16, $22, $24, $30, $32}'
echo
echo "check rc=$check_rc ($(tail -1 "$OUT/check.log")), sanitize rc=$san_rc"

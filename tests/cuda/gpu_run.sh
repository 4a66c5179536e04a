#!/bin/bash
# gpu_run.sh - everything one session on a GPU machine should do, in one
# command: build, full check, sanitizers, bandwidth (plus two tuning
# variants of the launch geometry).  Logs go to $OUT (default /tmp/hkv_out);
# a short summary is printed last.
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

{
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total \
        --format=csv 2>&1
    nvcc --version | tail -2
} > "$INFO"

# Tuning variants build in the background while the checks run.
#   vA: one layer per warp always; 8 vectors per lane in page chunks
#   vB: 2 vectors per lane in page chunks
(
    $MK -j4 BUILD=build_vA all \
        NVCC_DEFS="-DHKV_ROWS_WARPS_PER_SM=1000000 -DHKV_PAGES_VECS_PER_LANE=8"
    $MK -j4 BUILD=build_vB all NVCC_DEFS="-DHKV_PAGES_VECS_PER_LANE=2"
) >> "$OUT/variants_build.txt" 2>&1 &
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
grep -E 'ERROR SUMMARY|passed|FAIL|rror' "$OUT/sanitize.log" | tail -12

timeout 60 ./build/kernel_check --bench > "$OUT/bench.log" 2>&1
wait $bg
cat "$OUT/variants_build.txt" >> "$INFO"
rm -f "$OUT/variants_build.txt"
for v in vA vB; do
    if [ -x build_$v/kernel_check ]; then
        timeout 60 ./build_$v/kernel_check --bench > "$OUT/bench_$v.log" 2>&1
    else
        echo "variant $v did not build" > "$OUT/bench_$v.log"
    fi
done

echo
grep '^device' "$OUT/bench.log"
echo "op          D   ps    GB/s   frac | vA GB/s  frac | vB GB/s  frac"
paste <(awk 'NF==8 && $2 ~ /^[0-9]+$/' "$OUT/bench.log") \
      <(awk 'NF==8 && $2 ~ /^[0-9]+$/' "$OUT/bench_vA.log") \
      <(awk 'NF==8 && $2 ~ /^[0-9]+$/' "$OUT/bench_vB.log") |
    awk '{printf "%-9s %4s %4s %7.0f %6.3f | %7.0f %5.3f | %7.0f %5.3f\n",
          $1, $2, $3, $6, $8, $14, $16, $22, $24}'
echo
echo "check rc=$check_rc ($(tail -1 "$OUT/check.log")), sanitize rc=$san_rc"

#!/bin/sh
# Bounded fuzzing of the native CSR reader (csrc/csr.{h,cpp}); `make fuzz` runs it. Usage:
#   csrc/fuzz/run.sh [SECONDS]      (default 60; FUZZ_ENGINE=libfuzzer|driver picks the engine)
# With clang++ and libFuzzer: fuzz_csr_libfuzzer (-fsanitize=fuzzer,address,undefined) for SECONDS on a seed
# corpus of valid cases (build/fuzz/corpus); crash inputs land in build/fuzz/crashes/. Without them: the
# standalone g++ driver (AddressSanitizer + UBSan when the toolchain has them) runs random + mutated cases
# for SECONDS with a fixed seed. Either way a crash, sanitizer report or oracle failure exits non-zero.
set -eu
SECS=${1:-60}
cd "$(dirname "$0")/../.."
OUT=build/fuzz
mkdir -p "$OUT/corpus" "$OUT/crashes"
SRC="csrc/csr.cpp"
FLAGS="-std=c++17 -O1 -g -fno-omit-frame-pointer -Wno-unknown-pragmas -Icsrc"
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all"

CXX_DRIVER=${CXX:-g++}
if ! $CXX_DRIVER $FLAGS $SAN csrc/fuzz/fuzz_csr_driver.cpp $SRC -o "$OUT/fuzz_csr_driver" 2>/dev/null; then
  echo "fuzz: sanitizers unavailable for $CXX_DRIVER; building the driver without them"
  $CXX_DRIVER $FLAGS csrc/fuzz/fuzz_csr_driver.cpp $SRC -o "$OUT/fuzz_csr_driver"
fi
[ -n "$(ls -A "$OUT/corpus")" ] || "$OUT/fuzz_csr_driver" --write-seeds "$OUT/corpus"

ENGINE=${FUZZ_ENGINE:-auto}
if [ "$ENGINE" != driver ] && command -v clang++ >/dev/null 2>&1 && \
   clang++ $FLAGS -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
     csrc/fuzz/fuzz_csr_libfuzzer.cpp $SRC -o "$OUT/fuzz_csr_libfuzzer" 2>/dev/null; then
  echo "fuzz: libFuzzer + ASan/UBSan for ${SECS}s"
  rc=0
  "$OUT/fuzz_csr_libfuzzer" -max_total_time="$SECS" -max_len=4096 -print_final_stats=1 \
    -artifact_prefix="$OUT/crashes/" "$OUT/corpus" >"$OUT/libfuzzer.log" 2>&1 || rc=$?
  grep -E "^(Done|stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb))|ERROR|FAILURE|SUMMARY|artifact" \
    "$OUT/libfuzzer.log" || true
  [ "$rc" -eq 0 ] || echo "fuzz: libFuzzer failed (exit $rc); full log: $OUT/libfuzzer.log"
  exit "$rc"
fi
[ "$ENGINE" = libfuzzer ] && { echo "fuzz: clang++/libFuzzer not available (apt-get install clang)"; exit 1; }
echo "fuzz: standalone driver for ${SECS}s (no clang/libFuzzer)"
"$OUT/fuzz_csr_driver" --seconds "$SECS"

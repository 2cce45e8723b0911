// libFuzzer entry point for the native CSR reader; see fuzz_csr.h for the input encoding and the oracle.
// Build and run: csrc/fuzz/run.sh (make fuzz), which uses clang -fsanitize=fuzzer,address,undefined.
#include "fuzz_csr.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  pf_fuzz::run_one(data, size);
  return 0;
}

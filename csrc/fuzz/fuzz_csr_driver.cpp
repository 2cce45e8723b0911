// Standalone fuzz driver for the native CSR reader, for machines without clang/libFuzzer (built with g++
// and AddressSanitizer/UBSan when available). See fuzz_csr.h for the input encoding and the oracle.
//
//   fuzz_csr_driver [--seconds S] [--seed N] [--write-seeds DIR] [FILE ...]
//
// FILE arguments are run once each (reproducing a crash input). Otherwise, for S seconds (default 30), it
// runs a fixed-seed stream of cases: valid CSR matrices built from random sparse dense matrices (every
// index and value type, empty rows/shapes), the same with 1-8 mutations (bit flips, byte overwrites,
// truncation, appended bytes, a changed length/size field, an out-of-range or huge rows/cols), and raw
// random bytes. Prints cases, cases/second and how many were accepted; any oracle failure aborts.
// --write-seeds DIR writes 64 valid encoded cases as a seed corpus for libFuzzer.
#include <chrono>
#include <fstream>
#include <iostream>
#include <random>
#include <string>

#include "fuzz_csr.h"

namespace {

std::vector<uint8_t> valid_case(std::mt19937_64& rng) {
  const int it = (int)(rng() % 3), dt = (int)(rng() % 4);
  const int64_t rows = (int64_t)(rng() % 17), cols = (int64_t)(rng() % 41);
  const int es = pf::value_size(dt), is = pf::index_size(it);
  const unsigned density = (unsigned)(rng() % 5);  // 0, 25, 50, 75, 100 %
  std::vector<int64_t> indptr(1, 0);
  std::vector<uint8_t> indices, values;
  int64_t nnz = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      if (rng() % 4 >= density) continue;
      uint8_t ib[8];
      std::memcpy(ib, &c, 8);  // little-endian: the low bytes are the narrower index
      indices.insert(indices.end(), ib, ib + is);
      uint64_t v = rng();
      uint8_t vb[8];
      std::memcpy(vb, &v, 8);
      values.insert(values.end(), vb, vb + es);
      ++nnz;
    }
    indptr.push_back(nnz);
  }
  return pf_fuzz::encode(it, dt, rows, cols, indptr, indices, nnz, values, nnz);
}

void mutate(std::vector<uint8_t>& b, std::mt19937_64& rng) {
  const int n = 1 + (int)(rng() % 8);
  for (int k = 0; k < n; ++k) {
    switch (rng() % 7) {
      case 0:
        if (!b.empty()) b[rng() % b.size()] ^= (uint8_t)(1u << (rng() % 8));
        break;
      case 1:
        if (!b.empty()) b[rng() % b.size()] = (uint8_t)rng();
        break;
      case 2:
        if (!b.empty()) b.resize(rng() % b.size());
        break;
      case 3:
        for (int j = (int)(rng() % 16); j >= 0; --j) b.push_back((uint8_t)rng());
        break;
      case 4: {  // a length field (bytes 5..10 when rows/cols are u8)
        if (b.size() > 10) b[5 + rng() % 6] = (uint8_t)rng();
        break;
      }
      case 5: {  // huge or negative rows/cols: rewrite the header with i64 sizes
        if (b.size() < 5) break;
        const int64_t choices[] = {-1, 0, 1, 255, 256, 1LL << 31, 1LL << 40, 1LL << 62, INT64_MAX, INT64_MIN};
        const int64_t rows = (rng() & 1) ? choices[rng() % 10] : (int64_t)b[3];
        const int64_t cols = (rng() & 1) ? choices[rng() % 10] : (int64_t)b[4];
        std::vector<uint8_t> h = {b[0], b[1], 3};
        const uint8_t* pr = reinterpret_cast<const uint8_t*>(&rows);
        const uint8_t* pc = reinterpret_cast<const uint8_t*>(&cols);
        h.insert(h.end(), pr, pr + 8);
        h.insert(h.end(), pc, pc + 8);
        if ((b[2] & 3) == 0) h.insert(h.end(), b.begin() + 5, b.end());
        b.swap(h);
        break;
      }
      default: {  // an indptr entry (first entries after the 11-byte header) set to an edge value
        if (b.size() > 19) {
          const int64_t edge[] = {-1, 0, 1, 2, INT64_MAX, INT64_MIN, 4096, 4097};
          const int64_t v = edge[rng() % 8];
          const size_t at = 11 + 8 * (rng() % ((b.size() - 11) / 8));
          if (at + 8 <= b.size()) std::memcpy(b.data() + at, &v, 8);
        }
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 30;
  uint64_t seed = 12345;
  std::string seeds_dir;
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--seconds" && i + 1 < argc) seconds = std::stod(argv[++i]);
    else if (a == "--seed" && i + 1 < argc) seed = std::stoull(argv[++i]);
    else if (a == "--write-seeds" && i + 1 < argc) seeds_dir = argv[++i];
    else files.push_back(a);
  }
  std::mt19937_64 rng(seed);
  if (!seeds_dir.empty()) {
    for (int k = 0; k < 64; ++k) {
      auto b = valid_case(rng);
      std::ofstream(seeds_dir + "/seed" + std::to_string(k), std::ios::binary)
          .write(reinterpret_cast<const char*>(b.data()), (std::streamsize)b.size());
    }
    std::cout << "wrote 64 seeds to " << seeds_dir << "\n";
    return 0;
  }
  if (!files.empty()) {
    for (const auto& f : files) {
      std::ifstream in(f, std::ios::binary);
      std::vector<uint8_t> b((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      std::cout << f << ": " << (pf_fuzz::run_one(b.data(), b.size()) ? "accepted" : "rejected") << "\n";
    }
    return 0;
  }
  const auto t0 = std::chrono::steady_clock::now();
  uint64_t cases = 0, accepted = 0, kinds[3] = {0, 0, 0};
  double elapsed = 0;
  while (elapsed < seconds) {
    for (int k = 0; k < 256; ++k) {
      const int kind = (int)(rng() % 10);
      std::vector<uint8_t> b;
      if (kind < 3) {
        b = valid_case(rng);
        kinds[0]++;
      } else if (kind < 9) {
        b = valid_case(rng);
        mutate(b, rng);
        kinds[1]++;
      } else {
        b.resize(rng() % 256);
        for (auto& x : b) x = (uint8_t)rng();
        kinds[2]++;
      }
      accepted += (uint64_t)pf_fuzz::run_one(b.data(), b.size());
      ++cases;
    }
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  std::cout << "fuzz_csr_driver: " << cases << " cases in " << elapsed << " s (" << (uint64_t)(cases / elapsed)
            << " cases/s): " << kinds[0] << " valid, " << kinds[1] << " mutated, " << kinds[2] << " random; "
            << accepted << " accepted, " << (cases - accepted) << " rejected with an error, 0 crashes\n";
  return 0;
}

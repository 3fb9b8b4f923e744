// The codes and limits shared by Python and both extensions: the C++ side of dppa_kernels/vocab.py.
// Plain C++ (no pybind11, no CUDA headers), included by the CPU sources and by the CUDA sources,
// so both extensions compile the same numbers; each exports them (vocab_export.h) and the Python
// loader refuses an extension whose export differs from vocab.py.
#pragma once

namespace dppa {

// element dtypes
enum Dtype : int { kBF16 = 0, kF16 = 1, kF32 = 2 };
// magnitude-key modes: 16-bit x keyed in its own dtype; fp32 key; bf16 key (RNE) of another dtype;
// fp16 key of another dtype
enum KeyMode : int { kNative16 = 0, kF32Key = 1, kBF16Key = 2, kF16Key = 3 };
// apply-plan kinds and tie modes (backends/base.py)
enum PlanKind : int { kDense = 0, kThresholds = 1, kDare = 2, kMask = 3 };
enum TieMode : int { kExactK = 0, kGe = 1, kGt = 2 };
// combine (spec.CombineSpec): sum or TIES; the TIES sign election; the divisor when normalising
enum Combine : int { kCombineSum = 0, kCombineTies = 1 };
enum Elect : int { kElectWeightedSum = 0, kElectCount = 1, kElectSum = 2, kElectFrequency = 3 };
enum Divisor : int { kDivWeights = 0, kDivCount = 1, kDivNone = 2 };

constexpr int kHistBins = 1 << 15;  // bins of the 15-bit magnitude-key histogram
constexpr int kMaxLevels = 8;       // most threshold levels (DPPA bands) per plan

}  // namespace dppa

// Exports csrc/vocab.h as the module attribute VOCAB (a dict), which the Python loader compares
// with dppa_kernels/vocab.py. Included by the pybind11 binding of each extension.
#pragma once

#include <pybind11/pybind11.h>

#include "vocab.h"

namespace dppa {

inline void export_vocab(pybind11::module_& m) {
  namespace py = pybind11;
  py::dict v;
  v["dtype"] = py::dict(py::arg("bfloat16") = int(kBF16), py::arg("float16") = int(kF16),
                        py::arg("float32") = int(kF32));
  v["key_mode"] = py::dict(py::arg("native16") = int(kNative16), py::arg("f32") = int(kF32Key),
                           py::arg("bf16") = int(kBF16Key), py::arg("f16") = int(kF16Key));
  v["plan_kind"] = py::dict(py::arg("dense") = int(kDense), py::arg("thresholds") = int(kThresholds),
                            py::arg("dare") = int(kDare), py::arg("mask") = int(kMask));
  v["tie_mode"] = py::dict(py::arg("exact_k") = int(kExactK), py::arg("ge") = int(kGe), py::arg("gt") = int(kGt));
  v["combine"] = py::dict(py::arg("sum") = int(kCombineSum), py::arg("ties") = int(kCombineTies));
  v["elect"] = py::dict(py::arg("weighted_sum") = int(kElectWeightedSum), py::arg("count") = int(kElectCount),
                        py::arg("sum") = int(kElectSum), py::arg("frequency") = int(kElectFrequency));
  v["divisor"] = py::dict(py::arg("weights") = int(kDivWeights), py::arg("count") = int(kDivCount),
                          py::arg("none") = int(kDivNone));
  v["HIST_BINS"] = kHistBins;
  v["MAX_BANDS"] = kMaxLevels;
  m.attr("VOCAB") = v;
}

}  // namespace dppa

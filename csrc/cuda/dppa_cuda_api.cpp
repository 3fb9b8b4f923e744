// Python bindings of the CUDA kernels: module dppa_kernels._cuda.
//
// Plain pybind11, no torch headers: every function takes device pointers (Python ints from
// tensor.data_ptr()), sizes, dtype/key-mode codes and the CUDA stream as an integer
// (torch.cuda.current_stream().cuda_stream). Tensors are validated and allocated in Python
// (dppa_kernels/backends/cuda.py), so the module does not depend on the libtorch ABI. The GIL is
// released around launches so that threads driving several GPUs run in parallel.
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include "../vocab_export.h"
#include "dppa_cuda.h"

namespace py = pybind11;

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("dppa_kernels._cuda.") + what + ": " + cudaGetErrorString(err));
  }
}

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

template <typename T>
T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

void histogram15(std::uintptr_t x, int64_t n, int dtype, int key_mode, std::uintptr_t hist, std::uintptr_t stream) {
  if (dppa::key_bits_host(key_mode) != 15) throw std::invalid_argument("histogram15: key_mode must give a 15-bit key");
  check(dppa::radix_hist(as_ptr<const void>(x), n, dtype, key_mode, nullptr, 0, 15,
                         as_ptr<unsigned long long>(hist), as_stream(stream)),
        "histogram15");
}

void select_tensor(std::uintptr_t x, int64_t n, int dtype, int key_mode, int64_t k, std::uintptr_t hist,
                   std::uintptr_t state, std::uintptr_t out, std::uintptr_t stream) {
  check(dppa::select_tensor(as_ptr<const void>(x), n, dtype, key_mode, k, as_ptr<unsigned long long>(hist),
                            as_ptr<int64_t>(state), as_ptr<int64_t>(out), as_stream(stream)),
        "select_tensor");
}

void select_partitions(std::uintptr_t x, int64_t n, int64_t part_len, int64_t n_parts, int dtype, int key_mode,
                       std::uintptr_t k, bool scan_all, std::uintptr_t out, std::uintptr_t stream) {
  check(dppa::select_partitions(as_ptr<const void>(x), n, part_len, n_parts, dtype, key_mode,
                                as_ptr<const int64_t>(k), scan_all ? 1 : 0, as_ptr<int64_t>(out), as_stream(stream)),
        "select_partitions");
}

}  // namespace

// key_bits lives in keys.cuh (device header); a host copy for the binding's argument check.
int dppa::key_bits_host(int key_mode) { return key_mode == dppa::kF32Key ? 31 : 15; }

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "dppa_kernels CUDA kernels (raw pointers + sizes + stream; see dppa_kernels/backends/cuda.py)";
  py::call_guard<py::gil_scoped_release> nogil;
  m.def("histogram15", &histogram15, "32768-bin histogram of the 15-bit magnitude key into uint64 hist (zeroed)",
        py::arg("x"), py::arg("n"), py::arg("dtype"), py::arg("key_mode"), py::arg("hist"), py::arg("stream"), nogil);
  m.def("select_tensor", &select_tensor,
        "exact k-th largest key of the whole tensor: out[4] = (tau, c_above, c_eq, NaN/Inf keys); hist 32768 "
        "uint64 zeroed, state 5 int64",
        py::arg("x"), py::arg("n"), py::arg("dtype"), py::arg("key_mode"), py::arg("k"), py::arg("hist"),
        py::arg("state"), py::arg("out"), py::arg("stream"), nogil);
  m.def("select_partitions", &select_partitions,
        "exact k-th largest key per partition of part_len elements: out[4, P] (tau, c_above, c_eq, NaN/Inf "
        "keys; for k <= 0 counted only with scan_all); k is P int64 on the device",
        py::arg("x"), py::arg("n"), py::arg("part_len"), py::arg("n_parts"), py::arg("dtype"), py::arg("key_mode"),
        py::arg("k"), py::arg("scan_all"), py::arg("out"), py::arg("stream"), nogil);
  dppa::export_vocab(m);
}

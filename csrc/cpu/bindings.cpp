// pybind11 module dppa_kernels._cpu: raw data pointers (ints), sizes and dtype codes in, results
// written into buffers the Python wrapper allocated. No torch headers, so no libtorch ABI
// dependency. Every function releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "../vocab_export.h"
#include "common.h"

namespace py = pybind11;
using namespace dppa;

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "dppa_kernels CPU backend (OpenMP); called only through dppa_kernels.backends.cpu";
  export_vocab(m);
  m.attr("SERIAL_BELOW") = kSerialBelow;
  m.def("threads_for", &dppa::resolve_threads,
        "threads_for(nthreads, n): the threads every entry point uses for a call over n elements",
        py::arg("nthreads"), py::arg("n"));

  py::class_<PlanDesc>(m, "PlanDesc", "One model of the fused apply pass (see backends.base.ApplyPlan)")
      .def(py::init<>())
      .def_readwrite("kind", &PlanDesc::kind)
      .def_readwrite("data", &PlanDesc::data)
      .def_readwrite("dtype", &PlanDesc::dtype)
      .def_readwrite("scale", &PlanDesc::scale)
      .def_readwrite("weight", &PlanDesc::weight)
      .def_readwrite("L", &PlanDesc::L)
      .def_readwrite("key_dtype", &PlanDesc::key_dtype)
      .def_readwrite("tie_mode", &PlanDesc::tie_mode)
      .def_readwrite("K", &PlanDesc::K)
      .def_readwrite("tau", &PlanDesc::tau)
      .def_readwrite("budget", &PlanDesc::budget)
      .def_readwrite("c_eq", &PlanDesc::c_eq)
      .def_readwrite("factors", &PlanDesc::factors)
      .def_readwrite("k1", &PlanDesc::k1)
      .def_readwrite("k2", &PlanDesc::k2)
      .def_readwrite("thr32", &PlanDesc::thr32)
      .def_readwrite("mask", &PlanDesc::mask);

  py::class_<CombineDesc>(m, "CombineDesc", "How the M values are combined (see spec.CombineSpec)")
      .def(py::init<>())
      .def_readwrite("combine", &CombineDesc::combine)
      .def_readwrite("elect", &CombineDesc::elect)
      .def_readwrite("divisor", &CombineDesc::divisor)
      .def_readwrite("normalize", &CombineDesc::normalize)
      .def_readwrite("lam", &CombineDesc::lam)
      .def_readwrite("sum_divisor", &CombineDesc::sum_divisor);

  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("select", &dppa::select, nogil,
        "select(x, dtype, n, L, key_dtype, k, tau, c_above, c_eq, scan_all, nthreads) -> nonfinite: per "
        "partition of length L, the k-th largest magnitude key and the counts above / equal (int64 outputs "
        "of length ceil(n/L)); returns whether a key it read was NaN/Inf's (scan_all: every partition read)",
        py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("L"), py::arg("key_dtype"), py::arg("k"),
        py::arg("tau"), py::arg("c_above"), py::arg("c_eq"), py::arg("scan_all"), py::arg("nthreads"));
  m.def("histogram", &dppa::histogram, nogil,
        "histogram(x, dtype, n, key_dtype, out, nthreads): int64[32768] counts of the 15-bit key",
        py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("key_dtype"), py::arg("out"), py::arg("nthreads"));
  m.def("della_mask", &dppa::della_mask, nogil,
        "della_mask(x, dtype, n, cols, density, epsilon, k1, k2, out, nthreads): DELLA keep mask (uint8)",
        py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("cols"), py::arg("density"), py::arg("epsilon"),
        py::arg("k1"), py::arg("k2"), py::arg("out"), py::arg("nthreads"));
  m.def("apply", &dppa::apply, nogil,
        "apply(plans, base, base_dtype, combine, out, out_dtype, n, check_finite, nthreads) -> nonfinite: "
        "the fused merge pass; with check_finite, whether an fp32 result was NaN/Inf (a non-finite input, "
        "or an fp32 overflow)",
        py::arg("plans"), py::arg("base"), py::arg("base_dtype"), py::arg("combine"), py::arg("out"),
        py::arg("out_dtype"), py::arg("n"), py::arg("check_finite"), py::arg("nthreads"));
  m.def("abs_sums", &dppa::abs_sums, nogil, "abs_sums(plan, n, nthreads) -> [sum |x|, sum |f x|] (float64)",
        py::arg("plan"), py::arg("n"), py::arg("nthreads"));
}

// pybind11 bindings of vtprune._C: raw device pointers, sizes and stream handles in, nothing out.
// The Python glue in python/vtprune/cuda/<op>.py owns tensors, dtypes and streams.
#include <pybind11/pybind11.h>

#include "vtprune/ops.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "vtprune CUDA kernels (torch-free). Call through vtprune.ops, not directly: arguments are "
      "device pointers as ints, sizes, and a cudaStream_t handle as an int.";
  m.def("topk_keep_order", &vtprune::topk_keep_order, py::arg("scores"), py::arg("lengths"),
        py::arg("out"), py::arg("batch"), py::arg("n"), py::arg("k"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "out[b] = positions of the k highest scores[b, :lengths[b]] in ascending order. scores "
        "[B, n] float32, lengths [B] int64 or 0, out [B, k] int64; all contiguous on one device.");
}

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
  m.def(
      "attention_scores", &vtprune::attention_scores, py::arg("q"), py::arg("k"),
      py::arg("query_spans"), py::arg("key_spans"), py::arg("key_padding_mask"), py::arg("lse"),
      py::arg("partial"), py::arg("out"), py::arg("batch"), py::arg("heads"), py::arg("kv_heads"),
      py::arg("length"), py::arg("head_dim"), py::arg("max_queries"), py::arg("max_keys"),
      py::arg("scale"), py::arg("causal"), py::arg("dtype"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "out[b] = column attention scores of the key span (docs/ops.md#attention_scores). q [B, H, "
      "L, d], k [B, Hkv, "
      "L, d]; workspaces lse float [B, H, max(max_queries, 2 ceil(L / 64))], partial float [B, H, "
      "max_keys]; out "
      "float [B, max_keys]; dtype 0 fp32, 1 fp16, 2 bf16.");
  m.def("attention_with_scores", &vtprune::attention_with_scores, py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("query_spans"), py::arg("key_spans"), py::arg("key_padding_mask"),
        py::arg("out"), py::arg("lse"), py::arg("partial"), py::arg("scores"), py::arg("batch"),
        py::arg("heads"), py::arg("kv_heads"), py::arg("length"), py::arg("head_dim"),
        py::arg("value_dim"), py::arg("max_keys"), py::arg("scale"), py::arg("causal"),
        py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Attention output out [B, H, L, dv] plus the column scores [B, max_keys]; workspaces lse "
        "float [B, H, L], partial float [B, H, max_keys].");
  m.def("contextual_merge", &vtprune::contextual_merge, py::arg("x"), py::arg("metric"),
        py::arg("keep_idx"), py::arg("lengths"), py::arg("target_idx"), py::arg("target_inv_norm"),
        py::arg("choice"), py::arg("out"), py::arg("batch"), py::arg("n"), py::arg("dim"),
        py::arg("metric_dim"), py::arg("k"), py::arg("num_contextual"), py::arg("x_dtype"),
        py::arg("metric_dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "out [B, k + C, D] = dominant rows then contextual tokens (docs/ops.md#contextual_merge); "
        "target_idx int64 "
        "[B, C]; workspaces target_inv_norm float [B, C], choice int32 [B, N].");
  m.def("lowrank_scores", &vtprune::lowrank_scores, py::arg("a"), py::arg("b"),
        py::arg("visual_spans"), py::arg("key_padding_mask"), py::arg("lse"), py::arg("partial"),
        py::arg("out"), py::arg("batch"), py::arg("length"), py::arg("rank"), py::arg("max_visual"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "ALVTS selector scores out float [B, max_visual] (docs/ops.md#lowrank_scores) from fp32 "
        "projections a = h U, "
        "b = h V [B, L, R]; workspaces lse float [B, L], partial float [2, B, max_visual].");
  m.def(
      "lowrank_project", &vtprune::lowrank_project, py::arg("h"), py::arg("u"), py::arg("v"),
      py::arg("a"), py::arg("b"), py::arg("rows"), py::arg("dim"), py::arg("rank"),
      py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "lowrank_scores' projections on the tensor cores: a = h U, b = h V float [M, R] from 16-bit "
      "h [M, D], U, V [D, R] (one dtype, contiguous, 16-byte aligned, D and R multiples of 8).");
  m.def("routed_gather_rmsnorm", &vtprune::routed_gather_rmsnorm, py::arg("x"), py::arg("idx"),
        py::arg("weight"), py::arg("out"), py::arg("batch"), py::arg("length"), py::arg("routed"),
        py::arg("dim"), py::arg("batch_stride"), py::arg("row_stride"), py::arg("eps"),
        py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "routed_layer's first read (docs/ops.md#routed_layer): out [B, K, D] = RMSNorm(x[b, "
        "idx[b]]); x [B, L, D] "
        "with the given batch / row strides, idx int64 [B, K], weight [D].");
  m.def("routed_gather_add_rmsnorm", &vtprune::routed_gather_add_rmsnorm, py::arg("x"),
        py::arg("idx"), py::arg("delta"), py::arg("weight"), py::arg("out"), py::arg("batch"),
        py::arg("length"), py::arg("routed"), py::arg("dim"), py::arg("batch_stride"),
        py::arg("row_stride"), py::arg("eps"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "delta [B, K, D] <- x[b, idx[b]] + delta in place; out [B, K, D] = RMSNorm(delta).");
  m.def("routed_add_scatter", &vtprune::routed_add_scatter, py::arg("x"), py::arg("idx"),
        py::arg("mid"), py::arg("delta"), py::arg("batch"), py::arg("length"), py::arg("routed"),
        py::arg("dim"), py::arg("batch_stride"), py::arg("row_stride"), py::arg("dtype"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "routed_layer's last write: x[b, idx[b]] = mid + delta in place (mid, delta [B, K, D]).");
}

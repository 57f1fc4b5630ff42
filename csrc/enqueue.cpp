// fastmoco::enqueue_: MoCo's dequeue-and-enqueue as one in-place circular write.
//
//   queue[(ptr + b) % K, :] = keys[b, :]   for b = 0..B-1,   then   ptr = (ptr + B) % K
//
// The schema is defined once here, with the CPU kernel; the CUDA kernel lives in
// enqueue_cuda.cu and is registered only when the extension is built with CUDA
// (FASTMOCO_WITH_CUDA). The fake (meta) implementation for torch.compile is registered in
// Python (fastmoco/ops/enqueue.py), as pytorch/extension-cpp does.
//
// Any 1 <= B <= K works (the official MoCo asserts K % B == 0): a batch that runs past the
// end of the queue wraps around. B <= K keeps the destination rows distinct.
// The pointer must lie in [0, K) (enqueue_ keeps it there): on CPU a pointer outside
// raises ValueError before any write; on CUDA the kernel stops with a device-side assert
// (enqueue_cuda.cu), since reading it on the host would be a sync.

#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include "enqueue.h"

// `import fastmoco._C` loads this library and so runs the TORCH_LIBRARY registrations
// below; the Python module itself is empty (the op is reached as torch.ops.fastmoco.enqueue_).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace fastmoco {

void check_enqueue_inputs(const at::Tensor& queue, const at::Tensor& ptr, const at::Tensor& keys) {
  TORCH_CHECK_VALUE(queue.dim() == 2,
      "fastmoco::enqueue_: queue must be 2-D (K, C), got ", queue.dim(),
      "-D; for the official (C, K) buffer pass buf.T");
  TORCH_CHECK_VALUE(keys.dim() == 2,
      "fastmoco::enqueue_: keys must be 2-D (B, C), got ", keys.dim(), "-D");
  const int64_t K = queue.size(0), C = queue.size(1), B = keys.size(0);
  TORCH_CHECK_VALUE(K >= 1, "fastmoco::enqueue_: queue has no rows (K = 0)");
  TORCH_CHECK_VALUE(keys.size(1) == C,
      "fastmoco::enqueue_: keys have C = ", keys.size(1), " columns but the queue has C = ", C);
  TORCH_CHECK_VALUE(B <= K,
      "fastmoco::enqueue_: keys has B = ", B, " rows but the queue holds only K = ", K,
      "; enqueue at most K keys at a time");
  TORCH_CHECK_VALUE(keys.scalar_type() == queue.scalar_type(),
      "fastmoco::enqueue_: keys dtype ", keys.scalar_type(), " differs from the queue's ",
      queue.scalar_type(), "; cast the keys to the queue's dtype first");
  TORCH_CHECK_VALUE(ptr.scalar_type() == at::kLong && ptr.numel() == 1,
      "fastmoco::enqueue_: ptr must be a 1-element int64 tensor, got dtype ",
      ptr.scalar_type(), " with ", ptr.numel(), " elements");
  TORCH_CHECK_VALUE(ptr.device() == queue.device() && keys.device() == queue.device(),
      "fastmoco::enqueue_: queue, ptr and keys must be on one device, got ", queue.device(),
      ", ", ptr.device(), " and ", keys.device());
}

// CPU: the pointer is host memory, so reading it is free, and it is checked before any
// write: a pointer outside [0, K) was set or restored by hand (enqueue_ keeps it in range),
// and taking it modulo K would hide that. Two slice copies (before and after the wrap)
// handle any strides and the three floating dtypes.
void enqueue_cpu(at::Tensor& queue, at::Tensor& ptr, const at::Tensor& keys) {
  check_enqueue_inputs(queue, ptr, keys);
  const int64_t K = queue.size(0), B = keys.size(0);
  int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t start = *p;
  TORCH_CHECK_VALUE(0 <= start && start < K, "fastmoco::enqueue_: ptr = ", start,
      " is outside [0, K) = [0, ", K, "): " FASTMOCO_POINTER_FIX);
  const int64_t first = std::min(B, K - start);  // rows that fit before the end
  if (first > 0) queue.narrow(0, start, first).copy_(keys.narrow(0, 0, first));
  if (B > first) queue.narrow(0, 0, B - first).copy_(keys.narrow(0, first, B - first));
  *p = (start + B) % K;
}

TORCH_LIBRARY(fastmoco, m) {
  m.def("enqueue_(Tensor(a!) queue, Tensor(b!) ptr, Tensor keys) -> ()");
}

TORCH_LIBRARY_IMPL(fastmoco, CPU, m) {
  m.impl("enqueue_", &enqueue_cpu);
}

}  // namespace fastmoco

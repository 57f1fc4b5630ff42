// Shared between enqueue.cpp (schema, CPU kernel) and enqueue_cuda.cu (CUDA kernel).
#pragma once

#include <ATen/ATen.h>

namespace fastmoco {

// Raises ValueError (c10::ValueError) naming the problem: shapes, B > K, dtypes, devices.
void check_enqueue_inputs(const at::Tensor& queue, const at::Tensor& ptr, const at::Tensor& keys);

}  // namespace fastmoco

// Shared between enqueue.cpp (schema, CPU kernel) and enqueue_cuda.cu (CUDA kernel).
#pragma once

#include <ATen/ATen.h>

// What to do about a pointer outside [0, K), said by the CPU error and the CUDA kernel's
// message alike (a macro: a string literal that device code can print too).
#define FASTMOCO_POINTER_FIX                                                                \
  "the pointer is the queue row the next key goes to and enqueue_ keeps it in range, so it " \
  "was set or restored elsewhere (e.g. with a queue of another size K); reset it with "      \
  "ptr.zero_() or set it below K"

namespace fastmoco {

// Raises ValueError (c10::ValueError) naming the problem: shapes, B > K, dtypes, devices.
// The pointer's value is not read here (on CUDA it lives on the device): each kernel checks it.
void check_enqueue_inputs(const at::Tensor& queue, const at::Tensor& ptr, const at::Tensor& keys);

}  // namespace fastmoco

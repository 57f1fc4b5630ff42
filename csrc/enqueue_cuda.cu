// fastmoco::enqueue_ on CUDA: the circular write without reading the pointer on the host.
//
//   queue[(ptr + b) % K, c] = keys[b, c]   for b < B, c < C,   then   ptr = (ptr + B) % K
//
// Every thread reads *ptr from device memory, so nothing is synchronised with the host and
// the call can be captured in a CUDA graph (ptr's address is static, its value is not baked
// in). Two launches on the current stream: the copy, then a one-thread kernel that advances
// ptr. A single launch would need the last block to advance ptr after every block has read
// it, i.e. a grid-wide barrier or a global retirement counter, and such a counter is shared
// by concurrent launches on other streams; the second launch costs ~2 us and no bytes.
//
// Cost model: B*C elements read and written once, 2 * B * C * sizeof(scalar_t) bytes.
// Element order follows the queue's unit stride: along C for a (K, C) row-major queue,
// along B for the official (C, K) buffer passed as buf.T, so writes stay coalesced.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// c10/cuda only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a minimal
// toolkit (nvcc + cudart, all this file needs) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "enqueue.h"

namespace fastmoco {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, bool kRowsContiguous>
__global__ void enqueue_copy_kernel(
    scalar_t* __restrict__ queue, const int64_t* __restrict__ ptr,
    const scalar_t* __restrict__ keys,
    int64_t K, int64_t B, int64_t C,
    int64_t queue_stride_k, int64_t queue_stride_c,
    int64_t keys_stride_b, int64_t keys_stride_c) {
  const int64_t start = ((*ptr % K) + K) % K;
  const int64_t n = B * C;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = kRowsContiguous ? i / C : i % B;
    const int64_t c = kRowsContiguous ? i % C : i / B;
    int64_t row = start + b;
    row = row >= K ? row - K : row;  // b < B <= K, so one subtraction wraps
    queue[row * queue_stride_k + c * queue_stride_c] = keys[b * keys_stride_b + c * keys_stride_c];
  }
}

__global__ void enqueue_advance_kernel(int64_t* ptr, int64_t K, int64_t B) {
  *ptr = (((*ptr % K) + K) % K + B) % K;
}

void enqueue_cuda(at::Tensor& queue, at::Tensor& ptr, const at::Tensor& keys) {
  check_enqueue_inputs(queue, ptr, keys);
  const c10::cuda::CUDAGuard guard(queue.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t K = queue.size(0), C = queue.size(1), B = keys.size(0);
  if (B > 0 && C > 0) {
    const int64_t n = B * C;
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, queue.get_device()));
    const int64_t max_blocks = 8 * static_cast<int64_t>(sms);  // grid-stride beyond that
    const int blocks = static_cast<int>(std::min((n + kThreads - 1) / kThreads, max_blocks));
    const bool rows_contiguous = queue.stride(1) == 1 || queue.stride(0) != 1;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, queue.scalar_type(), "fastmoco_enqueue_", [&] {
          auto launch = [&](auto kernel) {
            kernel<<<blocks, kThreads, 0, stream>>>(
                queue.data_ptr<scalar_t>(), ptr.data_ptr<int64_t>(), keys.data_ptr<scalar_t>(),
                K, B, C, queue.stride(0), queue.stride(1), keys.stride(0), keys.stride(1));
          };
          if (rows_contiguous) {
            launch(enqueue_copy_kernel<scalar_t, true>);
          } else {
            launch(enqueue_copy_kernel<scalar_t, false>);
          }
        });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  enqueue_advance_kernel<<<1, 1, 0, stream>>>(ptr.data_ptr<int64_t>(), K, B);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmoco, CUDA, m) {
  m.impl("enqueue_", &enqueue_cuda);
}

}  // namespace fastmoco

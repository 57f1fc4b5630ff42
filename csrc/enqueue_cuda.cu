// fastmoco::enqueue_ on CUDA: the circular write without reading the pointer on the host.
//
//   queue[(ptr + b) % K, c] = keys[b, c]   for b < B, c < C,   then   ptr = (ptr + B) % K
//
// Every thread reads *ptr from device memory, so nothing is synchronised with the host and
// the call can be captured in a CUDA graph (ptr's address is static, its value is not baked
// in). For the same reason a pointer outside [0, K) cannot raise on the host: the kernel
// prints it (thread 0 of each block, with the fix) and stops with a device-side assert,
// which the next synchronising call reports as "device-side assert triggered" (the CUDA
// context is then unusable, as after any device assert). Where device asserts are compiled
// out (TORCH_DISABLE_GPU_ASSERTS) the start is still reduced modulo K, so the writes stay
// inside the queue.
//
// Which launch is used when (enqueue_cuda below):
//   - keys of up to kOneBlockMaxBytes (128 KiB: MoCo's B = 256, C = 128 in fp32 or bf16):
//     ONE launch of ONE block. Its threads copy, __syncthreads(), then thread 0 advances
//     ptr: every read of *ptr in the block happened before the barrier, so no thread sees
//     the new value. One SM moves such a batch (read + write) in about 2 us at the ~100 GB/s
//     one SM can sustain (an estimate, not yet measured), about what a second launch
//     costs, and the call is one node in a CUDA graph.
//   - larger batches: the copy on a grid of up to 8 blocks per SM (one block would be
//     bandwidth-bound on one SM), then a one-thread launch that advances ptr. One launch
//     would need a grid-wide barrier (a cooperative launch limits the grid and needs
//     cudaLaunchCooperativeKernel's extra host work) or a global retirement counter shared
//     with concurrent launches on other streams; for these sizes the copy dominates and the
//     second launch costs ~2 us and no bytes.
//
// Element order: when queue and keys are both row-contiguous (queue (K, C) row-major, keys
// contiguous) and every row starts 16-byte aligned, the rows before and after the wrap are
// two contiguous ranges copied as 16-byte vectors (uint4). Otherwise one element at a time,
// following the queue's unit stride: along C for a row-major queue, along B for the official
// (C, K) buffer passed as buf.T, so writes stay coalesced.
//
// Cost model: B*C elements read and written once, 2 * B * C * sizeof(scalar_t) bytes.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// c10/cuda only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a minimal
// toolkit (nvcc + cudart, all this file needs) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdio>

#include "enqueue.h"

namespace fastmoco {
namespace {

constexpr int kThreads = 256;          // per block of the multi-block copy
constexpr int kOneBlockThreads = 1024;  // the single block: as many threads as one block has
constexpr int64_t kOneBlockMaxBytes = 128 << 10;

enum class Order { kVector16, kRows, kColumns };

struct Args {
  char* queue;  // char*: the vector path counts in 16-byte units
  const char* keys;
  int64_t* ptr;
  int64_t K, B, C;
  int64_t queue_stride_k, queue_stride_c, keys_stride_b, keys_stride_c;
};

// The first row to write: *ptr, which must lie in [0, K) (see the top of the file).
__device__ __forceinline__ int64_t queue_start(const Args& a) {
  const int64_t p = *a.ptr;
  if (threadIdx.x == 0 && (p < 0 || p >= a.K)) {  // one message per block, not per thread
    printf("fastmoco::enqueue_: ptr = %lld is outside [0, K) = [0, %lld): " FASTMOCO_POINTER_FIX
           "\n", static_cast<long long>(p), static_cast<long long>(a.K));
    CUDA_KERNEL_ASSERT(p >= 0 && p < a.K);
  }
  return ((p % a.K) + a.K) % a.K;
}

// This thread's share of the batch: elements (or 16-byte vectors) i, i + step, ...
template <typename scalar_t, Order kOrder>
__device__ __forceinline__ void copy_share(const Args& a, int64_t start, int64_t i, int64_t step) {
  if constexpr (kOrder == Order::kVector16) {
    // Rows start .. min(K, start + B) - 1, then rows 0 .. : two contiguous byte ranges.
    constexpr int64_t kPer = 16 / sizeof(scalar_t);
    constexpr int kUnroll = 4;  // 4 loads in flight per thread before their stores
    const int64_t row_vectors = a.C / kPer;
    const int64_t first = a.B < a.K - start ? a.B : a.K - start;  // rows before the end
    const int64_t n1 = first * row_vectors, n = a.B * row_vectors;
    const uint4* keys = reinterpret_cast<const uint4*>(a.keys);
    uint4* queue = reinterpret_cast<uint4*>(a.queue);
    const int64_t head = start * row_vectors;  // vector i < n1 goes to head + i, else i - n1
    for (; i < n; i += kUnroll * step) {
      uint4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = i + u * step;
        if (j < n) v[u] = keys[j];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = i + u * step;
        if (j < n) queue[j < n1 ? head + j : j - n1] = v[u];
      }
    }
  } else {
    scalar_t* queue = reinterpret_cast<scalar_t*>(a.queue);
    const scalar_t* keys = reinterpret_cast<const scalar_t*>(a.keys);
    const int64_t n = a.B * a.C;
    for (; i < n; i += step) {
      const int64_t b = kOrder == Order::kRows ? i / a.C : i % a.B;
      const int64_t c = kOrder == Order::kRows ? i % a.C : i / a.B;
      int64_t row = start + b;
      row = row >= a.K ? row - a.K : row;  // b < B <= K, so one subtraction wraps
      queue[row * a.queue_stride_k + c * a.queue_stride_c] =
          keys[b * a.keys_stride_b + c * a.keys_stride_c];
    }
  }
}

// One block: copy, barrier, advance. The whole call in one launch.
template <typename scalar_t, Order kOrder>
__global__ void enqueue_one_block_kernel(Args a) {
  const int64_t start = queue_start(a);
  copy_share<scalar_t, kOrder>(a, start, threadIdx.x, blockDim.x);
  __syncthreads();  // every thread has read *ptr (in queue_start) before it changes
  if (threadIdx.x == 0) *a.ptr = (start + a.B) % a.K;
}

// Many blocks: the copy only; enqueue_advance_kernel follows on the same stream.
template <typename scalar_t, Order kOrder>
__global__ void enqueue_copy_kernel(Args a) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  copy_share<scalar_t, kOrder>(a, queue_start(a), blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x, step);
}

// Runs after enqueue_copy_kernel, which has checked *ptr (modulo K as in queue_start).
__global__ void enqueue_advance_kernel(int64_t* ptr, int64_t K, int64_t B) {
  *ptr = (((*ptr % K) + K) % K + B) % K;
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <typename scalar_t>
Order copy_order(const at::Tensor& queue, const at::Tensor& keys) {
  const int64_t C = queue.size(1);
  const bool rows_contiguous = (queue.stride(1) == 1 && queue.stride(0) == C) &&
                               (keys.stride(1) == 1 && keys.stride(0) == C);
  if (rows_contiguous && (C * sizeof(scalar_t)) % 16 == 0 && aligned16(queue.data_ptr()) &&
      aligned16(keys.data_ptr())) {
    return Order::kVector16;
  }
  return (queue.stride(1) == 1 || queue.stride(0) != 1) ? Order::kRows : Order::kColumns;
}

template <typename scalar_t, Order kOrder>
void launch(const Args& a, int64_t n, bool one_block, int sms, cudaStream_t stream) {
  if (one_block) {
    enqueue_one_block_kernel<scalar_t, kOrder><<<1, kOneBlockThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t max_blocks = 8 * static_cast<int64_t>(sms);  // grid-stride beyond that
  const int blocks = static_cast<int>(std::min((n + kThreads - 1) / kThreads, max_blocks));
  enqueue_copy_kernel<scalar_t, kOrder><<<blocks, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  enqueue_advance_kernel<<<1, 1, 0, stream>>>(a.ptr, a.K, a.B);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void enqueue_cuda(at::Tensor& queue, at::Tensor& ptr, const at::Tensor& keys) {
  check_enqueue_inputs(queue, ptr, keys);
  const c10::cuda::CUDAGuard guard(queue.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t K = queue.size(0), C = queue.size(1), B = keys.size(0);
  const bool one_block = B * C * static_cast<int64_t>(keys.element_size()) <= kOneBlockMaxBytes;
  int sms = 0;
  if (!one_block) {
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, queue.get_device()));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, queue.scalar_type(), "fastmoco_enqueue_", [&] {
        const Args a{static_cast<char*>(queue.data_ptr()),
                     static_cast<const char*>(keys.data_ptr()),
                     ptr.data_ptr<int64_t>(),
                     K, B, C,
                     queue.stride(0), queue.stride(1), keys.stride(0), keys.stride(1)};
        const Order order = copy_order<scalar_t>(queue, keys);
        const int64_t n = order == Order::kVector16
                              ? B * C * static_cast<int64_t>(sizeof(scalar_t)) / 16
                              : B * C;
        if (order == Order::kVector16) {
          launch<scalar_t, Order::kVector16>(a, n, one_block, sms, stream);
        } else if (order == Order::kRows) {
          launch<scalar_t, Order::kRows>(a, n, one_block, sms, stream);
        } else {
          launch<scalar_t, Order::kColumns>(a, n, one_block, sms, stream);
        }
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmoco, CUDA, m) {
  m.impl("enqueue_", &enqueue_cuda);
}

}  // namespace fastmoco

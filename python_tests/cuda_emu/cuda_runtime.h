// A stand-in for <cuda_runtime.h> that runs csrc/cuda/xbar_kernel.cu on the CPU, so that the
// kernel's logic (tiling, shared-memory staging, barriers, dp4a, ADC) is tested without a GPU
// (python_tests/test_cuda_emulated.py).  Blocks run one after another, each CUDA thread of a
// block is a std::thread, __shared__ variables are statics shared by those threads.
#pragma once
#include <atomic>
#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
typedef int cudaError_t;
typedef void* cudaStream_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

inline thread_local dim3 threadIdx, blockIdx;
inline std::barrier<>* emu_block_barrier = nullptr;
inline std::atomic<int> emu_or_flag{0};

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

inline int __syncthreads_or(int pred) {
  __syncthreads();  // the flag's previous use is over
  if (pred) emu_or_flag = 1;
  __syncthreads();
  const int any = emu_or_flag;
  __syncthreads();  // everyone has read it before it is reset
  if (threadIdx.x == 0 && threadIdx.y == 0) emu_or_flag = 0;
  return any;
}

inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
  for (int i = 0; i < 4; ++i) c += ((a >> (8 * i)) & 255u) * ((b >> (8 * i)) & 255u);
  return c;
}

// Replaces `kernel<<<grid, block, 0, stream>>>(args...)` (the test rewrites the launch syntax).
template <typename Kernel, typename... Args>
void emu_launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::barrier<> barrier(block.x * block.y);
      emu_block_barrier = &barrier;
      std::vector<std::thread> threads;
      for (unsigned ty = 0; ty < block.y; ++ty)
        for (unsigned tx = 0; tx < block.x; ++tx)
          threads.emplace_back([=] {
            threadIdx = dim3(tx, ty);
            blockIdx = dim3(bx, by);
            kernel(args...);
          });
      for (auto& t : threads) t.join();
    }
  }
}

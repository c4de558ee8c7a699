// Kernel launches written once for both builds of csrc/*.cu:
//   FB_LAUNCH((kernel<T, 1>), grid, block, smem_bytes, stream, args...)
// nvcc: kernel<<<grid, block, smem_bytes, stream>>>(args...) and a launch-error check that throws
// std::runtime_error with CUDA's error string; emu build (FASTBONE_EMU): a synchronous run on the
// host fiber emulator (csrc/emu/cuda_emu.h), which throws std::runtime_error on failure too.
// FB_STREAM(uintptr) turns the integer stream passed from Python into a cudaStream_t.
// FB_DYNAMIC_SMEM(T, name) declares `T* name` pointing at the launch's dynamic shared memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#define FB_STREAM(s) (reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(s)))

#ifdef FASTBONE_EMU

#define FB_LAUNCH(kernel, grid, block, smem_bytes, stream, ...)                                   \
  do {                                                                                            \
    (void)(stream);                                                                               \
    ::fb_emu::launch_named(#kernel, kernel, grid, block, smem_bytes, ##__VA_ARGS__);              \
  } while (0)
#define FB_DYNAMIC_SMEM(T, name) T* name = static_cast<T*>(::fb_emu::dynamic_smem())

#else

#include <cuda_runtime.h>

namespace fb_launch_detail {
template <typename... Params, typename... Args>
inline void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                   cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("CUDA launch of ") + name + " failed: " + cudaGetErrorString(err) +
                             " (grid " + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                             std::to_string(grid.z) + ", block " + std::to_string(block.x) + "," +
                             std::to_string(block.y) + "," + std::to_string(block.z) + ")");
}
}  // namespace fb_launch_detail

#define FB_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ::fb_launch_detail::launch(#kernel, kernel, grid, block, smem_bytes, stream, ##__VA_ARGS__)
#define FB_DYNAMIC_SMEM(T, name)                                     \
  extern __shared__ __align__(16) unsigned char fb_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(fb_dynamic_smem_)

#endif

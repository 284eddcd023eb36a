// TEST TOOL, not a backend: a host emulation of the CUDA built-ins that
// ddetr_tutorial/ops/csrc/ms_deform_attn_cuda_kernel.cuh uses, so that the
// unmodified kernels compile with g++ and run on a CPU (tests/test_cuda_emulation.py).
//
// Execution model (emu::launch): every CUDA thread of a block is a fiber (a
// ucontext with its own stack) on one OS thread; the blocks of a grid run one
// after another, so one static array serves as the block's shared memory.
// __syncthreads() is a barrier of the block's fibers and a warp shuffle is a
// write / barrier / read among the warp's 32. A fiber runs until it waits at
// a barrier, then the next one runs: each thread gets as far ahead of the
// others as the kernel's barriers allow, so a missing __syncthreads shows up
// as a read of unwritten shared memory (filled with garbage before each
// block) on every run, not by chance. A barrier that some thread never
// reaches is reported at once instead of hanging. Fibers rather than OS
// threads: 256 OS threads per block on a 2-core CI machine spend their time
// in the kernel's scheduler, fibers switch in user space.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// ---------------------------------------------------------------------------
// Qualifiers: host functions. __CUDACC__ and __CUDA_ARCH__ stay undefined, so
// the kernel headers take their host paths (DDETR_HD is plain inline).

#define __global__
#define __device__
#define __host__
#define __shared__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

// ---------------------------------------------------------------------------
// Vector types, with CUDA's alignment (UBSan checks every access against it).

struct __attribute__((aligned(16))) uint4 {
  unsigned x, y, z, w;
};
struct __attribute__((aligned(8))) uint2 {
  unsigned x, y;
};
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct __attribute__((aligned(8))) float2 {
  float x, y;
};
struct __attribute__((aligned(16))) float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------
// Bit casts.

inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
inline int __double2loint(double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof(b));
  return static_cast<int>(static_cast<uint32_t>(b));
}
inline int __double2hiint(double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof(b));
  return static_cast<int>(static_cast<uint32_t>(b >> 32));
}

// ---------------------------------------------------------------------------
// 16-bit floats: storage only, as the kernels use them (converted to float to
// compute). The conversions are checked against torch's by the test.

struct __half {
  unsigned short bits;
};
struct __nv_bfloat16 {
  unsigned short bits;
};

inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu, mant = h.bits & 0x3ffu;
  if (exp == 0x1f) return __uint_as_float(sign | 0x7f800000u | (mant << 13));  // inf, NaN
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  return __uint_as_float(sign | ((exp + 112) << 23) | (mant << 13));
}

// Round to nearest, ties to even.
inline __half __float2half_rn(float f) {
  const uint32_t x = __float_as_uint(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  uint32_t h;
  if (a > 0x7f800000u) {
    h = 0x7e00u;  // NaN
  } else if (a >= 0x477ff000u) {
    h = 0x7c00u;  // 65520 and up round to infinity
  } else if (a < 0x38800000u) {
    // Below 2^-14: a subnormal half, mant = round(|f| * 2^24) (exact scaling).
    h = static_cast<uint32_t>(std::nearbyint(__uint_as_float(a) * 16777216.0f));
  } else {
    const uint32_t rounded = a + 0x0fffu + ((a >> 13) & 1u);  // ties to even on 13 bits
    h = (rounded - 0x38000000u) >> 13;                         // rebias 127 -> 15
  }
  return __half{static_cast<unsigned short>(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  return __uint_as_float(static_cast<uint32_t>(b.bits) << 16);
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = __float_as_uint(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    return __nv_bfloat16{static_cast<unsigned short>((x >> 16) | 0x0040u)};  // quiet NaN
  }
  const uint32_t rounded = x + 0x7fffu + ((x >> 16) & 1u);
  return __nv_bfloat16{static_cast<unsigned short>(rounded >> 16)};
}

// ---------------------------------------------------------------------------
// Atomics (fetch_add of C++20; fibers never interleave inside one, and real
// atomics keep the shim correct under any scheduler).

inline float atomicAdd(float* p, float v) {
  return std::atomic_ref<float>(*p).fetch_add(v, std::memory_order_relaxed);
}
inline double atomicAdd(double* p, double v) {
  return std::atomic_ref<double>(*p).fetch_add(v, std::memory_order_relaxed);
}
// sm_90's vector atomics are atomic per element, which is what is emulated.
inline float2 atomicAdd(float2* p, float2 v) {
  return {atomicAdd(&p->x, v.x), atomicAdd(&p->y, v.y)};
}
inline float4 atomicAdd(float4* p, float4 v) {
  return {atomicAdd(&p->x, v.x), atomicAdd(&p->y, v.y), atomicAdd(&p->z, v.z),
          atomicAdd(&p->w, v.w)};
}

// ---------------------------------------------------------------------------
// The execution model.

namespace emu {

constexpr int kWarpSize = 32;
constexpr size_t kSharedCapacity = 48 * 1024;  // what a block may ask for
constexpr size_t kStackBytes = 64 * 1024;  // per fiber; ASan clears its shadow at each switch

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::fflush(stderr);
  std::_Exit(3);
}

// The fibers of the block being run, and the scheduler's context.
struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  void* fake_stack = nullptr;  // ASan's fake stack while switched out
  bool done = false;
};

// Fiber stacks, allocated once and reused by every block of every launch.
inline char* fiber_stack(unsigned i) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (stacks.size() <= i) stacks.emplace_back(new char[kStackBytes]);
  return stacks[i].get();
}

struct Scheduler {
  ucontext_t main;
  std::vector<Fiber> fibers;
  unsigned current = 0;
  uint64_t completions = 0;  // barriers completed and fibers finished: progress
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
};

inline Scheduler* sched = nullptr;

// Back to the scheduler, from a fiber; returns when the scheduler resumes it.
inline void yield() {
  Fiber& f = sched->fibers[sched->current];
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(&f.fake_stack, sched->main_stack_bottom, sched->main_stack_size);
#endif
  if (swapcontext(&f.ctx, &sched->main) != 0) fail("swapcontext failed");
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(f.fake_stack, &sched->main_stack_bottom,
                                  &sched->main_stack_size);
#endif
}

// A reusable barrier of n fibers.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void arrive_and_wait() {
    const uint64_t gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      ++sched->completions;
      return;
    }
    while (gen_ == gen) yield();
  }

 private:
  const int n_;
  int count_ = 0;
  uint64_t gen_ = 0;
};

// One warp's exchange slots for shuffles (two sets, used in turn, so that one
// barrier per shuffle suffices), and what each lane asked for.
struct Warp {
  Barrier bar{kWarpSize};
  int turn[kWarpSize] = {};
  uint64_t slot[2][kWarpSize];
  int args[2][kWarpSize][2];
};

struct Block {
  explicit Block(int threads) : sync(threads), warps(threads / kWarpSize) {}
  Barrier sync;
  std::vector<Warp> warps;
};

inline Block* current_block = nullptr;

}  // namespace emu

// The CUDA thread, block and grid of the running fiber.
inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 gridDim, blockDim;

inline void __syncthreads() { emu::current_block->sync.arrive_and_wait(); }

// Lane ^ lane_mask within segments of `width` lanes; a lane whose partner
// lies in a later segment gets its own value back (CUDA's rule).
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = emu::kWarpSize) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync: only the full mask is emulated");
  emu::Warp& warp = emu::current_block->warps[threadIdx.x / emu::kWarpSize];
  const int lane = static_cast<int>(threadIdx.x % emu::kWarpSize);
  const int t = warp.turn[lane];
  warp.turn[lane] ^= 1;
  std::memcpy(&warp.slot[t][lane], &var, sizeof(T));
  warp.args[t][lane][0] = lane_mask;
  warp.args[t][lane][1] = width;
  warp.bar.arrive_and_wait();
  for (int i = 0; i < emu::kWarpSize; ++i) {
    if (warp.args[t][i][0] != lane_mask || warp.args[t][i][1] != width) {
      emu::fail("__shfl_xor_sync: lanes of one warp disagree on lane mask or width");
    }
  }
  int src = lane ^ lane_mask;
  if (src / width > lane / width) src = lane;
  T out;
  std::memcpy(&out, &warp.slot[t][src], sizeof(T));
  return out;
}

namespace emu {

inline void fiber_entry() {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &sched->main_stack_bottom, &sched->main_stack_size);
#endif
  sched->body(sched->body_arg);
  Fiber& f = sched->fibers[sched->current];
  f.done = true;
  ++sched->completions;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(nullptr, sched->main_stack_bottom, sched->main_stack_size);
#endif
  setcontext(&sched->main);
  fail("setcontext failed");
}

// Runs body(arg) on `threads` fibers until all have returned; fails when
// every unfinished fiber waits at a barrier that cannot complete.
inline void run_fibers(unsigned threads, void (*body)(void*), void* arg) {
  Scheduler s;
  s.body = body;
  s.body_arg = arg;
  s.fibers.resize(threads);
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& f = s.fibers[i];
    f.stack = fiber_stack(i);
    if (getcontext(&f.ctx) != 0) fail("getcontext failed");
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  sched = &s;
  unsigned live = threads;
  while (live > 0) {
    const uint64_t before = s.completions;
    for (unsigned i = 0; i < threads; ++i) {
      Fiber& f = s.fibers[i];
      if (f.done) continue;
      s.current = i;
      threadIdx = uint3{i, 0, 0};
      void* fake = nullptr;
#if defined(__SANITIZE_ADDRESS__)
      __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
      if (swapcontext(&s.main, &f.ctx) != 0) fail("swapcontext failed");
#if defined(__SANITIZE_ADDRESS__)
      __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
      if (f.done) --live;
    }
    // A whole round in which no barrier completed and no fiber finished: every
    // fiber is waiting for one that is never coming.
    if (live > 0 && s.completions == before) {
      fail("deadlock: a __syncthreads or shuffle that not every thread reaches");
    }
  }
  sched = nullptr;
}

// Runs kernel() as `grid` blocks of `block` threads with `smem_bytes` of the
// shared array `smem` (capacity kSharedCapacity). Shared memory is filled with
// a garbage pattern before each block and, under ASan, poisoned past
// smem_bytes, so a read of unwritten or unrequested shared memory shows.
template <typename Kernel>
void launch(unsigned grid, unsigned block, unsigned char* smem, size_t smem_bytes,
            const Kernel& kernel) {
  if (block == 0 || block % kWarpSize != 0) fail("launch: block size is not a multiple of 32");
  if (smem_bytes > kSharedCapacity) fail("launch: more shared memory than a block has");
  gridDim = dim3{grid, 1, 1};
  blockDim = dim3{block, 1, 1};
#if defined(__SANITIZE_ADDRESS__)
  ASAN_POISON_MEMORY_REGION(smem + smem_bytes, kSharedCapacity - smem_bytes);
#endif
  for (unsigned b = 0; b < grid; ++b) {
    std::memset(smem, 0x5a, smem_bytes);
    Block ctx(static_cast<int>(block));
    current_block = &ctx;
    blockIdx = uint3{b, 0, 0};
    run_fibers(block, [](void* k) { (*static_cast<const Kernel*>(k))(); },
               const_cast<void*>(static_cast<const void*>(&kernel)));
    current_block = nullptr;
  }
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(smem + smem_bytes, kSharedCapacity - smem_bytes);
#endif
}

}  // namespace emu

// TEST TOOL, not a backend: runs the unmodified CUDA kernels of
// ms_deform_attn_cuda_kernel.cuh on the CPU (through cuda_shim.h), launched
// with the launcher's own geometry code (ms_deform_attn_cuda_geometry.h).
//
//   msda_emu CASE_DIR...       run every case, see read_case() for the files
//   msda_emu --conversions DIR the shim's fp16 / bf16 conversions, for checking
//
// A case folder holds case.txt and the raw inputs value.bin (N, S, M, D),
// shapes.bin (L, 2) int64, starts.bin (L,) int64, loc.bin (N, Lq, M, L, K, 2)
// and attn.bin (N, Lq, M, L, K) in opmath, grad_out.bin (N, Lq, M, D). The
// driver writes out.bin, grad_value.bin, grad_loc.bin, grad_attn.bin and
// geometry.txt. Outputs start as NaN (all bits set), so an element the kernels
// fail to write shows up.
#include <fstream>
#include <functional>
#include <iostream>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda_shim.h"
#include "ms_deform_attn_cuda_geometry.h"
#include "ms_deform_attn_cuda_kernel.cuh"

// The block's shared memory: the kernels' `extern __shared__ smem[]`.
namespace ddetr::msda {
alignas(16) unsigned char smem[emu::kSharedCapacity];
}

namespace {

using namespace ddetr::msda;

// A 64-byte aligned allocation (as from the CUDA caching allocator).
class Buffer {
 public:
  explicit Buffer(size_t bytes)
      : bytes_(bytes), data_(static_cast<unsigned char*>(
                           ::operator new[](bytes ? bytes : 1, std::align_val_t{64}))) {
    std::memset(data_, 0xff, bytes_);
  }
  ~Buffer() { ::operator delete[](data_, std::align_val_t{64}); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  template <typename T>
  T* as(size_t offset_elems = 0) const {
    return reinterpret_cast<T*>(data_) + offset_elems;
  }

 private:
  size_t bytes_;
  unsigned char* data_;
};

void read_file(const std::string& path, void* dst, size_t bytes) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  f.read(static_cast<char*>(dst), static_cast<std::streamsize>(bytes));
  if (static_cast<size_t>(f.gcount()) != bytes) throw std::runtime_error("short read of " + path);
}

void write_file(const std::string& path, const void* src, size_t bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(src), static_cast<std::streamsize>(bytes));
  if (!f) throw std::runtime_error("cannot write " + path);
}

struct Case {
  std::string dtype;         // float, double, half, bfloat16
  Sizes z{};                 // N S M D Lq L K
  int64_t value_offset = 0;  // elements before value's first one (a misaligned view)
  int64_t grad_offset = 0;   // the same for grad_output
  int sm_count = 132;        // the emulated device's multiprocessors (sets the grid)
};

Case read_case(const std::string& dir) {
  std::ifstream f(dir + "/case.txt");
  if (!f) throw std::runtime_error("cannot open " + dir + "/case.txt");
  Case c;
  std::string key;
  while (f >> key) {
    if (key == "dtype") {
      f >> c.dtype;
    } else if (key == "sizes") {
      f >> c.z.N >> c.z.S >> c.z.M >> c.z.D >> c.z.Lq >> c.z.L >> c.z.K;
    } else if (key == "value_offset") {
      f >> c.value_offset;
    } else if (key == "grad_offset") {
      f >> c.grad_offset;
    } else if (key == "sm_count") {
      f >> c.sm_count;
    } else {
      throw std::runtime_error("unknown key " + key + " in " + dir + "/case.txt");
    }
  }
  return c;
}

void log_geometry(std::ostream& log, const char* pass, int vec, const Shape& sh, unsigned grid,
                  size_t smem_bytes) {
  log << pass << " vec " << vec << " tpg " << sh.tpg << " n_chunks " << sh.n_chunks
      << " tile_points " << sh.tile_points << " n_tiles " << sh.n_tiles << " n_blocks "
      << sh.n_blocks << " grid " << grid << " smem " << smem_bytes << "\n";
}

template <typename T, typename Record>
unsigned checked_geometry(const Shape& sh, size_t* bytes, int sm_count) {
  *bytes = shared_bytes<Record>(sh);
  if (*bytes > static_cast<size_t>(kMaxSharedBytes)) {
    throw std::runtime_error("the launcher would refuse this case: too much shared memory");
  }
  return grid_blocks(sh, sm_count);
}

// launch_forward of ms_deform_attn_cuda.cu, with the entry point's early returns.
template <typename T>
void forward(const Case& c, const T* value, const int64_t* shapes, const int64_t* starts,
             const opmath_t<T>* loc, const opmath_t<T>* attn, T* out, std::ostream& log) {
  using Record = ForwardPoint<opmath_t<T>>;
  const Sizes& z = c.z;
  const int64_t numel = z.N * z.Lq * z.M * z.D;
  if (numel == 0) return;
  if (z.S == 0 || z.L == 0 || z.K == 0) {
    std::memset(out, 0, numel * sizeof(T));
    return;
  }
  const int vec = pick_vec(z.D, sizeof(T), {value});
  const Shape sh = make_shape<Record>(z, vec);
  size_t bytes = 0;
  const unsigned grid = checked_geometry<T, Record>(sh, &bytes, c.sm_count);
  log_geometry(log, "forward", vec, sh, grid, bytes);
  dispatch_vec<16 / sizeof(T)>(vec, [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    emu::launch(grid, kThreads, smem, bytes, [&] {
      ms_deform_attn_forward_kernel<T, VEC>(value, shapes, starts, loc, attn, out, sh);
    });
  });
}

template <typename T>
T from_opmath(opmath_t<T> x) {
  if constexpr (std::is_same_v<T, opmath_t<T>>) {
    return x;
  } else {
    T t;
    from_op(x, t);
    return t;
  }
}

// launch_backward of ms_deform_attn_cuda.cu, with the entry point's early
// returns and its final rounding of grad_value to T.
template <typename T>
void backward(const Case& c, const T* value, const int64_t* shapes, const int64_t* starts,
              const opmath_t<T>* loc, const opmath_t<T>* attn, const T* grad_out,
              T* grad_value, opmath_t<T>* grad_loc, opmath_t<T>* grad_attn, std::ostream& log) {
  using Op = opmath_t<T>;
  using Record = BackwardPoint<Op>;
  const Sizes& z = c.z;
  const int64_t n_value = z.N * z.S * z.M * z.D, n_attn = z.N * z.Lq * z.M * z.L * z.K;
  if (n_attn == 0 || z.S == 0 || z.D == 0) {
    std::memset(grad_value, 0, n_value * sizeof(T));
    std::memset(grad_loc, 0, 2 * n_attn * sizeof(Op));
    std::memset(grad_attn, 0, n_attn * sizeof(Op));
    return;
  }
  Buffer acc_buf(n_value * sizeof(Op));  // at::zeros of opmath type
  Op* acc = acc_buf.as<Op>();
  std::memset(acc, 0, n_value * sizeof(Op));
  const int vec = pick_vec(z.D, sizeof(T), {value, grad_out});
  const Shape sh = make_shape<Record>(z, vec);
  size_t bytes = 0;
  const unsigned grid = checked_geometry<T, Record>(sh, &bytes, c.sm_count);
  log_geometry(log, "backward", vec, sh, grid, bytes);
  dispatch_vec<16 / sizeof(T)>(vec, [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    emu::launch(grid, kThreads, smem, bytes, [&] {
      ms_deform_attn_backward_kernel<T, VEC>(value, shapes, starts, loc, attn, grad_out, acc,
                                             grad_loc, grad_attn, sh);
    });
  });
  for (int64_t i = 0; i < n_value; ++i) grad_value[i] = from_opmath<T>(acc[i]);
}

template <typename T>
void run_case(const Case& c, const std::string& dir) {
  using Op = opmath_t<T>;
  const Sizes& z = c.z;
  const size_t n_value = z.N * z.S * z.M * z.D, n_attn = z.N * z.Lq * z.M * z.L * z.K;
  const size_t n_out = z.N * z.Lq * z.M * z.D;

  Buffer value_buf((n_value + c.value_offset) * sizeof(T));
  T* value = value_buf.as<T>(c.value_offset);
  read_file(dir + "/value.bin", value, n_value * sizeof(T));
  Buffer shapes(2 * z.L * sizeof(int64_t)), starts(z.L * sizeof(int64_t));
  read_file(dir + "/shapes.bin", shapes.as<int64_t>(), 2 * z.L * sizeof(int64_t));
  read_file(dir + "/starts.bin", starts.as<int64_t>(), z.L * sizeof(int64_t));
  Buffer loc(2 * n_attn * sizeof(Op)), attn(n_attn * sizeof(Op));
  read_file(dir + "/loc.bin", loc.as<Op>(), 2 * n_attn * sizeof(Op));
  read_file(dir + "/attn.bin", attn.as<Op>(), n_attn * sizeof(Op));
  Buffer grad_out_buf((n_out + c.grad_offset) * sizeof(T));
  T* grad_out = grad_out_buf.as<T>(c.grad_offset);
  read_file(dir + "/grad_out.bin", grad_out, n_out * sizeof(T));

  std::ofstream log(dir + "/geometry.txt");
  Buffer out(n_out * sizeof(T));
  forward<T>(c, value, shapes.as<int64_t>(), starts.as<int64_t>(), loc.as<Op>(), attn.as<Op>(),
             out.as<T>(), log);
  write_file(dir + "/out.bin", out.as<T>(), n_out * sizeof(T));

  Buffer grad_value(n_value * sizeof(T)), grad_loc(2 * n_attn * sizeof(Op));
  Buffer grad_attn(n_attn * sizeof(Op));
  backward<T>(c, value, shapes.as<int64_t>(), starts.as<int64_t>(), loc.as<Op>(), attn.as<Op>(),
              grad_out, grad_value.as<T>(), grad_loc.as<Op>(), grad_attn.as<Op>(), log);
  write_file(dir + "/grad_value.bin", grad_value.as<T>(), n_value * sizeof(T));
  write_file(dir + "/grad_loc.bin", grad_loc.as<Op>(), 2 * n_attn * sizeof(Op));
  write_file(dir + "/grad_attn.bin", grad_attn.as<Op>(), n_attn * sizeof(Op));
}

// float32 values of all 65536 fp16 and bf16 bit patterns, and the fp16 and
// bf16 roundings of the float32 values in DIR/floats.bin.
void conversions(const std::string& dir) {
  std::vector<float> from_half(65536), from_bf16(65536);
  for (uint32_t b = 0; b < 65536; ++b) {
    from_half[b] = __half2float(__half{static_cast<unsigned short>(b)});
    from_bf16[b] = __bfloat162float(__nv_bfloat16{static_cast<unsigned short>(b)});
  }
  write_file(dir + "/from_half.bin", from_half.data(), 65536 * sizeof(float));
  write_file(dir + "/from_bf16.bin", from_bf16.data(), 65536 * sizeof(float));
  std::ifstream f(dir + "/floats.bin", std::ios::binary | std::ios::ate);
  const size_t n = static_cast<size_t>(f.tellg()) / sizeof(float);
  std::vector<float> floats(n);
  read_file(dir + "/floats.bin", floats.data(), n * sizeof(float));
  std::vector<uint16_t> to_half(n), to_bf16(n);
  for (size_t i = 0; i < n; ++i) {
    to_half[i] = __half_as_ushort(__float2half_rn(floats[i]));
    to_bf16[i] = __bfloat16_as_ushort(__float2bfloat16_rn(floats[i]));
  }
  write_file(dir + "/to_half.bin", to_half.data(), n * sizeof(uint16_t));
  write_file(dir + "/to_bf16.bin", to_bf16.data(), n * sizeof(uint16_t));
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc == 3 && std::string(argv[1]) == "--conversions") {
      conversions(argv[2]);
      return 0;
    }
    for (int i = 1; i < argc; ++i) {
      const std::string dir = argv[i];
      const Case c = read_case(dir);
      if (c.dtype == "float") {
        run_case<float>(c, dir);
#if !defined(DDETR_EMU_FLOAT_ONLY)  // a quicker build, for the planted-bug test
      } else if (c.dtype == "double") {
        run_case<double>(c, dir);
      } else if (c.dtype == "half") {
        run_case<__half>(c, dir);
      } else if (c.dtype == "bfloat16") {
        run_case<__nv_bfloat16>(c, dir);
#endif
      } else {
        throw std::runtime_error("unknown dtype " + c.dtype + " in " + dir);
      }
      std::cout << "ok " << dir << std::endl;
    }
  } catch (const std::exception& e) {
    std::cerr << "cuda emulation driver: " << e.what() << std::endl;
    return 2;
  }
  return 0;
}

"""An int8 GEMM for CPUs with AVX-512 VNNI (and AMX): `hf_int8.Int8`'s `vnni` kernel.

fbgemm pads K to blocks of 512 (a 576-wide matrix costs 1.8× its bytes), and at a few rows
its GEMM grows with them: SmolLM2-135M's 121 matmuls took 5.8 / 12.2 / 17.2 ms at one /
eight / 30 rows on an Intel Xeon with AMX. This kernel took 5.5 / 6.0 there, and 10.4 at
30 rows on AMX (scratch harnesses on a noisy machine: ±15%). It reads each weight once a
call, in the order `vpdpbusd` takes it (`pack`): blocks of 64 output columns, four K bytes
each; a tile is half a block (32 columns) against up to eight rows held in registers (more
rows run again over the same, cached, columns), prefetching 16 KB ahead into L2, the two
threads sharing halves evenly. Nine rows or more (prompts) run on AMX tiles where the CPU
and Linux allow them, reading the same packed blocks (a B tile is 16 groups of four K
bytes, 256 bytes apart). It quantises the rows itself (the same float operations as
torch, so the same bytes).

Rows are unsigned bytes around 128 (±127), weights signed bytes, sums exact in int32 (on
VNNI and AMX alike), so a row's result is the same alone or in any batch, and the same as
`torch._int_mm`'s on the unpacked values (the Python path, used until the library is
loaded: bit for bit the same answer, slower). The library (`SOURCE`) is built once per
torch into the cache by `hf_native.Library`, in the background the first time (~8 s of
g++).
"""

from __future__ import annotations

import torch

from . import hf_native

Tensor = torch.Tensor
AVAILABLE = torch.backends.cpu.get_cpu_capability() == "AVX512" and torch.cpu._is_vnni_supported()
LEVELS = 127  # a row's range: ±LEVELS around ZERO_POINT
ZERO_POINT = 128
COLUMNS = 64  # output columns a packed block holds
DEPTH = 16  # K is padded to a multiple of it (four `vpdpbusd` groups of four bytes)
SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace {
constexpr int64_t BLOCKS = 4;  // 16-column blocks in a packed block: 64 columns
constexpr int HALF = 2;  // blocks a tile takes: 32 columns, so 8 rows fit the registers
constexpr int64_t MAX_ROWS = 8;  // rows a tile takes (more: again over the cached columns)
constexpr int64_t AHEAD = 64;  // groups of four K bytes prefetched ahead: 16 KB
constexpr int32_t ZERO = 128;
constexpr int64_t AMX_ROWS = 9;  // a prompt: AMX where the CPU has it (decode steps: VNNI)

inline __mmask16 first(int64_t count) {  // the first `count` of 16 lanes
  return count >= 16 ? __mmask16(0xFFFF) : count > 0 ? __mmask16((1u << count) - 1) : 0;
}

// ZERO times 16 columns' sums: what the unsigned rows added to each column's sum.
__attribute__((target("avx512f,avx512bw")))
inline __m512i column_shift(const int32_t* colsum) {
  return _mm512_mullo_epi32(_mm512_set1_epi32(ZERO), _mm512_loadu_si512(colsum));
}

// One row's 16 sums back to floats, less the shift, times the columns' scales, then the
// row's (the order the Python path multiplies in: VNNI and AMX give the same bits).
__attribute__((target("avx512f,avx512bw")))
inline void store_scaled(float* out, __mmask16 keep, __m512i sum, __m512i shift, __m512 scale,
                         float row_scale) {
  const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sum, shift)), scale);
  _mm512_mask_storeu_ps(out, keep, _mm512_mul_ps(v, _mm512_set1_ps(row_scale)));
}

// MR rows of a (Kp bytes each) against HALF blocks of a packed block w ([Kp/4][BLOCKS][16][4]);
// KU accumulators a column (independent chains for few rows, which would wait on latency).
template <int MR, int KU>
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void tile(const uint8_t* a, int64_t lda, const float* row_scales, const int8_t* w, int64_t groups,
          const int32_t* colsum, const float* scales, int64_t valid, float* out, int64_t ldo) {
  __m512i acc[KU][MR][HALF];
  for (int u = 0; u < KU; ++u)
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < HALF; ++j) acc[u][m][j] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; g += KU) {
    for (int u = 0; u < KU; ++u) for (int j = 0; j < HALF; ++j)
      _mm_prefetch(reinterpret_cast<const char*>(w + (g + u + AHEAD) * BLOCKS * 64 + j * 64),
                   _MM_HINT_T1);
    for (int u = 0; u < KU; ++u) {
      __m512i b[HALF];
      for (int j = 0; j < HALF; ++j) b[j] = _mm512_loadu_si512(w + ((g + u) * BLOCKS + j) * 64);
      for (int m = 0; m < MR; ++m) {
        int32_t four;
        std::memcpy(&four, a + m * lda + (g + u) * 4, 4);
        const __m512i x = _mm512_set1_epi32(four);
        for (int j = 0; j < HALF; ++j) acc[u][m][j] = _mm512_dpbusd_epi32(acc[u][m][j], x, b[j]);
      }
    }
  }
  for (int j = 0; j < HALF && j * 16 < valid; ++j) {
    const __mmask16 keep = first(valid - j * 16);
    const __m512i shift = column_shift(colsum + j * 16);
    const __m512 scale = _mm512_maskz_loadu_ps(keep, scales + j * 16);
    for (int m = 0; m < MR; ++m) {
      __m512i sum = acc[0][m][j];
      for (int u = 1; u < KU; ++u) sum = _mm512_add_epi32(sum, acc[u][m][j]);
      store_scaled(out + m * ldo + j * 16, keep, sum, shift, scale, row_scales[m]);
    }
  }
}

using Tile = void (*)(const uint8_t*, int64_t, const float*, const int8_t*, int64_t,
                      const int32_t*, const float*, int64_t, float*, int64_t);
constexpr Tile tiles[] = {nullptr,     tile<1, 4>, tile<2, 2>, tile<3, 2>, tile<4, 1>,
                          tile<5, 1>,  tile<6, 1>, tile<7, 1>, tile<8, 1>};

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_usable() {  // the CPU has AMX-INT8, and Linux lets this process use its tiles
  static const bool usable = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 25)) || !(d & (1u << 24)))
      return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  }();
  return usable;
}

// AMX, for prompts: 16 rows of a (Kp bytes each; 32 with TWO) against two 16-column blocks
// (`w` at the first: B tiles of 16 rows of 64 bytes, 256 apart); sums into c (32 x 32 int32).
template <bool TWO>
__attribute__((target("amx-tile,amx-int8,avx512f")))
void amx_half(const uint8_t* a, int64_t Kp, const int8_t* w, int32_t* c) {
  _tile_zero(0); _tile_zero(1);
  if (TWO) { _tile_zero(2); _tile_zero(3); }
  for (int64_t k = 0; k < Kp; k += 64) {
    const int8_t* b = w + (k / 4) * 256;
    const char* ahead = reinterpret_cast<const char*>(b + 2 * 16 * 256);  // two chunks on
    for (int r = 0; r < 16; ++r) {
      _mm_prefetch(ahead + r * 256, _MM_HINT_T0);
      _mm_prefetch(ahead + r * 256 + 64, _MM_HINT_T0);
    }
    _tile_loadd(4, a + k, Kp);
    _tile_loadd(6, b, 256);
    _tile_loadd(7, b + 64, 256);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    if (TWO) {
      _tile_loadd(5, a + 16 * Kp + k, Kp);
      _tile_dpbusd(2, 5, 6);
      _tile_dpbusd(3, 5, 7);
    }
  }
  _tile_stored(0, c, 128); _tile_stored(1, c + 16, 128);
  if (TWO) { _tile_stored(2, c + 16 * 32, 128); _tile_stored(3, c + 16 * 32 + 16, 128); }
}

TileConfig sixteen_rows() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) { config.rows[t] = 16; config.colsb[t] = 64; }
  return config;
}
alignas(64) const TileConfig SIXTEEN = sixteen_rows();  // 8 tiles of 16 rows of 64 bytes

__attribute__((target("amx-tile")))
void amx_begin() { _tile_loadconfig(&SIXTEEN); }
__attribute__((target("amx-tile"))) void amx_end() { _tile_release(); }

// Each row onto [-127, 127] by its own absolute maximum, as hf_int8 does in torch (the same
// float operations: a NaN-keeping maximum, a division, rounding half to even), shifted by
// ZERO into bytes; `row_scales` gets each row's scale.
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
void quantise(const float* x, int64_t M, int64_t K, uint8_t* bytes, int64_t Kp, float* row_scales) {
  const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    __m512 top = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 v = _mm512_and_ps(_mm512_maskz_loadu_ps(first(K - k), row + k), magnitude);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      top = _mm512_max_ps(top, v);
    }
    const float most = nan ? std::nanf("") : _mm512_reduce_max_ps(top);
    const float scale = (most < 1e-30f ? 1e-30f : most) / 127.0f;
    row_scales[m] = scale;
    const __m512 by = _mm512_set1_ps(scale);
    const __m512i zero = _mm512_set1_epi32(ZERO);
    uint8_t* out = bytes + m * Kp;
    for (int64_t k = 0; k < Kp; k += 16) {
      const __m512 in = _mm512_maskz_loadu_ps(first(K - k), row + k);  // K's padding: zeros
      const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(in, by),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i shifted = _mm512_add_epi32(_mm512_cvtps_epi32(q), zero);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm512_cvtepi32_epi8(shifted));
    }
  }
}


__attribute__((target("avx512f,avx512bw")))
void finish(const int32_t* c, int64_t ldc, int64_t rows, const float* row_scales,
            const int32_t* colsum, const float* scales, int64_t valid, float* out, int64_t ldo) {
  for (int j = 0; j < 4 && j * 16 < valid; ++j) {
    const __mmask16 keep = first(valid - j * 16);
    const __m512i shift = column_shift(colsum + j * 16);
    const __m512 scale = _mm512_maskz_loadu_ps(keep, scales + j * 16);
    for (int64_t m = 0; m < rows; ++m)
      store_scaled(out + m * ldo + j * 16, keep, _mm512_loadu_si512(c + m * ldc + j * 16), shift,
                   scale, row_scales[m]);
  }
}

// x @ values.T, each row quantised on its own, scaled back by its scale and each column's.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& colsum,
                  const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "vnni::linear: float rows");
  TORCH_CHECK(packed.dim() == 5 && packed.scalar_type() == at::kChar && packed.is_contiguous());
  const int64_t M = x.size(0), K = x.size(1), N = scales.size(0);
  const int64_t blocks = packed.size(0), groups = packed.size(1), Kp = groups * 4;
  TORCH_CHECK(Kp >= K && Kp - K < 16 && groups % 4 == 0 && blocks * 64 >= N &&
              N > blocks * 64 - 64, "vnni::linear: weights packed for another shape");
  TORCH_CHECK(colsum.numel() == blocks * 64 && scales.is_contiguous() && colsum.is_contiguous());
  const bool amx = M >= AMX_ROWS && Kp % 64 == 0 && amx_usable();
  const int64_t padded = amx ? (M + 31) / 32 * 32 : M;  // AMX loads tiles of 16 rows
  const auto rows = x.contiguous();
  auto bytes = at::empty({padded, Kp}, x.options().dtype(at::kByte));
  auto row_scales = at::empty({M}, x.options());
  quantise(rows.data_ptr<float>(), M, K, bytes.data_ptr<uint8_t>(), Kp,
           row_scales.data_ptr<float>());
  std::memset(bytes.data_ptr<uint8_t>() + M * Kp, ZERO, (padded - M) * Kp);
  auto out = at::empty({M, N}, x.options());
  const uint8_t* a = bytes.data_ptr<uint8_t>();
  const float* rs = row_scales.data_ptr<float>();
  const int8_t* w = packed.data_ptr<int8_t>();
  const int32_t* sums = colsum.data_ptr<int32_t>();
  const float* sc = scales.data_ptr<float>();
  float* o = out.data_ptr<float>();
  if (amx) {
    const uint8_t* pa = a;
    at::parallel_for(0, blocks * 2, 1, [&](int64_t begin, int64_t end) {
      amx_begin();
      alignas(64) int32_t c[32 * 32];
      for (int64_t h = begin; h < end; ++h) {
        const int64_t b = h / 2, col = b * 64 + (h % 2) * 32;
        if (col >= N) continue;
        const int8_t* half = w + b * groups * 64 * BLOCKS + (h % 2) * 128;
        for (int64_t r0 = 0; r0 < M; r0 += 32) {
          const bool two = M - r0 > 16;
          if (two) amx_half<true>(pa + r0 * Kp, Kp, half, c);
          else amx_half<false>(pa + r0 * Kp, Kp, half, c);
          finish(c, 32, std::min<int64_t>(32, M - r0), rs + r0, sums + col, sc + col,
                 std::min<int64_t>(32, N - col), o + r0 * N + col, N);
        }
      }
      amx_end();
    });
    return out;
  }
  const int64_t chunks = (M + MAX_ROWS - 1) / MAX_ROWS;
  at::parallel_for(0, blocks * 2, 1, [&](int64_t begin, int64_t end) {  // halves: even shares
    for (int64_t h = begin; h < end; ++h) {
      const int64_t b = h / 2, col = b * 64 + (h % 2) * 32;
      if (col >= N) continue;  // padding only
      const int8_t* half = w + b * groups * 64 * BLOCKS + (h % 2) * 64 * HALF;
      for (int64_t c = 0, m0 = 0; c < chunks; ++c) {
        const int64_t mr = M / chunks + (c < M % chunks);
        tiles[mr](a + m0 * Kp, Kp, rs + m0, half, groups, sums + col, sc + col, N - col,
                  o + m0 * N + col, N);
        m0 += mr;
      }
    }
  });
  return out;
}
}  // namespace

TORCH_LIBRARY(omnimind_vnni, m) {
  m.def("linear(Tensor x, Tensor packed, Tensor colsum, Tensor scales) -> Tensor");
  m.impl("linear", c10::DispatchKey::CPU, linear);
}
"""


def pack(values: Tensor) -> tuple[Tensor, Tensor]:
    """int8 `values` (a row per output channel) in the kernel's layout, and each column's
    sum (both padded with zeros to whole blocks)."""
    n, k = values.shape
    padded = torch.zeros(-(-n // COLUMNS) * COLUMNS, -(-k // DEPTH) * DEPTH, dtype=torch.int8)
    padded[:n, :k] = values
    blocks, groups = padded.shape[0] // COLUMNS, padded.shape[1] // 4
    packed = padded.view(blocks, 4, 16, groups, 4).permute(0, 3, 1, 2, 4).contiguous()
    return packed, padded.sum(1, dtype=torch.int32)


def unpack(packed: Tensor, rows: int, columns: int) -> Tensor:
    """`pack`'s values back, exactly."""
    blocks, groups = packed.shape[:2]
    padded = packed.permute(0, 2, 3, 1, 4).reshape(blocks * COLUMNS, groups * 4)
    return padded[:rows, :columns].contiguous()


def _python(x: Tensor, packed: Tensor, colsum: Tensor, scales: Tensor) -> Tensor:
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-30) / LEVELS
    rounded = (x / scale).round().to(torch.int8)
    values = unpack(packed, len(scales), x.shape[1])
    return torch._int_mm(rounded, values.t()).float() * scales * scale


def _fake(x: Tensor, packed: Tensor, colsum: Tensor, scales: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], scales.shape[0])


_OPERATORS = torch.library.Library("omnimind_vnni_py", "DEF")  # kept for the process
_OPERATORS.define("linear(Tensor x, Tensor packed, Tensor colsum, Tensor scales) -> Tensor")
_OPERATORS.impl("linear", _python, "CPU")
torch.library.register_fake("omnimind_vnni_py::linear")(_fake)
LIBRARY = hf_native.Library(
    "vnni", SOURCE, ("-O3", "-fopenmp"),
    lambda: torch.library.register_fake("omnimind_vnni::linear")(_fake),
)  # fmt: skip


def linear(x: Tensor, packed: Tensor, colsum: Tensor, scales: Tensor) -> Tensor:
    """`x @ values.T` (float32, 2-D), each row quantised on its own onto ±LEVELS, scaled back
    by its scale and each output channel's. By the library once it is loaded, else in
    Python: the same float operations in the same order, so the same bits."""
    if LIBRARY.loaded:
        return torch.ops.omnimind_vnni.linear(x, packed, colsum, scales)
    if torch.compiler.is_compiling():
        return torch.ops.omnimind_vnni_py.linear(x, packed, colsum, scales)
    return _python(x, packed, colsum, scales)

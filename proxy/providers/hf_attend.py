"""A decode step's attention: one query a row against that row's cached keys and values.

Eagerly it is one SDPA call over the whole cache. Compiled, it is `omnimind_native::attend`
(`SOURCE`, built into `hf_native`'s library beside the packages) where that is loaded, and
plain sums that inductor fuses elsewhere. Inductor's loops recomputed the rotated query for
every cached position and reduced each score across a vector's lanes: on a Xeon with
AVX-512, 30 layers of that took 1.1 ms at one row and 5.7 at eight (width 128), most of what
an eight-row step spends outside the matmuls. The C++ operator converts each float16 key and
value row once for all the query heads that share it (grouped-query attention), and reads a
row's cache only up to its own length. Its sums run in a fixed order, lane by lane, so a
row's output does not depend on the rows beside it or on the width (tested bit for bit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own spelling

Tensor = torch.Tensor
SOURCE = r"""
#include <immintrin.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

namespace {
constexpr int64_t MAX_GROUP = 16;  // query heads a key/value head serves (grouped-query)
constexpr int64_t MAX_CHUNKS = 32;  // vectors a head: 256 floats in 8-wide vectors

struct Ymm {  // AVX2: 8 floats
  using Vec = __m256;
  static constexpr int64_t WIDE = 8;
  static Vec load(const c10::Half* from) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(from)));
  }
  static Vec load(const float* from) { return _mm256_loadu_ps(from); }
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec splat(float x) { return _mm256_set1_ps(x); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* to, Vec x) { _mm256_storeu_ps(to, x); }
  static float total(Vec x) {  // always the same order
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
  }
};

#ifdef __AVX512F__
struct Zmm {  // AVX-512: 16 floats
  using Vec = __m512;
  static constexpr int64_t WIDE = 16;
  static Vec load(const c10::Half* from) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(from)));
  }
  static Vec load(const float* from) { return _mm512_loadu_ps(from); }
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec splat(float x) { return _mm512_set1_ps(x); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* to, Vec x) { _mm512_storeu_ps(to, x); }
  static float total(Vec x) {
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
    return Ymm::total(a);
  }
};
#endif

// One task: the `group` query heads that share one key/value head of one row, over
// `length` cached positions of `chunks` vectors each (`CHUNKS`, known when compiled for the
// usual head sizes, lets the compiler keep a key in registers; 0: `any_chunks`).
template <int64_t CHUNKS, typename V, typename T>
void attend_task(const float* query, const T* key, const T* value, int64_t position_stride,
                 int64_t length, int64_t group, int64_t any_chunks, float scale, float* scores,
                 float* result) {
  const int64_t chunks = CHUNKS ? CHUNKS : any_chunks, dim = chunks * V::WIDE;
  for (int64_t p = 0; p < length; ++p) {
    const T* k = key + p * position_stride;
    typename V::Vec keys[MAX_CHUNKS];
    for (int64_t c = 0; c < chunks; ++c) keys[c] = V::load(k + c * V::WIDE);
    for (int64_t g = 0; g < group; ++g) {
      typename V::Vec sum = V::zero();
      for (int64_t c = 0; c < chunks; ++c)
        sum = V::fma(V::load(query + g * dim + c * V::WIDE), keys[c], sum);
      scores[g * length + p] = V::total(sum) * scale;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * length;
    float top = -INFINITY, sum = 0;
    for (int64_t p = 0; p < length; ++p) top = std::max(top, s[p]);
    for (int64_t p = 0; p < length; ++p) sum += (s[p] = std::exp(s[p] - top));
    const float inverse = 1.f / sum;
    for (int64_t p = 0; p < length; ++p) s[p] *= inverse;
  }
  for (int64_t c = 0; c < chunks; ++c) {
    typename V::Vec sums[MAX_GROUP];
    for (int64_t g = 0; g < group; ++g) sums[g] = V::zero();
    for (int64_t p = 0; p < length; ++p) {
      const auto v = V::load(value + p * position_stride + c * V::WIDE);
      for (int64_t g = 0; g < group; ++g)
        sums[g] = V::fma(V::splat(scores[g * length + p]), v, sums[g]);
    }
    for (int64_t g = 0; g < group; ++g) V::store(result + g * dim + c * V::WIDE, sums[g]);
  }
}

template <typename V, typename T>
void attend_rows(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                 const int64_t* lengths, float scale, at::Tensor& out) {
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = keys.size(1), group = heads / kv_heads, chunks = dim / V::WIDE;
  const int64_t slot_stride = keys.stride(0), head_stride = keys.stride(1);
  const int64_t position_stride = keys.stride(2);
  const float* qs = q.data_ptr<float>();
  const T* ks = keys.data_ptr<T>();
  const T* vs = values.data_ptr<T>();
  float* os = out.data_ptr<float>();
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, h = task % kv_heads;
      const int64_t at = r * slot_stride + h * head_stride, first = (r * heads + h * group) * dim;
      scores.resize(group * lengths[r]);
      auto run = chunks == 4 ? attend_task<4, V, T> : chunks == 8 ? attend_task<8, V, T>
                                                                  : attend_task<0, V, T>;
      run(qs + first, ks + at, vs + at, position_stride, lengths[r], group, chunks, scale,
           scores.data(), os + first);
    }
  });
}

template <typename T>
void attend_any(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                const int64_t* lengths, float scale, at::Tensor& out) {
#ifdef __AVX512F__
  if (q.size(2) % Zmm::WIDE == 0) return attend_rows<Zmm, T>(q, keys, values, lengths, scale, out);
#endif
  attend_rows<Ymm, T>(q, keys, values, lengths, scale, out);
}

at::Tensor attend(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                  const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 4 && keys.sizes() == values.sizes() &&
              keys.strides() == values.strides() && keys.stride(3) == 1 &&
              keys.scalar_type() == values.scalar_type(),
              "attend: q [rows, heads, dim], keys and values [slots, kv_heads, positions, dim]");
  TORCH_CHECK(q.size(0) <= keys.size(0) && q.size(2) == keys.size(3) &&
              q.size(1) % keys.size(1) == 0, "attend: q does not fit the cache");
  TORCH_CHECK(q.size(2) % 8 == 0 && q.size(2) <= MAX_CHUNKS * 8 &&
              q.size(1) / keys.size(1) <= MAX_GROUP,
              "attend: a head size of 8 to 256 in steps of 8, at most 16 query heads a key head");
  auto counts = lengths.to(at::kLong).contiguous();
  const int64_t* each = counts.data_ptr<int64_t>();
  TORCH_CHECK(counts.numel() == q.size(0), "attend: one length a row");
  for (int64_t i = 0; i < counts.numel(); ++i)
    TORCH_CHECK(each[i] >= 1 && each[i] <= keys.size(2), "attend: a length outside the cache");
  auto query = q.to(at::kFloat).contiguous();
  auto out = at::empty(query.sizes(), query.options());
  if (keys.scalar_type() == at::kHalf)
    attend_any<c10::Half>(query, keys, values, each, float(scale), out);
  else if (keys.scalar_type() == at::kFloat)
    attend_any<float>(query, keys, values, each, float(scale), out);
  else
    TORCH_CHECK(false, "attend: a float16 or float32 cache");
  return out.to(q.scalar_type());
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(omnimind_native, m) {
  m.def("attend(Tensor q, Tensor keys, Tensor values, Tensor lengths, float scale) -> Tensor");
  m.impl("attend", c10::DispatchKey::CPU, attend);
}
"""


def fake(q: Tensor, keys: Tensor, values: Tensor, lengths: Tensor, scale: float) -> Tensor:
    return q.new_empty(q.shape)


def attend(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
    """Row i's query `q[i]` ([rows, heads, 1, dim]) against slot i of the caches
    ([slots, kv_heads, capacity, dim]) at positions `0..positions[i]` (`mask`, [rows, 1, 1,
    width]: the same as booleans)."""
    rows, kv_heads, width, dim = q.shape[0], keys.shape[1], mask.shape[-1], keys.shape[-1]
    torch._check(width <= keys.shape[2])
    keys, values = keys[:rows, :, :width], values[:rows, :, :width]
    if not torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(
            q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, enable_gqa=True
        )
    if dim % 8 == 0 and dim <= 256 and hasattr(torch.ops.omnimind_native, "attend"):
        lengths = positions.reshape(-1) + 1
        out = torch.ops.omnimind_native.attend(q.reshape(rows, -1, dim), keys, values, lengths,
                                               dim**-0.5)  # fmt: skip
        return out.view(q.shape)
    group = q.shape[1] // kv_heads
    grouped = q.view(rows, kv_heads, group, 1, dim).float()
    scores = (grouped * keys[:, :, None].float()).sum(-1) * dim**-0.5
    scores = scores.masked_fill(~mask.view(rows, 1, 1, width), float("-inf")).softmax(-1)
    out = (scores[..., None] * values[:, :, None].float()).sum(-2)
    return out.view(rows, kv_heads * group, 1, dim).to(q.dtype)

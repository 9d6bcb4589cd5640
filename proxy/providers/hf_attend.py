"""Attention in C++ (`omnimind_attend::attend`) for the decode step and for prompts run as
rows of tokens, where AVX-512 is at hand.

Each row of queries attends to the first `lengths[r]` positions of cache slot `slots[r]`
(keys positions last, values positions first, float16): a decode step's rows are slots
0..B-1 at their lengths; a prompt's tokens are rows of its slot at lengths 1..L, once the
whole prompt's keys and values are in the cache (`hf_fast.FastDecoder.prefill_many`).
Inductor's loops for a decode step waited on each key and value load in turn (one
accumulator a loop, the dequantised query recomputed in the innermost loop): on an Intel
Xeon with AMX, an eight-row step of SmolLM2-135M took 12.9–13.9 ms with them and 11.2–12.7
with this (packages timed in turns). Per key/value head of a row: the scores of its query
heads, 32 positions at a time across the head's channels (four accumulators), never
reading past the row's length; a softmax with a polynomial exp (Cephes', ~1 ulp); the
values summed in two position parities, divided by the total once per channel. A row's
sums run in a fixed order over its own positions only, so its output is bit for bit the
same beside any rows, in any slot, whatever the cache's length (tested). Built with the
vnni kernel's library (`hf_int8.prepare`), like it in the background the first time;
where it is not loaded the step keeps inductor's loops (`hf_fast._attend`) and prompts
run one by one.
"""

from __future__ import annotations

import torch

from . import hf_native

Tensor = torch.Tensor
SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

namespace {
__attribute__((target("avx512f,avx512bw,avx512dq")))
inline __m512 exp_ps(__m512 x) {  // e^x for x <= 0, Cephes' polynomial (~1 ulp)
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, f), f, _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
inline __m512 halves(const c10::Half* from, __mmask16 keep = 0xFFFF) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(keep, from));
}

inline __mmask16 first(int64_t count) {  // the first `count` of 16 lanes
  return count >= 16 ? __mmask16(0xFFFF) : count > 0 ? __mmask16((1u << count) - 1) : 0;
}

// One row's key/value head h: its `group` query heads' outputs.
__attribute__((target("avx512f,avx512bw,avx512dq")))
void attend_head(const float* q, const c10::Half* k, int64_t k_dim_stride,
                 const c10::Half* v, int64_t v_pos_stride, int64_t length, int64_t group,
                 int64_t dim, float scale, float* weights, float* out) {
  const int64_t pairs = (length + 31) / 32;  // 32 positions at a time
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = q + g * dim;
    float* w = weights + g * pairs * 32;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t c = 0; c < pairs; ++c) {
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
      const c10::Half* kc = k + c * 32;
      const __mmask16 in0 = first(length - c * 32), in1 = first(length - c * 32 - 16);
      for (int64_t d = 0; d < dim; d += 2) {  // never past the row's own length
        const __m512 q0 = _mm512_set1_ps(qg[d]), q1 = _mm512_set1_ps(qg[d + 1]);
        a0 = _mm512_fmadd_ps(q0, halves(kc + d * k_dim_stride, in0), a0);
        a1 = _mm512_fmadd_ps(q0, halves(kc + d * k_dim_stride + 16, in1), a1);
        b0 = _mm512_fmadd_ps(q1, halves(kc + (d + 1) * k_dim_stride, in0), b0);
        b1 = _mm512_fmadd_ps(q1, halves(kc + (d + 1) * k_dim_stride + 16, in1), b1);
      }
      for (int half = 0; half < 2; ++half) {
        const int64_t at = c * 32 + half * 16;
        const __mmask16 keep = half ? in1 : in0;
        const __m512 s = _mm512_mul_ps(half ? _mm512_add_ps(a1, b1) : _mm512_add_ps(a0, b0),
                                       _mm512_set1_ps(scale));
        const __m512 masked = _mm512_mask_blend_ps(keep, _mm512_set1_ps(-INFINITY), s);
        _mm512_storeu_ps(w + at, masked);
        top = _mm512_max_ps(top, masked);
      }
    }
    const __m512 most = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int64_t at = 0; at < pairs * 32; at += 16) {
      const __m512 s = _mm512_loadu_ps(w + at);
      const __mmask16 real = _mm512_cmp_ps_mask(s, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
      const __m512 e = _mm512_maskz_mov_ps(real, exp_ps(_mm512_sub_ps(s, most)));
      _mm512_storeu_ps(w + at, e);
      total = _mm512_add_ps(total, e);
    }
    const float sum = _mm512_reduce_add_ps(total);
    // out = sum_p w[p] v[p] / sum, dim in blocks of 64 (4 vectors), two position parities
    for (int64_t d0 = 0; d0 < dim; d0 += 64) {
      const int64_t vecs = std::min<int64_t>(4, (dim - d0) / 16);
      __m512 e[2][4];
      for (int u = 0; u < 2; ++u) for (int j = 0; j < 4; ++j) e[u][j] = _mm512_setzero_ps();
      for (int64_t p = 0; p < length; p += 2) {
        for (int u = 0; u < 2 && p + u < length; ++u) {
          const __m512 wp = _mm512_set1_ps(w[p + u]);
          const c10::Half* vp = v + (p + u) * v_pos_stride + d0;
          for (int j = 0; j < 4; ++j)
            if (j < vecs) e[u][j] = _mm512_fmadd_ps(wp, halves(vp + j * 16), e[u][j]);
        }
      }
      const __m512 by = _mm512_set1_ps(sum);
      for (int j = 0; j < vecs; ++j)
        _mm512_storeu_ps(out + g * dim + d0 + j * 16,
                         _mm512_div_ps(_mm512_add_ps(e[0][j], e[1][j]), by));
    }
  }
}

// q [R][heads][1][dim]: row r attends to the first lengths[r] positions of cache slot
// slots[r] (keys [slots][kv][dim][capacity], values [slots][kv][capacity][dim]).
at::Tensor attend(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                  const at::Tensor& slots, const at::Tensor& lengths) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.size(2) == 1, "attend: q");
  TORCH_CHECK(keys.dim() == 4 && keys.scalar_type() == at::kHalf && keys.stride(3) == 1 &&
              values.dim() == 4 && values.scalar_type() == at::kHalf && values.stride(3) == 1,
              "attend: the cache");
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(3);
  const int64_t kv = keys.size(1), capacity = keys.size(3);
  TORCH_CHECK(keys.size(2) == dim && values.size(2) == capacity && values.size(3) == dim &&
              values.size(0) == keys.size(0) && heads % kv == 0 && dim % 16 == 0 &&
              slots.numel() == rows && lengths.numel() == rows &&
              slots.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong,
              "attend: shapes");
  const auto slot = slots.contiguous(), length = lengths.contiguous();
  const int64_t* sp = slot.data_ptr<int64_t>();
  const int64_t* lp = length.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(sp[r] >= 0 && sp[r] < keys.size(0) && lp[r] > 0 && lp[r] <= capacity,
                "attend: a row's slot or length is out of the cache");
  const int64_t group = heads / kv;
  const auto query = q.contiguous();
  auto out = at::empty({rows, heads, 1, dim}, q.options());
  const float scale = 1.0f / std::sqrt(float(dim));
  const c10::Half* kp = keys.data_ptr<c10::Half>();
  const c10::Half* vp = values.data_ptr<c10::Half>();
  const float* qp = query.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows * kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(group * (capacity + 32));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / kv, h = t % kv;
      attend_head(qp + (r * heads + h * group) * dim,
                  kp + sp[r] * keys.stride(0) + h * keys.stride(1), keys.stride(2),
                  vp + sp[r] * values.stride(0) + h * values.stride(1), values.stride(2), lp[r],
                  group, dim, scale, weights.data(), op + (r * heads + h * group) * dim);
    }
  });
  return out;
}
}  // namespace

TORCH_LIBRARY(omnimind_attend, m) {
  m.def("attend(Tensor q, Tensor keys, Tensor values, Tensor slots, Tensor lengths) -> Tensor");
  m.impl("attend", c10::DispatchKey::CPU, attend);
}
"""


def _fake(q: Tensor, keys: Tensor, values: Tensor, slots: Tensor, lengths: Tensor) -> Tensor:
    return torch.empty_like(q)


LIBRARY = hf_native.Library(
    "attend", SOURCE, ("-O3", "-fopenmp"),
    lambda: torch.library.register_fake("omnimind_attend::attend")(_fake),
)  # fmt: skip


def attends(q: Tensor, keys: Tensor) -> bool:
    """Whether `attend` takes these: the library loaded, float32 queries, a float16 cache
    and heads in whole vectors."""
    cache = q.dtype == torch.float32 and keys.dtype == torch.float16
    return LIBRARY.loaded and cache and q.shape[-1] % 16 == 0


def attend(q: Tensor, keys: Tensor, values: Tensor, slots: Tensor, lengths: Tensor) -> Tensor:
    """Row r of `q` ([rows, heads, 1, dim]) against the first `lengths[r]` positions of cache
    slot `slots[r]` (the whole cache: keys positions last, values positions first)."""
    out: Tensor = torch.ops.omnimind_attend.attend(q, keys, values, slots, lengths)
    return out

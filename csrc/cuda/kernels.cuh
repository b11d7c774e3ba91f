// CUDA kernels of the CUDA backend: the same operators and block decoders as the OpenCL backend's
// (csrc/opencl/kernels.cl, which documents the layouts), in CUDA C++. Weights stay in their GGUF
// form in device memory and are decoded in registers; activations are F32.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace pyllm::cuda {

constexpr int kChunk = 32;  // elements of a weight row per decode step (a legacy block / sub-block)

// GGUF type ids (pyllm::QType)
enum : int {
  kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8,
  kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kIQ4_NL = 20, kIQ4_XS = 23,
  kBF16 = 30,
};

__device__ __forceinline__ float ld_half(const uint8_t* p) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(p[0] | (p[1] << 8))));
}

__device__ __forceinline__ float ld_bf16(const uint8_t* p) {
  return __uint_as_float(static_cast<uint32_t>(p[0] | (p[1] << 8)) << 16);
}

__device__ __forceinline__ uint32_t ld_u32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

__device__ __forceinline__ void scale_min_k4(int j, const uint8_t* s, float* sc, float* m) {
  if (j < 4) {
    *sc = float(s[j] & 63);
    *m = float(s[j + 4] & 63);
  } else {
    *sc = float((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
    *m = float((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
  }
}

__device__ __forceinline__ float q3k_scale(const uint8_t* s, int j) {
  const int low = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
  const int high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
  return float((low | (high << 4)) - 32);
}

// The 32 values of chunk c of a weight row; plain types read only `left` of them (0 after).
__device__ void deq_chunk(int type, const uint8_t* row, int c, int left, float* out) {
  switch (type) {
    case kF32: {
      const float* w = reinterpret_cast<const float*>(row) + c * kChunk;
      for (int j = 0; j < kChunk; ++j) out[j] = j < left ? w[j] : 0.0f;
      return;
    }
    case kF16: {
      const uint8_t* w = row + c * kChunk * 2;
      for (int j = 0; j < kChunk; ++j) out[j] = j < left ? ld_half(w + 2 * j) : 0.0f;
      return;
    }
    case kBF16: {
      const uint8_t* w = row + c * kChunk * 2;
      for (int j = 0; j < kChunk; ++j) out[j] = j < left ? ld_bf16(w + 2 * j) : 0.0f;
      return;
    }
    case kQ4_0: {
      const uint8_t* b = row + c * 18;
      const float d = ld_half(b);
      for (int j = 0; j < 16; ++j) {
        const int q = b[2 + j];
        out[j] = d * float((q & 0xF) - 8);
        out[j + 16] = d * float((q >> 4) - 8);
      }
      return;
    }
    case kQ4_1: {
      const uint8_t* b = row + c * 20;
      const float d = ld_half(b), m = ld_half(b + 2);
      for (int j = 0; j < 16; ++j) {
        const int q = b[4 + j];
        out[j] = d * float(q & 0xF) + m;
        out[j + 16] = d * float(q >> 4) + m;
      }
      return;
    }
    case kQ5_0: {
      const uint8_t* b = row + c * 22;
      const float d = ld_half(b);
      const uint32_t qh = ld_u32(b + 2);
      for (int j = 0; j < 16; ++j) {
        const int q = b[6 + j];
        out[j] = d * float(((q & 0xF) | int(((qh >> j) & 1) << 4)) - 16);
        out[j + 16] = d * float(((q >> 4) | int(((qh >> (j + 16)) & 1) << 4)) - 16);
      }
      return;
    }
    case kQ5_1: {
      const uint8_t* b = row + c * 24;
      const float d = ld_half(b), m = ld_half(b + 2);
      const uint32_t qh = ld_u32(b + 4);
      for (int j = 0; j < 16; ++j) {
        const int q = b[8 + j];
        out[j] = d * float((q & 0xF) | int(((qh >> j) & 1) << 4)) + m;
        out[j + 16] = d * float((q >> 4) | int(((qh >> (j + 16)) & 1) << 4)) + m;
      }
      return;
    }
    case kQ8_0: {
      const uint8_t* b = row + c * 34;
      const float d = ld_half(b);
      const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
      for (int j = 0; j < kChunk; ++j) out[j] = d * float(q[j]);
      return;
    }
    case kQ2_K: {
      const uint8_t* b = row + (c / 8) * 84;
      const int e = (c % 8) * kChunk, h = e / 128, sh = (e % 128) / 32;
      const uint8_t* q = b + 16 + 32 * h;
      const float d = ld_half(b + 80), dmin = ld_half(b + 82);
      for (int l = 0; l < kChunk; ++l) {
        const int sc = b[h * 8 + sh * 2 + l / 16];
        out[l] = d * float(sc & 0xF) * float((q[l] >> (2 * sh)) & 3) - dmin * float(sc >> 4);
      }
      return;
    }
    case kQ3_K: {
      const uint8_t* b = row + (c / 8) * 110;
      const int e = (c % 8) * kChunk, h = e / 128, sh = (e % 128) / 32;
      const uint8_t* q = b + 32 + 32 * h;
      const int bit = h * 4 + sh;
      const float d = ld_half(b + 108);
      for (int l = 0; l < kChunk; ++l) {
        const int v = ((q[l] >> (2 * sh)) & 3) - (((b[l] >> bit) & 1) ? 0 : 4);
        out[l] = d * q3k_scale(b + 96, h * 8 + sh * 2 + l / 16) * float(v);
      }
      return;
    }
    case kQ4_K:
    case kQ5_K: {
      const bool five = type == kQ5_K;
      const uint8_t* b = row + (c / 8) * (five ? 176 : 144);
      const int j = c % 8;
      const uint8_t* q = b + (five ? 48 : 16) + 32 * (j / 2);
      const int shift = (j % 2) * 4;
      float sc, m;
      scale_min_k4(j, b + 4, &sc, &m);
      const float d = ld_half(b) * sc, dm = ld_half(b + 2) * m;
      for (int l = 0; l < kChunk; ++l) {
        const int v = ((q[l] >> shift) & 0xF) | (five ? (((b[16 + l] >> j) & 1) << 4) : 0);
        out[l] = d * float(v) - dm;
      }
      return;
    }
    case kQ6_K: {
      const uint8_t* b = row + (c / 8) * 210;
      const int j = c % 8, h = j / 4, quarter = j % 4;
      const uint8_t* ql = b + 64 * h + (quarter % 2) * 32;
      const uint8_t* qh = b + 128 + 32 * h;
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192) + 8 * h + 2 * quarter;
      const int lshift = (quarter / 2) * 4, hshift = 2 * quarter;
      const float d = ld_half(b + 208);
      for (int l = 0; l < kChunk; ++l) {
        const int v = (((ql[l] >> lshift) & 0xF) | (((qh[l] >> hshift) & 3) << 4)) - 32;
        out[l] = d * float(sc[l / 16]) * float(v);
      }
      return;
    }
    case kIQ4_NL:
    case kIQ4_XS: {
      // the levels a 4-bit code indexes (pyllm::kIq4Levels)
      constexpr int8_t kLevels[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                      1,    13,   25,  38,  53,  69,  89,  113};
      float d;
      const uint8_t* q;
      if (type == kIQ4_NL) {  // 18 bytes: d, qs[16]
        const uint8_t* b = row + c * 18;
        d = ld_half(b);
        q = b + 2;
      } else {  // 136 bytes: d, scales_h (u16), scales_l[4], qs[128]
        const uint8_t* b = row + (c / 8) * 136;
        const int j = c % 8;
        const int ls = ((b[4 + j / 2] >> (4 * (j % 2))) & 0xF) |
                       ((((b[2] | (b[3] << 8)) >> (2 * j)) & 3) << 4);
        d = ld_half(b) * float(ls - 32);
        q = b + 8 + 16 * j;
      }
      for (int l = 0; l < 16; ++l) {
        out[l] = d * float(kLevels[q[l] & 0xF]);
        out[l + 16] = d * float(kLevels[q[l] >> 4]);
      }
      return;
    }
  }
  for (int l = 0; l < kChunk; ++l) out[l] = __int_as_float(0x7fc00000);  // never sent
}

// Sum over a block of blockDim.x threads (a power of two <= 1024) in shared memory `red`.
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lid = threadIdx.x;
  red[lid] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (lid < s) red[lid] += red[lid + s];
    __syncthreads();
  }
  const float total = red[0];
  __syncthreads();
  return total;
}

// y[t][o] = W[o] . x[t]: one block per (row o, token t) (decode).
__global__ void mul_mat(const uint8_t* w, int type, int64_t row_bytes, int k, const float* x,
                        float* y, int n_out) {
  extern __shared__ float red[];
  const int o = blockIdx.x, t = blockIdx.y;
  const uint8_t* row = w + o * row_bytes;
  const float* xt = x + int64_t(t) * k;
  const int n_chunks = (k + kChunk - 1) / kChunk;
  float acc = 0.0f, v[kChunk];
  for (int c = threadIdx.x; c < n_chunks; c += blockDim.x) {
    deq_chunk(type, row, c, k - c * kChunk, v);
    const int n = min(kChunk, k - c * kChunk);
    for (int j = 0; j < n; ++j) acc += v[j] * xt[c * kChunk + j];
  }
  const float total = block_sum(acc, red);
  if (threadIdx.x == 0) y[int64_t(t) * n_out + o] = total;
}

// Many tokens (prefill): a TILE x TILE block computes 2 TILE rows x 2 TILE tokens, one decoded
// chunk of the rows and of the tokens staged in shared memory per step.
constexpr int kTile = 16, kTileRows = 2 * kTile;
__global__ void mul_mat_tiled(const uint8_t* w, int type, int64_t row_bytes, int k,
                              const float* x, float* y, int n_out, int n_tok) {
  __shared__ float ws[kTileRows][kChunk + 1];
  __shared__ float xs[kTileRows][kChunk + 1];
  const int lr = threadIdx.x, lt = threadIdx.y, lin = lt * kTile + lr;
  const int r0 = blockIdx.x * kTileRows, t0 = blockIdx.y * kTileRows;
  const int n_chunks = (k + kChunk - 1) / kChunk;
  float acc[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
  for (int c = 0; c < n_chunks; ++c) {
    if (lin < kTileRows) {
      float v[kChunk];
      const int r = r0 + lin;
      if (r < n_out) {
        deq_chunk(type, w + int64_t(r) * row_bytes, c, k - c * kChunk, v);
      } else {
        for (int j = 0; j < kChunk; ++j) v[j] = 0.0f;
      }
      for (int j = 0; j < kChunk; ++j) ws[lin][j] = v[j];
    }
    for (int i = lin; i < kTileRows * kChunk; i += kTile * kTile) {
      const int tt = i / kChunk, j = i % kChunk, t = t0 + tt, e = c * kChunk + j;
      xs[tt][j] = (t < n_tok && e < k) ? x[int64_t(t) * k + e] : 0.0f;
    }
    __syncthreads();
    for (int j = 0; j < kChunk; ++j) {
      const float w0 = ws[lr][j], w1 = ws[lr + kTile][j];
      const float x0 = xs[lt][j], x1 = xs[lt + kTile][j];
      acc[0][0] += w0 * x0;
      acc[0][1] += w0 * x1;
      acc[1][0] += w1 * x0;
      acc[1][1] += w1 * x1;
    }
    __syncthreads();
  }
  for (int a = 0; a < 2; ++a) {
    for (int b = 0; b < 2; ++b) {
      const int r = r0 + lr + a * kTile, t = t0 + lt + b * kTile;
      if (r < n_out && t < n_tok) y[int64_t(t) * n_out + r] = acc[a][b];
    }
  }
}

// y[r] = x[r] * w / rms(x[r]): one block per row. w_row (LoRA norm deltas): row r's weights
// are w + w_row[r] * n.
__global__ void rms_norm(const float* x, const float* w, const int* w_row, float* y, int n,
                         float eps) {
  extern __shared__ float red[];
  const float* xr = x + int64_t(blockIdx.x) * n;
  if (w_row) w += int64_t(w_row[blockIdx.x]) * n;
  float acc = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += xr[i] * xr[i];
  const float scale = rsqrtf(block_sum(acc, red) / float(n) + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) y[int64_t(blockIdx.x) * n + i] = xr[i] * scale * w[i];
}

__global__ void add_bias(float* y, const float* b, int dim, int64_t total) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < total) y[i] += b[i % dim];
}

// LoRA (pyllm/lora.h): u[t][j] *= coef[t] * factor for rank-wide rows (each token's coefficient
// for one adapter); y[t][i] += v[which[t]][i] (a bias delta per run of tokens).
__global__ void scale_rows(float* u, const float* coef, float factor, int rank, int64_t total) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < total) u[i] *= coef[i / rank] * factor;
}

__global__ void add_rows(float* y, const float* v, const int* which, int dim, int64_t total) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < total) y[i] += v[int64_t(which[i / dim]) * dim + i % dim];
}

__global__ void add(float* y, const float* x, int64_t total) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < total) y[i] += x[i];
}

__global__ void swiglu(float* gate, const float* up, int64_t total) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < total) {
    const float g = gate[i];
    gate[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

// Pair i of head h of token t rotated by the host's (cos, sin): grid (n_heads, n_tok), block
// n_rot / 2.
__global__ void rope(float* x, const float* cos_sin, int n_heads, int head_dim, int n_rot,
                     int neox) {
  const int i = threadIdx.x, h = blockIdx.x, t = blockIdx.y;
  float* v = x + (int64_t(t) * n_heads + h) * head_dim;
  const float c = cos_sin[int64_t(t) * n_rot + 2 * i], s = cos_sin[int64_t(t) * n_rot + 2 * i + 1];
  const int ia = neox ? i : 2 * i, ib = neox ? i + n_rot / 2 : 2 * i + 1;
  const float a = v[ia], b = v[ib];
  v[ia] = a * c - b * s;
  v[ib] = a * s + b * c;
}

// Token t's dim-wide K (or V) row into cache row rows[t], in the cache's type: grid (dim / 32,
// n_tok), one thread per 32-element block.
__global__ void kv_store(const float* src, uint8_t* cache, const int64_t* rows, int64_t row_bytes,
                         int dim, int type) {
  const int blk = blockIdx.x, t = blockIdx.y;
  const float* x = src + int64_t(t) * dim + blk * 32;
  uint8_t* row = cache + rows[t] * row_bytes;
  if (type == kF32) {
    for (int j = 0; j < 32; ++j) reinterpret_cast<float*>(row)[blk * 32 + j] = x[j];
  } else if (type == kF16) {
    for (int j = 0; j < 32; ++j) reinterpret_cast<__half*>(row)[blk * 32 + j] = __float2half_rn(x[j]);
  } else {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    uint8_t* b = row + blk * 34;
    *reinterpret_cast<__half*>(b) = __float2half_rn(d);
    for (int j = 0; j < 32; ++j) {
      const float r = fminf(fmaxf(roundf(x[j] * id), -128.0f), 127.0f);
      reinterpret_cast<int8_t*>(b + 2)[j] = static_cast<int8_t>(r);
    }
  }
}

__device__ __forceinline__ float kv_at(const uint8_t* row, int type, int i) {
  if (type == kF32) return reinterpret_cast<const float*>(row)[i];
  if (type == kF16) return __half2float(reinterpret_cast<const __half*>(row)[i]);
  const uint8_t* b = row + (i / 32) * 34;
  return ld_half(b) * float(reinterpret_cast<const int8_t*>(b + 2)[i % 32]);
}

// Causal attention of query head h of token t (grid (n_head, n_tok), block kAttnThreads) in tiles
// of kAttnThreads keys with a running softmax; head_dim <= 4 * kAttnThreads.
constexpr int kAttnThreads = 64;
__global__ void attention(const float* q, float* out, const uint8_t* kc, const uint8_t* vc,
                          int64_t row_bytes, int64_t head_bytes, int type, const int64_t* region,
                          const int* visible, int n_head, int group, int head_dim, float scale) {
  extern __shared__ float qs[];  // head_dim floats, then kAttnThreads
  float* p = qs + head_dim;
  const int lid = threadIdx.x, wg = blockDim.x, h = blockIdx.x, t = blockIdx.y;
  const int64_t qoff = (int64_t(t) * n_head + h) * head_dim;
  for (int i = lid; i < head_dim; i += wg) qs[i] = q[qoff + i];
  __syncthreads();
  const int n_vis = visible[t];
  const uint8_t* kbase = kc + region[t] * row_bytes + int64_t(h / group) * head_bytes;
  const uint8_t* vbase = vc + region[t] * row_bytes + int64_t(h / group) * head_bytes;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  float m = -INFINITY, l = 0.0f;
  for (int start = 0; start < n_vis; start += wg) {
    const int j = start + lid;
    float s = -INFINITY;
    if (j < n_vis) {
      const uint8_t* krow = kbase + int64_t(j) * row_bytes;
      s = 0.0f;
      for (int i = 0; i < head_dim; ++i) s += qs[i] * kv_at(krow, type, i);
      s *= scale;
    }
    p[lid] = s;
    __syncthreads();
    const int n_tile = min(wg, n_vis - start);
    float tmax = -INFINITY;
    for (int jj = 0; jj < n_tile; ++jj) tmax = fmaxf(tmax, p[jj]);
    const float m_new = fmaxf(m, tmax);
    __syncthreads();
    p[lid] = j < n_vis ? expf(s - m_new) : 0.0f;
    __syncthreads();
    const float corr = expf(m - m_new);
    float tsum = 0.0f;
    for (int jj = 0; jj < n_tile; ++jj) tsum += p[jj];
    l = l * corr + tsum;
    for (int r = 0; r < 4; ++r) {
      const int d = lid + r * wg;
      if (d >= head_dim) break;
      float a = acc[r] * corr;
      for (int jj = 0; jj < n_tile; ++jj) a += p[jj] * kv_at(vbase + int64_t(start + jj) * row_bytes, type, d);
      acc[r] = a;
    }
    m = m_new;
    __syncthreads();
  }
  for (int r = 0; r < 4; ++r) {
    const int d = lid + r * wg;
    if (d < head_dim) out[qoff + d] = acc[r] / l;
  }
}

}  // namespace pyllm::cuda

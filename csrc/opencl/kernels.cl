// OpenCL C kernels of the OpenCL backend (csrc/opencl/): the weight formats' dot products, the
// element-wise operators, the K/V row store and attention over the device KV cache.
//
// Only OpenCL 1.2 core features, so the same source builds on PoCL, Intel, AMD, NVIDIA, Mali and
// Adreno: halves are read and written with vload_half / vstore_half_rte (no cl_khr_fp16), no
// doubles (no cl_khr_fp64), no subgroups. The block layouts are GGUF's (csrc/include/pyllm/qtype.h
// spells them out); weights stay in their quantized form in device memory and are decoded in
// registers. Activations are F32 throughout, as on the CPU.

// GGUF type ids (the values of pyllm::QType)
#define T_F32 0
#define T_F16 1
#define T_Q4_0 2
#define T_Q4_1 3
#define T_Q5_0 6
#define T_Q5_1 7
#define T_Q8_0 8
#define T_Q2_K 10
#define T_Q3_K 11
#define T_Q4_K 12
#define T_Q5_K 13
#define T_Q6_K 14
#define T_IQ4_NL 20
#define T_IQ4_XS 23
#define T_BF16 30

// Every matrix product walks a weight row in chunks of 32 elements (one legacy block, one
// sub-block of a k-quant super-block).
#define CHUNK 32

inline float ld_half(global const uchar* p) { return vload_half(0, (global const half*)p); }

inline float ld_bf16(global const uchar* p) {
  return as_float(((uint)p[0] | ((uint)p[1] << 8)) << 16);
}

inline uint ld_u32(global const uchar* p) {
  return (uint)p[0] | ((uint)p[1] << 8) | ((uint)p[2] << 16) | ((uint)p[3] << 24);
}

// The 6-bit scale and min of sub-block j of a Q4_K / Q5_K super-block (12 packed bytes).
inline void scale_min_k4(int j, global const uchar* s, float* sc, float* m) {
  if (j < 4) {
    *sc = (float)(s[j] & 63);
    *m = (float)(s[j + 4] & 63);
  } else {
    *sc = (float)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
    *m = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
  }
}

// The signed 6-bit scale of sub-block j (of 16) of a Q3_K super-block.
inline float q3k_scale(global const uchar* s, int j) {
  const int low = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
  const int high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
  return (float)((low | (high << 4)) - 32);
}

// The IQ4_NL / IQ4_XS levels a 4-bit code indexes (pyllm::kIq4Levels).
constant char kIq4Levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                1,    13,   25,  38,  53,  69,  89,  113};

// The 32 values of chunk c of a weight row (elements 32c .. 32c + 31; for the plain types only
// the first `left` of them exist, the rest read as 0). Each value is the format's exact
// dequantization in F32 (a half scale times a small integer, minus a half min times one).
void deq_chunk(int type, global const uchar* row, int c, int left, float* out) {
  switch (type) {
    case T_F32: {
      global const float* w = (global const float*)row + c * CHUNK;
      for (int j = 0; j < CHUNK; ++j) out[j] = j < left ? w[j] : 0.0f;
      return;
    }
    case T_F16: {
      global const half* w = (global const half*)row + c * CHUNK;
      for (int j = 0; j < CHUNK; ++j) out[j] = j < left ? vload_half(j, w) : 0.0f;
      return;
    }
    case T_BF16: {
      global const uchar* w = row + c * CHUNK * 2;
      for (int j = 0; j < CHUNK; ++j) out[j] = j < left ? ld_bf16(w + 2 * j) : 0.0f;
      return;
    }
    case T_Q4_0: {
      global const uchar* b = row + c * 18;
      const float d = ld_half(b);
      for (int j = 0; j < 16; ++j) {
        const uchar q = b[2 + j];
        out[j] = d * (float)((q & 0xF) - 8);
        out[j + 16] = d * (float)((q >> 4) - 8);
      }
      return;
    }
    case T_Q4_1: {
      global const uchar* b = row + c * 20;
      const float d = ld_half(b), m = ld_half(b + 2);
      for (int j = 0; j < 16; ++j) {
        const uchar q = b[4 + j];
        out[j] = d * (float)(q & 0xF) + m;
        out[j + 16] = d * (float)(q >> 4) + m;
      }
      return;
    }
    case T_Q5_0: {
      global const uchar* b = row + c * 22;
      const float d = ld_half(b);
      const uint qh = ld_u32(b + 2);
      for (int j = 0; j < 16; ++j) {
        const uchar q = b[6 + j];
        // (int): qh is unsigned, and the subtraction must not wrap
        out[j] = d * (float)((int)((q & 0xF) | (((qh >> j) & 1) << 4)) - 16);
        out[j + 16] = d * (float)((int)((q >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
      }
      return;
    }
    case T_Q5_1: {
      global const uchar* b = row + c * 24;
      const float d = ld_half(b), m = ld_half(b + 2);
      const uint qh = ld_u32(b + 4);
      for (int j = 0; j < 16; ++j) {
        const uchar q = b[8 + j];
        out[j] = d * (float)((q & 0xF) | (((qh >> j) & 1) << 4)) + m;
        out[j + 16] = d * (float)((q >> 4) | (((qh >> (j + 16)) & 1) << 4)) + m;
      }
      return;
    }
    case T_Q8_0: {
      global const uchar* b = row + c * 34;
      const float d = ld_half(b);
      global const char* q = (global const char*)(b + 2);
      for (int j = 0; j < CHUNK; ++j) out[j] = d * (float)q[j];
      return;
    }
    case T_Q2_K: {  // 84 bytes: scales[16], qs[64], d, dmin
      global const uchar* b = row + (c / 8) * 84;
      const int e = (c % 8) * CHUNK, h = e / 128, sh = (e % 128) / 32;
      global const uchar* q = b + 16 + 32 * h;
      const float d = ld_half(b + 80), dmin = ld_half(b + 82);
      for (int l = 0; l < CHUNK; ++l) {
        const uchar sc = b[h * 8 + sh * 2 + l / 16];
        out[l] = d * (float)(sc & 0xF) * (float)((q[l] >> (2 * sh)) & 3) -
                 dmin * (float)(sc >> 4);
      }
      return;
    }
    case T_Q3_K: {  // 110 bytes: hmask[32], qs[64], scales[12], d
      global const uchar* b = row + (c / 8) * 110;
      const int e = (c % 8) * CHUNK, h = e / 128, sh = (e % 128) / 32;
      global const uchar* q = b + 32 + 32 * h;
      const int bit = h * 4 + sh;
      const float d = ld_half(b + 108);
      for (int l = 0; l < CHUNK; ++l) {
        const int v = ((q[l] >> (2 * sh)) & 3) - (((b[l] >> bit) & 1) ? 0 : 4);
        out[l] = d * q3k_scale(b + 96, h * 8 + sh * 2 + l / 16) * (float)v;
      }
      return;
    }
    case T_Q4_K:    // 144 bytes: d, dmin, scales[12], qs[128]
    case T_Q5_K: {  // 176 bytes: d, dmin, scales[12], qh[32], qs[128]
      const bool five = type == T_Q5_K;
      global const uchar* b = row + (c / 8) * (five ? 176 : 144);
      const int j = c % 8;
      global const uchar* q = b + (five ? 48 : 16) + 32 * (j / 2);
      const int shift = (j % 2) * 4;
      float sc, m;
      scale_min_k4(j, b + 4, &sc, &m);
      const float d = ld_half(b) * sc, dm = ld_half(b + 2) * m;
      for (int l = 0; l < CHUNK; ++l) {
        const int v = ((q[l] >> shift) & 0xF) | (five ? (((b[16 + l] >> j) & 1) << 4) : 0);
        out[l] = d * (float)v - dm;
      }
      return;
    }
    case T_Q6_K: {  // 210 bytes: ql[128], qh[64], scales[16] (int8), d
      global const uchar* b = row + (c / 8) * 210;
      const int j = c % 8, h = j / 4, quarter = j % 4;
      global const uchar* ql = b + 64 * h + (quarter % 2) * 32;
      global const uchar* qh = b + 128 + 32 * h;
      global const char* sc = (global const char*)(b + 192) + 8 * h + 2 * quarter;
      const int lshift = (quarter / 2) * 4, hshift = 2 * quarter;
      const float d = ld_half(b + 208);
      for (int l = 0; l < CHUNK; ++l) {
        const int v = (((ql[l] >> lshift) & 0xF) | (((qh[l] >> hshift) & 3) << 4)) - 32;
        out[l] = d * (float)sc[l / 16] * (float)v;
      }
      return;
    }
    case T_IQ4_NL:    // 18 bytes: d, qs[16]
    case T_IQ4_XS: {  // 136 bytes: d, scales_h (u16), scales_l[4], qs[128]
      float d;
      global const uchar* q;
      if (type == T_IQ4_NL) {
        global const uchar* b = row + c * 18;
        d = ld_half(b);
        q = b + 2;
      } else {
        global const uchar* b = row + (c / 8) * 136;
        const int j = c % 8;
        const int ls = ((b[4 + j / 2] >> (4 * (j % 2))) & 0xF) |
                       (((((uint)b[2] | ((uint)b[3] << 8)) >> (2 * j)) & 3) << 4);
        d = ld_half(b) * (float)(ls - 32);
        q = b + 8 + 16 * j;
      }
      for (int l = 0; l < 16; ++l) {
        out[l] = d * (float)kIq4Levels[q[l] & 0xF];
        out[l + 16] = d * (float)kIq4Levels[q[l] >> 4];
      }
      return;
    }
  }
  for (int l = 0; l < CHUNK; ++l) out[l] = NAN;  // a type the host never sends
}

// y[t][o] = W[o] . x[t] for n_out rows of k elements: one work-group of WG items per (row o,
// token t); each item sums the chunks lid, lid + WG, ... and the group reduces in local memory.
kernel void mul_mat(global const uchar* w, int type, long row_bytes, int k, global const float* x,
                    global float* y, int n_out, local float* red) {
  const int o = get_group_id(0), t = get_global_id(1), lid = get_local_id(0);
  const int wg = get_local_size(0);
  global const uchar* row = w + (long)o * row_bytes;
  global const float* xt = x + (long)t * k;
  const int n_chunks = (k + CHUNK - 1) / CHUNK;
  float acc = 0.0f;
  float w_[CHUNK];
  for (int c = lid; c < n_chunks; c += wg) {
    deq_chunk(type, row, c, k - c * CHUNK, w_);
    global const float* xc = xt + c * CHUNK;
    const int n = min(CHUNK, k - c * CHUNK);
    for (int j = 0; j < n; ++j) acc += w_[j] * xc[j];
  }
  red[lid] = acc;
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int s = wg / 2; s > 0; s >>= 1) {
    if (lid < s) red[lid] += red[lid + s];
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  if (lid == 0) y[(long)t * n_out + o] = red[0];
}

// The same product for many tokens (prefill): a work-group of TILE x TILE items computes a tile of
// 2 TILE rows x 2 TILE tokens, staging one 32-element chunk of the rows (decoded) and of the
// tokens in local memory per step, so each weight is decoded once per 2 TILE tokens.
#define TILE 8
#define TR (2 * TILE)
kernel void mul_mat_tiled(global const uchar* w, int type, long row_bytes, int k,
                          global const float* x, global float* y, int n_out, int n_tok) {
  local float ws[TR][CHUNK + 1];
  local float xs[TR][CHUNK + 1];
  const int lr = get_local_id(0), lt = get_local_id(1);
  const int r0 = get_group_id(0) * TR, t0 = get_group_id(1) * TR;
  const int lin = lt * TILE + lr;  // 0 .. TILE * TILE - 1
  const int n_chunks = (k + CHUNK - 1) / CHUNK;
  float acc[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
  for (int c = 0; c < n_chunks; ++c) {
    if (lin < TR) {  // TR items decode one row's chunk each
      float v[CHUNK];
      const int r = r0 + lin;
      if (r < n_out) {
        deq_chunk(type, w + (long)r * row_bytes, c, k - c * CHUNK, v);
      } else {
        for (int j = 0; j < CHUNK; ++j) v[j] = 0.0f;
      }
      for (int j = 0; j < CHUNK; ++j) ws[lin][j] = v[j];
    }
    for (int i = lin; i < TR * CHUNK; i += TILE * TILE) {  // the tokens' chunk
      const int tt = i / CHUNK, j = i % CHUNK, t = t0 + tt, e = c * CHUNK + j;
      xs[tt][j] = (t < n_tok && e < k) ? x[(long)t * k + e] : 0.0f;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int j = 0; j < CHUNK; ++j) {
      const float w0 = ws[lr][j], w1 = ws[lr + TILE][j];
      const float x0 = xs[lt][j], x1 = xs[lt + TILE][j];
      acc[0][0] += w0 * x0;
      acc[0][1] += w0 * x1;
      acc[1][0] += w1 * x0;
      acc[1][1] += w1 * x1;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  for (int a = 0; a < 2; ++a) {
    for (int b = 0; b < 2; ++b) {
      const int r = r0 + lr + a * TILE, t = t0 + lt + b * TILE;
      if (r < n_out && t < n_tok) y[(long)t * n_out + r] = acc[a][b];
    }
  }
}

// y[r] = x[rows[r]] * w / rms(x[rows[r]]) for each row r (rows = null: row r itself); one
// work-group per row. w_row (LoRA norm deltas): row r's weights are w + w_row[r] * n.
kernel void rms_norm(global const float* x, global const int* rows, global const float* w,
                     global const int* w_row, global float* y, int n, float eps,
                     local float* red) {
  const int r = get_group_id(0), lid = get_local_id(0), wg = get_local_size(0);
  global const float* xr = x + (long)(rows ? rows[r] : r) * n;
  if (w_row) w += (long)w_row[r] * n;
  float acc = 0.0f;
  for (int i = lid; i < n; i += wg) acc += xr[i] * xr[i];
  red[lid] = acc;
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int s = wg / 2; s > 0; s >>= 1) {
    if (lid < s) red[lid] += red[lid + s];
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  const float scale = 1.0f / sqrt(red[0] / (float)n + eps);
  for (int i = lid; i < n; i += wg) y[(long)r * n + i] = xr[i] * scale * w[i];
}

// y[t][i] += b[i] for dim-wide rows.
kernel void add_bias(global float* y, global const float* b, int dim) {
  const long i = get_global_id(0);
  y[i] += b[i % dim];
}

// LoRA (pyllm/lora.h): u[t][j] *= coef[coef_at + t] * factor for rank-wide rows (each token's
// coefficient for one adapter); y[t][i] += v[which[t]][i] (a bias delta per run of tokens).
kernel void scale_rows(global float* u, global const float* coef, int coef_at, float factor,
                       int rank) {
  const long i = get_global_id(0);
  u[i] *= coef[coef_at + i / rank] * factor;
}

kernel void add_rows(global float* y, global const float* v, global const int* which, int dim) {
  const long i = get_global_id(0);
  y[i] += v[(long)which[i / dim] * dim + i % dim];
}

kernel void add(global float* y, global const float* x) {
  const long i = get_global_id(0);
  y[i] += x[i];
}

// gate = silu(gate) * up
kernel void swiglu(global float* gate, global const float* up) {
  const long i = get_global_id(0);
  const float g = gate[i];
  gate[i] = g / (1.0f + exp(-g)) * up[i];
}

// Rotates pair i of head h of token t by the angle whose (cos, sin) the host computed
// (cos_sin[t][2i], [2i + 1]): adjacent pairs (llama GGUFs) or halves (NeoX).
kernel void rope(global float* x, global const float* cos_sin, int n_heads, int head_dim,
                 int n_rot, int neox) {
  const int i = get_global_id(0), h = get_global_id(1), t = get_global_id(2);
  const int half_ = n_rot / 2;
  global float* v = x + ((long)t * n_heads + h) * head_dim;
  const float c = cos_sin[(long)t * n_rot + 2 * i], s = cos_sin[(long)t * n_rot + 2 * i + 1];
  const int ia = neox ? i : 2 * i, ib = neox ? i + half_ : 2 * i + 1;
  const float a = v[ia], b = v[ib];
  v[ia] = a * c - b * s;
  v[ib] = a * s + b * c;
}

// Stores the dim-wide K (or V) row of token t at cache row rows[t], converted to the cache's
// type: one work-item per 32 elements (a Q8_0 block).
kernel void kv_store(global const float* src, global uchar* cache, global const long* rows,
                     long row_bytes, int dim, int type) {
  const int blk = get_global_id(0), t = get_global_id(1);
  global const float* x = src + (long)t * dim + blk * 32;
  global uchar* row = cache + rows[t] * row_bytes;
  if (type == T_F32) {
    for (int j = 0; j < 32; ++j) ((global float*)row)[blk * 32 + j] = x[j];
  } else if (type == T_F16) {
    for (int j = 0; j < 32; ++j) vstore_half_rte(x[j], blk * 32 + j, (global half*)row);
  } else {  // Q8_0, as quantize_row_q8_0: d = amax / 127, q = round(x / d) half away from zero
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = fmax(amax, fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    global uchar* b = row + blk * 34;
    vstore_half_rte(d, 0, (global half*)b);
    for (int j = 0; j < 32; ++j) ((global char*)(b + 2))[j] = convert_char_sat(round(x[j] * id));
  }
}

// Element i of one head's slice of a cache row.
inline float kv_at(global const uchar* row, int type, int i) {
  if (type == T_F32) return ((global const float*)row)[i];
  if (type == T_F16) return vload_half(i, (global const half*)row);
  global const uchar* b = row + (i / 32) * 34;
  return ld_half(b) * (float)((global const char*)(b + 2))[i % 32];
}

// Causal attention of query head h of token t over the keys of its sequence, in tiles of WG keys
// with a running (online) softmax. Work-group (WG, 1, 1) per (h, t); head_dim <= 4 * WG.
// region[t]: the first cache row of token t's sequence; visible[t]: the keys it sees.
kernel void attention(global const float* q, global float* out, global const uchar* kc,
                      global const uchar* vc, long row_bytes, long head_bytes, int type,
                      global const long* region, global const int* visible, int n_head,
                      int group, int head_dim, float scale, local float* qs, local float* p) {
  const int lid = get_local_id(0), wg = get_local_size(0);
  const int h = get_group_id(1), t = get_group_id(2);
  const long qoff = ((long)t * n_head + h) * head_dim;
  for (int i = lid; i < head_dim; i += wg) qs[i] = q[qoff + i];
  barrier(CLK_LOCAL_MEM_FENCE);
  const int n_vis = visible[t];
  global const uchar* kbase = kc + region[t] * row_bytes + (long)(h / group) * head_bytes;
  global const uchar* vbase = vc + region[t] * row_bytes + (long)(h / group) * head_bytes;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  float m = -INFINITY, l = 0.0f;
  for (int start = 0; start < n_vis; start += wg) {
    const int j = start + lid;
    float s = -INFINITY;
    if (j < n_vis) {
      global const uchar* krow = kbase + (long)j * row_bytes;
      s = 0.0f;
      for (int i = 0; i < head_dim; ++i) s += qs[i] * kv_at(krow, type, i);
      s *= scale;
    }
    p[lid] = s;
    barrier(CLK_LOCAL_MEM_FENCE);
    const int n_tile = min(wg, n_vis - start);
    float tmax = -INFINITY;
    for (int jj = 0; jj < n_tile; ++jj) tmax = fmax(tmax, p[jj]);
    const float m_new = fmax(m, tmax);
    barrier(CLK_LOCAL_MEM_FENCE);
    p[lid] = j < n_vis ? exp(s - m_new) : 0.0f;
    barrier(CLK_LOCAL_MEM_FENCE);
    const float corr = exp(m - m_new);
    float tsum = 0.0f;
    for (int jj = 0; jj < n_tile; ++jj) tsum += p[jj];
    l = l * corr + tsum;
    for (int r = 0; r < 4; ++r) {
      const int d = lid + r * wg;
      if (d >= head_dim) break;
      float a = acc[r] * corr;
      for (int jj = 0; jj < n_tile; ++jj) {
        a += p[jj] * kv_at(vbase + (long)(start + jj) * row_bytes, type, d);
      }
      acc[r] = a;
    }
    m = m_new;
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  for (int r = 0; r < 4; ++r) {
    const int d = lid + r * wg;
    if (d < head_dim) out[qoff + d] = acc[r] / l;
  }
}

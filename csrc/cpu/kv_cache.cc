// KVCache: allocation, row storage and a stage's part of the state (see kv_cache.h).
#include "cpu/kv_cache.h"

#include <cstring>
#include <new>

#include "pyllm/fp16.h"
#include "pyllm/quant.h"

namespace pyllm {

KVCache::KVCache(const HParams& hp, const ContextParams& p, int n_layer)
    : dim_(int64_t(hp.n_head_kv) * hp.head_dim), type_(kv_element_type(p.kv_type)) {
  row_bytes_ = row_size(type_, dim_);
  head_bytes_ = row_size(type_, hp.head_dim);
  n_ctx_ = p.n_ctx;
  const size_t bytes = static_cast<size_t>(p.n_ctx) * p.n_seq * row_bytes_;
  for (auto* side : {&k_, &v_}) {
    side->resize(n_layer);
    for (ZeroedBuf<uint8_t>& rows : *side) rows.resize(bytes);
  }
}

void KVCache::store(const OpsTable& op, const float* src, uint8_t* dst) const {
  if (type_ == QType::Q8_0) {
    quantize_row_q8_0(src, reinterpret_cast<BlockQ8_0*>(dst), dim_);
  } else if (type_ == QType::F32) {
    std::memcpy(dst, src, sizeof(float) * dim_);
  } else {
    op.f32_to_f16(src, reinterpret_cast<f16_t*>(dst), dim_);
  }
}

// Sequence seq's rows start at row seq * n_ctx of each layer's storage.
void KVCache::save(int seq, int n_past, uint8_t* out) const {
  const int64_t per_layer = int64_t(n_past) * row_bytes_, base = int64_t(seq) * n_ctx_ * row_bytes_;
  for (int il = 0; il < n_layer(); ++il) {
    std::memcpy(out, k_[il].data() + base, per_layer);
    out += per_layer;
    std::memcpy(out, v_[il].data() + base, per_layer);
    out += per_layer;
  }
}

void KVCache::load(int seq, int n_past, const uint8_t* in) {
  const int64_t per_layer = int64_t(n_past) * row_bytes_, base = int64_t(seq) * n_ctx_ * row_bytes_;
  for (int il = 0; il < n_layer(); ++il) {
    std::memcpy(k_[il].data() + base, in, per_layer);
    in += per_layer;
    std::memcpy(v_[il].data() + base, in, per_layer);
    in += per_layer;
  }
}

void KVCache::shift(const OpsTable& op, int seq, int keep, int n_discard, int n_past,
                    const float* rot, int n_head_kv, int head_dim, int n_rot, bool neox) {
  const int64_t base = int64_t(seq) * n_ctx_;
  std::vector<float> row(static_cast<size_t>(dim_));
  for (int il = 0; il < n_layer(); ++il) {
    uint8_t* kc = k_[il].data() + base * row_bytes_;
    uint8_t* vc = v_[il].data() + base * row_bytes_;
    // rows move down, so copying in increasing position order never overwrites a row before
    // it is read
    std::memmove(vc + int64_t(keep) * row_bytes_, vc + int64_t(keep + n_discard) * row_bytes_,
                 int64_t(n_past - keep - n_discard) * row_bytes_);
    for (int p = keep + n_discard; p < n_past; ++p) {
      const uint8_t* src = kc + int64_t(p) * row_bytes_;
      if (type_ == QType::Q8_0) {
        dequantize_row_q8_0(reinterpret_cast<const BlockQ8_0*>(src), row.data(), dim_);
      } else if (type_ == QType::F32) {
        std::memcpy(row.data(), src, sizeof(float) * dim_);
      } else {
        f16_to_f32_row(reinterpret_cast<const f16_t*>(src), row.data(), dim_);
      }
      op.rope(row.data(), n_head_kv, head_dim, n_rot, rot, neox);
      store(op, row.data(), kc + int64_t(p - n_discard) * row_bytes_);
    }
  }
}

}  // namespace pyllm

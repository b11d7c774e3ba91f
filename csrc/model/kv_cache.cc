// KVCache: allocation, row storage and the state format (see kv_cache.h).
#include "model/kv_cache.h"

#include <cstring>
#include <stdexcept>

#include "pyllm/fp16.h"
#include "pyllm/quant.h"

namespace pyllm {

KVCache::KVCache(const HParams& hp, const ContextParams& p)
    : n_ctx_(p.n_ctx),
      dim_(int64_t(hp.n_head_kv) * hp.head_dim),
      type_(p.kv_type == KVType::Q8_0  ? QType::Q8_0
            : p.kv_type == KVType::F32 ? QType::F32
                                       : QType::F16) {
  row_bytes_ = row_size(type_, dim_);
  head_bytes_ = row_size(type_, hp.head_dim);
  const size_t rows = static_cast<size_t>(p.n_ctx) * p.n_seq;
  k_.assign(hp.n_layer, std::vector<uint8_t>(rows * row_bytes_));
  v_.assign(hp.n_layer, std::vector<uint8_t>(rows * row_bytes_));
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

namespace {
constexpr int32_t kStateMagic = 0x504c4c4d;  // "MLLP"
}  // namespace

std::vector<uint8_t> KVCache::save(int n_past) const {
  const int n_layer = this->n_layer();
  const int64_t per_layer = int64_t(n_past) * row_bytes_;
  const int32_t header[5] = {kStateMagic, n_past, n_layer, static_cast<int32_t>(dim_),
                             static_cast<int32_t>(type_)};
  std::vector<uint8_t> out(sizeof header + 2 * per_layer * n_layer);
  uint8_t* p = out.data();
  std::memcpy(p, header, sizeof header);
  p += sizeof header;
  for (int il = 0; il < n_layer; ++il) {
    std::memcpy(p, k_[il].data(), per_layer);
    p += per_layer;
    std::memcpy(p, v_[il].data(), per_layer);
    p += per_layer;
  }
  return out;
}

int KVCache::load(const uint8_t* data, int64_t size) {
  const int n_layer = this->n_layer();
  int32_t header[5];
  if (size < static_cast<int64_t>(sizeof header)) throw std::invalid_argument("state is too short");
  std::memcpy(header, data, sizeof header);
  if (header[0] != kStateMagic || header[2] != n_layer || header[3] != dim_) {
    throw std::invalid_argument("state was saved from a different model");
  }
  if (header[4] != static_cast<int32_t>(type_)) {
    throw std::invalid_argument("state was saved with a different KV cache type");
  }
  const int n = header[1];
  if (n < 0 || n > n_ctx_) throw std::invalid_argument("state does not fit in this context");
  const int64_t per_layer = int64_t(n) * row_bytes_;
  if (size != static_cast<int64_t>(sizeof header) + 2 * per_layer * n_layer) {
    throw std::invalid_argument("state size does not match its header");
  }
  const uint8_t* p = data + sizeof header;
  for (int il = 0; il < n_layer; ++il) {
    std::memcpy(k_[il].data(), p, per_layer);
    p += per_layer;
    std::memcpy(v_[il].data(), p, per_layer);
    p += per_layer;
  }
  return n;
}

}  // namespace pyllm

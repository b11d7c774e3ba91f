// The rows16 weight layout (see pyllm/repack.h): GGUF rows <-> groups of 16 interleaved rows.
// Plain byte shuffling, portable; used once per tensor at model load (repack) and by the
// fallback path of matmul for ISAs or token counts without a rows16 kernel (unpack).
#include "pyllm/repack.h"

#include <cstring>
#include <stdexcept>
#include <string>

#include "pyllm/quant.h"

namespace pyllm {
namespace {

// Where the fields of one GGUF block live, per supported type.
struct Geometry {
  int64_t block_elems;
  int64_t block_bytes;  // GGUF block
  int64_t header_bytes;  // rows16 header of a group block
  int64_t body_offset;   // quant bytes within the GGUF block
  int64_t body_bytes;    // (a multiple of 4)
};

inline bool geometry(QType t, Geometry* g) {
  switch (t) {
    case QType::Q4_0:
      *g = {QK4_0, sizeof(BlockQ4_0), 32, offsetof(BlockQ4_0, qs), QK4_0 / 2};
      return true;
    case QType::Q4_1:
      *g = {QK4_1, sizeof(BlockQ4_1), 64, offsetof(BlockQ4_1, qs), QK4_1 / 2};
      return true;
    case QType::Q8_0:
      *g = {QK8_0, sizeof(BlockQ8_0), 32, offsetof(BlockQ8_0, qs), QK8_0};
      return true;
    case QType::Q4_K:
      *g = {QK_K, sizeof(BlockQ4_K), 64 + 256, offsetof(BlockQ4_K, qs), QK_K / 2};
      return true;
    case QType::Q5_K:  // qh then qs, adjacent: the body is the 8 qh chunks, then the 32 qs ones
      *g = {QK_K, sizeof(BlockQ5_K), 64 + 256, offsetof(BlockQ5_K, qh), QK_K / 8 + QK_K / 2};
      return true;
    case QType::Q6_K:  // ql and qh are adjacent, at the start of the block
      *g = {QK_K, sizeof(BlockQ6_K), 32 + 256, offsetof(BlockQ6_K, ql), QK_K / 2 + QK_K / 4};
      return true;
    case QType::IQ4_NL:
      *g = {QK4_NL, sizeof(BlockIQ4_NL), 32, offsetof(BlockIQ4_NL, qs), QK4_NL / 2};
      return true;
    case QType::IQ4_XS:
      *g = {QK_K, sizeof(BlockIQ4_XS), 32 + 128, offsetof(BlockIQ4_XS, qs), QK_K / 2};
      return true;
    default:
      return false;
  }
}

Geometry checked_geometry(QType t) {
  Geometry g{};
  if (!geometry(t, &g)) {
    throw std::invalid_argument("rows16 layout: unsupported weight type id " +
                                std::to_string(static_cast<uint32_t>(t)));
  }
  return g;
}

// Q4_K / Q5_K pack 8 six-bit scales and 8 six-bit mins into 12 bytes: bytes 0-3 hold scales
// 0-3 in their low 6 bits and the top 2 bits of scales 4-7 above; bytes 4-7 the same for the
// mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble). All
// 96 bits are used, so unpacking is a bijection and pack_k4 restores the exact bytes.
void unpack_k4(const uint8_t* p, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = p[j] & 63;
    mn[j] = p[j + 4] & 63;
    sc[j + 4] = static_cast<uint8_t>((p[j + 8] & 0x0F) | ((p[j] >> 6) << 4));
    mn[j + 4] = static_cast<uint8_t>((p[j + 8] >> 4) | ((p[j + 4] >> 6) << 4));
  }
}

void pack_k4(const uint8_t* sc, const uint8_t* mn, uint8_t* p) {
  for (int j = 0; j < 4; ++j) {
    p[j] = static_cast<uint8_t>(sc[j] | ((sc[j + 4] >> 4) << 6));
    p[j + 4] = static_cast<uint8_t>(mn[j] | ((mn[j + 4] >> 4) << 6));
    p[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4));
  }
}

// IQ4_XS packs its 8 six-bit sub-block scales as 4 low bits in scales_l (two per byte) and 2
// high bits in scales_h (bits 2 j): all 48 bits are used, so the unpacked scales (stored minus
// 32, as the signed factor the kernels multiply by) give back the exact bytes.
void unpack_iq4xs(const BlockIQ4_XS* b, int8_t* sc) {
  for (int j = 0; j < 8; ++j) {
    const int low = (b->scales_l[j / 2] >> (4 * (j % 2))) & 0x0F;
    const int high = (b->scales_h >> (2 * j)) & 3;
    sc[j] = static_cast<int8_t>((low | (high << 4)) - 32);
  }
}

void pack_iq4xs(const int8_t* sc, BlockIQ4_XS* b) {
  uint16_t h = 0;
  for (int j = 0; j < 8; ++j) {
    const int ls = sc[j] + 32;
    h = static_cast<uint16_t>(h | ((ls >> 4) << (2 * j)));
    if (j % 2 == 0) b->scales_l[j / 2] = static_cast<uint8_t>(ls & 0x0F);
    else b->scales_l[j / 2] = static_cast<uint8_t>(b->scales_l[j / 2] | ((ls & 0x0F) << 4));
  }
  b->scales_h = h;
}

// Header fields of row r of a group block <-> the GGUF block.
inline void put_header(QType t, const uint8_t* blk, int r, uint8_t* hdr) {
  switch (t) {
    case QType::Q4_0:
    case QType::Q8_0:
    case QType::IQ4_NL:
      std::memcpy(hdr + 2 * r, blk, 2);  // d is the first field of each
      break;
    case QType::IQ4_XS: {
      BlockIQ4_XS b;
      std::memcpy(&b, blk, sizeof(b));
      std::memcpy(hdr + 2 * r, &b.d, 2);
      int8_t sc[8];
      unpack_iq4xs(&b, sc);
      for (int j = 0; j < 8; ++j) hdr[32 + 16 * j + r] = static_cast<uint8_t>(sc[j]);
      break;
    }
    case QType::Q4_1:
      std::memcpy(hdr + 2 * r, blk + offsetof(BlockQ4_1, d), 2);
      std::memcpy(hdr + 32 + 2 * r, blk + offsetof(BlockQ4_1, m), 2);
      break;
    case QType::Q4_K:
    case QType::Q5_K: {  // the same header fields at the same offsets
      static_assert(offsetof(BlockQ4_K, scales) == offsetof(BlockQ5_K, scales), "K4 header");
      std::memcpy(hdr + 2 * r, blk + offsetof(BlockQ4_K, d), 2);
      std::memcpy(hdr + 32 + 2 * r, blk + offsetof(BlockQ4_K, dmin), 2);
      uint8_t sc[8], mn[8];
      unpack_k4(blk + offsetof(BlockQ4_K, scales), sc, mn);
      for (int j = 0; j < 8; ++j) {
        hdr[64 + 16 * j + r] = sc[j];
        hdr[64 + 128 + 16 * j + r] = mn[j];
      }
      break;
    }
    case QType::Q6_K:
      std::memcpy(hdr + 2 * r, blk + offsetof(BlockQ6_K, d), 2);
      for (int j = 0; j < 16; ++j) hdr[32 + 16 * j + r] = blk[offsetof(BlockQ6_K, scales) + j];
      break;
    default:
      break;
  }
}

inline void get_header(QType t, const uint8_t* hdr, int r, uint8_t* blk) {
  switch (t) {
    case QType::Q4_0:
    case QType::Q8_0:
    case QType::IQ4_NL:
      std::memcpy(blk, hdr + 2 * r, 2);
      break;
    case QType::IQ4_XS: {
      BlockIQ4_XS b;
      std::memcpy(&b, blk, sizeof(b));
      std::memcpy(&b.d, hdr + 2 * r, 2);
      int8_t sc[8];
      for (int j = 0; j < 8; ++j) sc[j] = static_cast<int8_t>(hdr[32 + 16 * j + r]);
      pack_iq4xs(sc, &b);
      std::memcpy(blk, &b, offsetof(BlockIQ4_XS, qs));  // the header fields only
      break;
    }
    case QType::Q4_1:
      std::memcpy(blk + offsetof(BlockQ4_1, d), hdr + 2 * r, 2);
      std::memcpy(blk + offsetof(BlockQ4_1, m), hdr + 32 + 2 * r, 2);
      break;
    case QType::Q4_K:
    case QType::Q5_K: {
      std::memcpy(blk + offsetof(BlockQ4_K, d), hdr + 2 * r, 2);
      std::memcpy(blk + offsetof(BlockQ4_K, dmin), hdr + 32 + 2 * r, 2);
      uint8_t sc[8], mn[8];
      for (int j = 0; j < 8; ++j) {
        sc[j] = hdr[64 + 16 * j + r];
        mn[j] = hdr[64 + 128 + 16 * j + r];
      }
      pack_k4(sc, mn, blk + offsetof(BlockQ4_K, scales));
      break;
    }
    case QType::Q6_K:
      std::memcpy(blk + offsetof(BlockQ6_K, d), hdr + 2 * r, 2);
      for (int j = 0; j < 16; ++j) blk[offsetof(BlockQ6_K, scales) + j] = hdr[32 + 16 * j + r];
      break;
    default:
      break;
  }
}

// Source chunk (4 bytes of the GGUF block body) stored at body position pos. Identity except
// for Q6_K, whose kernel consumes, for each half h and l-chunk c, the ql chunk of elements
// 128 h + 4 c (and + 64), the ql chunk of 128 h + 32 + 4 c (and + 96) and the qh chunk with
// their high bits: storing them in that order keeps the weight stream strictly sequential
// (the hardware prefetchers lose a jumping pattern: ~6 GB/s instead of ~28 from DRAM).
inline int64_t src_chunk(QType t, int64_t pos) {
  if (t != QType::Q6_K) return pos;
  const int64_t h = pos / 24, c = pos % 24 / 3, s = pos % 3;
  return s == 0 ? 16 * h + c : s == 1 ? 16 * h + 8 + c : 32 + 8 * h + c;
}

}  // namespace

bool repack_supported(QType type) {
  Geometry g{};
  return geometry(type, &g);
}

int64_t repack_group_block_bytes(QType type) {
  const Geometry g = checked_geometry(type);
  return g.header_bytes + kRepackRows * g.body_bytes;
}

int64_t repacked_size(QType type, int64_t n_rows, int64_t k) {
  const Geometry g = checked_geometry(type);
  if (n_rows < 0 || n_rows % kRepackRows) {
    throw std::invalid_argument("rows16 layout: row count " + std::to_string(n_rows) +
                                " is not a multiple of 16");
  }
  if (k < 0 || k % g.block_elems) {
    throw std::invalid_argument("rows16 layout: k = " + std::to_string(k) +
                                " is not a multiple of the block size");
  }
  // tensor_size checks the GGUF size for overflow; the rows16 size is at most 3 % larger.
  const int64_t gguf = tensor_size(type, n_rows, k);
  if (gguf > (int64_t{1} << 56)) throw std::invalid_argument("rows16 layout: tensor too large");
  const int64_t per_group = k / g.block_elems * (g.header_bytes + kRepackRows * g.body_bytes);
  return n_rows / kRepackRows * per_group;
}

namespace {

// The loops below are instantiated per type so that the geometry is constant and the header
// switch and chunk loops fold away (the generic version ran ~1 GB/s; load time matters).
template <QType T>
void repack_t(const void* src, int64_t k, int64_t g0, int64_t g1, void* dst) {
  Geometry g{};
  geometry(T, &g);
  const int64_t nb = k / g.block_elems;
  const int64_t row_bytes = nb * g.block_bytes;
  const int64_t gb_bytes = g.header_bytes + kRepackRows * g.body_bytes;
  const int64_t chunks = g.body_bytes / 4;
  for (int64_t grp = g0; grp < g1; ++grp) {
    const uint8_t* rows = static_cast<const uint8_t*>(src) + grp * kRepackRows * row_bytes;
    uint8_t* out = static_cast<uint8_t*>(dst) + grp * nb * gb_bytes;
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* hdr = out + b * gb_bytes;
      uint8_t* body = hdr + g.header_bytes;
      for (int r = 0; r < kRepackRows; ++r) {
        const uint8_t* blk = rows + r * row_bytes + b * g.block_bytes;
        put_header(T, blk, r, hdr);
        for (int64_t c = 0; c < chunks; ++c) {
          std::memcpy(body + 64 * c + 4 * r, blk + g.body_offset + 4 * src_chunk(T, c), 4);
        }
      }
    }
  }
}

template <QType T>
void unpack_t(const void* src, int64_t k, int64_t grp, void* dst) {
  Geometry g{};
  geometry(T, &g);
  const int64_t nb = k / g.block_elems;
  const int64_t row_bytes = nb * g.block_bytes;
  const int64_t gb_bytes = g.header_bytes + kRepackRows * g.body_bytes;
  const int64_t chunks = g.body_bytes / 4;
  const uint8_t* in = static_cast<const uint8_t*>(src) + grp * nb * gb_bytes;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* hdr = in + b * gb_bytes;
    const uint8_t* body = hdr + g.header_bytes;
    for (int r = 0; r < kRepackRows; ++r) {
      uint8_t* blk = static_cast<uint8_t*>(dst) + r * row_bytes + b * g.block_bytes;
      get_header(T, hdr, r, blk);
      for (int64_t c = 0; c < chunks; ++c) {
        std::memcpy(blk + g.body_offset + 4 * src_chunk(T, c), body + 64 * c + 4 * r, 4);
      }
    }
  }
}

}  // namespace

void repack_rows16(QType type, const void* src, int64_t k, int64_t g0, int64_t g1, void* dst) {
  checked_geometry(type);
  switch (type) {
    case QType::Q4_0: repack_t<QType::Q4_0>(src, k, g0, g1, dst); break;
    case QType::Q4_1: repack_t<QType::Q4_1>(src, k, g0, g1, dst); break;
    case QType::Q8_0: repack_t<QType::Q8_0>(src, k, g0, g1, dst); break;
    case QType::Q4_K: repack_t<QType::Q4_K>(src, k, g0, g1, dst); break;
    case QType::Q5_K: repack_t<QType::Q5_K>(src, k, g0, g1, dst); break;
    case QType::IQ4_NL: repack_t<QType::IQ4_NL>(src, k, g0, g1, dst); break;
    case QType::IQ4_XS: repack_t<QType::IQ4_XS>(src, k, g0, g1, dst); break;
    default: repack_t<QType::Q6_K>(src, k, g0, g1, dst); break;
  }
}

void unpack_rows16_group(QType type, const void* src, int64_t k, int64_t grp, void* dst) {
  checked_geometry(type);
  switch (type) {
    case QType::Q4_0: unpack_t<QType::Q4_0>(src, k, grp, dst); break;
    case QType::Q4_1: unpack_t<QType::Q4_1>(src, k, grp, dst); break;
    case QType::Q8_0: unpack_t<QType::Q8_0>(src, k, grp, dst); break;
    case QType::Q4_K: unpack_t<QType::Q4_K>(src, k, grp, dst); break;
    case QType::Q5_K: unpack_t<QType::Q5_K>(src, k, grp, dst); break;
    case QType::IQ4_NL: unpack_t<QType::IQ4_NL>(src, k, grp, dst); break;
    case QType::IQ4_XS: unpack_t<QType::IQ4_XS>(src, k, grp, dst); break;
    default: unpack_t<QType::Q6_K>(src, k, grp, dst); break;
  }
}

}  // namespace pyllm

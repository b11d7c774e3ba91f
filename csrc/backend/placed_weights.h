// What a device backend (OpenCL, CUDA) keeps of a model's weights: for each layer placed on it
// every slot of LayerSlots as one of its own tensors, and the head's norm and output matrix,
// each uploaded once at load in its GGUF form. The walk over the placed slots and the size
// check before anything is allocated are here, written once for every such backend.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "pyllm/model.h"
#include "pyllm/quant.h"

namespace pyllm {

// Calls fn(view) for every weight of `ranges` (and of the head, with the range that has it).
template <typename Fn>
void for_each_placed_view(const ModelWeights& w, const std::vector<LayerRange>& ranges, Fn&& fn) {
  for (const LayerRange& r : ranges) {
    for (int il = r.first; il < r.last; ++il) {
      for (const auto& slot : kLayerSlots<WeightView>) fn(w.layers[il].*slot.second);
    }
    if (r.head) {
      fn(w.output_norm);
      fn(w.output.present() ? w.output : w.tok_embd);  // a tied output is the embedding table
    }
  }
}

// Whether the device backends' matmul kernels (csrc/opencl/kernels.cl, csrc/cuda/kernels.cuh)
// decode weights of type t: the float, legacy, k-quant and IQ4 types. The grid i-quants and
// the ternary types run on the CPU only so far.
inline bool device_decodes(QType t) {
  switch (t) {
    case QType::F32: case QType::F16: case QType::BF16:
    case QType::Q4_0: case QType::Q4_1: case QType::Q5_0: case QType::Q5_1: case QType::Q8_0:
    case QType::Q2_K: case QType::Q3_K: case QType::Q4_K: case QType::Q5_K: case QType::Q6_K:
    case QType::IQ4_NL: case QType::IQ4_XS:
      return true;
    default:
      return false;
  }
}

// Bytes of the weights of `ranges` on `device`; throws DeviceError for a view of a type the
// device kernels cannot decode, not in its GGUF layout, or larger than the device's largest
// buffer (`max_buffer`).
inline uint64_t placed_weight_bytes(const ModelWeights& w, const std::vector<LayerRange>& ranges,
                                    uint64_t max_buffer, const std::string& device) {
  uint64_t total = 0;
  for_each_placed_view(w, ranges, [&](const WeightView& v) {
    if (!v.present()) return;
    if (!device_decodes(v.type)) {
      throw DeviceError(v.name + ": " + device + " has no kernels for " +
                        type_traits(v.type).name + " weights yet; keep these layers on the CPU");
    }
    if (v.layout != WeightLayout::Gguf) throw DeviceError(v.name + ": not in its GGUF layout");
    if (static_cast<uint64_t>(v.nbytes) > max_buffer) {
      throw DeviceError(v.name + " needs " + std::to_string(v.nbytes) + " bytes in one buffer; " +
                        device + " allows at most " + std::to_string(max_buffer));
    }
    total += static_cast<uint64_t>(v.nbytes);
  });
  return total;
}

// The device memory a backend may fill: `reported`, or less for tests (PYLLM_TEST_DEVICE_MEMORY,
// bytes), so that the "not enough device memory" path can be checked on any device.
inline uint64_t device_room(uint64_t reported) {
  if (const char* limit = std::getenv("PYLLM_TEST_DEVICE_MEMORY")) {
    return std::min<uint64_t>(reported, std::strtoull(limit, nullptr, 10));
  }
  return reported;
}

// The uploaded weights: T is the backend's tensor (default-constructed = an absent slot).
template <typename T>
class PlacedWeights final : public WeightStore {
 public:
  // upload(view) -> T, for every present weight of `ranges`.
  template <typename Upload>
  PlacedWeights(const ModelWeights& w, const std::vector<LayerRange>& ranges, Upload&& upload)
      : layers(w.layers.size()) {
    auto take = [&](const WeightView& v, T& into) {
      if (!v.present()) return;
      into = upload(v);
      held_ += v.nbytes;
    };
    for (const LayerRange& r : ranges) {
      for (int il = r.first; il < r.last; ++il) {
        // kLayerSlots lists the slots in the same order for every V
        for (size_t i = 0; i < std::size(kLayerSlots<T>); ++i) {
          take(w.layers[il].*kLayerSlots<WeightView>[i].second, layers[il].*kLayerSlots<T>[i].second);
        }
      }
      if (r.head) {
        take(w.output_norm, output_norm);
        take(w.output.present() ? w.output : w.tok_embd, output);
      }
    }
  }
  int64_t bytes() const override { return held_; }

  std::vector<LayerSlots<T>> layers;  // by layer index; only the placed ones are filled
  T output_norm, output;              // with the head

 private:
  int64_t held_ = 0;
};

}  // namespace pyllm

// The device seam: what a model and its contexts ask of the hardware that runs their layers.
//
// Which backend runs which layers is the model's placement (csrc/model/placement.h), decided at
// load: each backend then prepares the weights of its layers once (Backend::prepare: the CPU
// repacks matrices, a GPU uploads them). A context (csrc/model/context.cc) opens a Device per
// backend and a Stage per placed range: the range's K/V storage and, on the stage with the
// model's head, the final norm and output projection. Per chunk of tokens the context plans on
// the host (positions, RoPE angles, which keys each token sees and where its K/V rows go),
// embeds the tokens into host rows of hidden state and hands those rows through its stages in
// layer order.
//
// A new backend (OpenCL, CUDA, ...) implements Backend, Device and Stage in its own folder
// beside csrc/cpu/ and is listed in csrc/backend/registry.cc; the context, the chunk plan and
// the Python layer do not change. Layers another process runs (an MPI rank of a layer
// pipeline) are no backend here: they are a "remote" placement range (model/placement.h).
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/attention_schedule.h"
#include "pyllm/activation_stats.h"
#include "pyllm/lora.h"
#include "pyllm/model.h"

namespace pyllm {

// A backend or device that cannot do what was asked: none found, not enough device memory, a
// backend this build lacks (pyllm.errors.DeviceError in Python).
class DeviceError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One chunk of n tokens as every stage sees it; all of it lives in host memory and stays valid
// for the duration of one run_layers() call.
struct Chunk {
  int n = 0;
  const int* pos = nullptr;   // position of token t in its sequence
  const int* seq = nullptr;   // sequence (KV region) of token t
  const float* rope = nullptr;  // [n][n_rot]: (cos, sin) pairs of token t's angles
  const AttentionSchedule* schedule = nullptr;  // keys token t sees, its K/V row, the grids
  const LoraChunk* lora = nullptr;  // the adapters the chunk's tokens use (none: nullptr)
};

// A contiguous range of layers, and whether the model's head (final norm + output matrix)
// comes with it.
struct LayerRange {
  int first = 0;
  int last = 0;  // exclusive
  bool head = false;
};

// One backend's share of one context.
class Stage {
 public:
  virtual ~Stage() = default;
  const LayerRange& range() const { return range_; }

  // Runs the stage's layers over the chunk: hidden is [n][n_embd] host rows, read and
  // overwritten in place; each layer stores the chunk's K/V rows before attending over them.
  virtual void run_layers(const Chunk& chunk, float* hidden) = 0;
  // The LoRA adapters (pyllm/lora.h) the context may name in chunk.lora from now on: a stage
  // whose weights live elsewhere copies the adapters' pairs for its layers there (dropping
  // earlier ones). Throws DeviceError when it cannot (out of device memory).
  virtual void set_lora_adapters(const std::vector<std::shared_ptr<const LoraAdapter>>&) {}
  // Importance-matrix statistics (pyllm/activation_stats.h): from now on add every matmul
  // input of the stage's layers (and of the head) to *stats; nullptr stops. A backend that
  // cannot collect them throws DeviceError for a non-null stats.
  virtual void set_activation_stats(ActivationStats* stats) {
    if (stats != nullptr) {
      throw DeviceError("importance-matrix statistics are collected on the CPU only: place "
                        "every layer on the CPU");
    }
  }
  // Head stages only: final norm + output projection of hidden rows[0..count) (rows of a
  // [n][n_embd] host array) into logits (count rows of n_vocab). `lora`: the chunk's adapters
  // (their output-norm deltas), nullptr when none.
  virtual void output(const float* hidden, const int* rows, int count, float* logits,
                      const LoraChunk* lora) = 0;

  // The saved state's per-layer part, for each of the stage's layers in order: the K rows, then
  // the V rows, of positions [0, n_past) of sequence seq, in the cache's element type.
  virtual int64_t state_bytes(int n_past) const = 0;
  virtual void save_state(int seq, int n_past, uint8_t* out) const = 0;
  virtual void load_state(int seq, int n_past, const uint8_t* in) = 0;

  // Context shift: in sequence seq's cache, drop positions [keep, keep + n_discard) and move
  // positions [keep + n_discard, n_past) down by n_discard, their keys rotated by `rot` (the
  // (cos, sin) pairs, n_rot / 2 of them, of a rotation by -n_discard positions). Only called
  // when can_shift_kv() (the context asks every stage first).
  virtual bool can_shift_kv() const { return false; }
  virtual void shift_kv(int /*seq*/, int /*keep*/, int /*n_discard*/, int /*n_past*/,
                        const float* /*rot*/) {}

 protected:
  explicit Stage(const LayerRange& range) : range_(range) {}

 private:
  LayerRange range_;
};

// A backend's share of a model's weights, prepared once at load for the layers placed on it
// (the CPU repacks matrices into its rows16 layout; a GPU uploads them) and shared by every
// context of the model.
class WeightStore {
 public:
  virtual ~WeightStore() = default;
  // Bytes the backend holds for these weights beyond the file mapping (copies, device memory).
  virtual int64_t bytes() const = 0;
  // The CPU's copies as one image (pyllm/model.h); other backends hold none.
  virtual const RepackImage* repack_image() const { return nullptr; }
};

// One backend instance serving one context: for the CPU, a thread pool and the scratch
// activations its stages share (stages of one context run one after another, never at once).
class Device {
 public:
  virtual ~Device() = default;
  virtual const char* name() const = 0;
  // The stage of `range`, over the weights its backend prepared at load, with the range's K/V
  // storage allocated.
  virtual std::unique_ptr<Stage> make_stage(const LayerRange& range) = 0;
  virtual int n_threads() const = 0;
};

// A kind of hardware. prepare() runs at load (from Model's constructor, before any context);
// open() once per context.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // Prepares the weights of `ranges` (and of the head, where a range has it). May rewrite the
  // views in `weights` to point at what it returns (the CPU's rows16 copies): the store owns
  // that memory and lives as long as the model.
  virtual std::unique_ptr<WeightStore> prepare(const HParams& hp, ModelWeights& weights,
                                               const std::vector<LayerRange>& ranges,
                                               const ModelOptions& options) const = 0;
  virtual std::unique_ptr<Device> open(const Model& model, const ContextParams& params) const = 0;
};

// A device a backend can run on, for listings (pyllm.devices(), `pyllm info --devices`).
struct DeviceInfo {
  std::string backend;  // the name a placement uses, e.g. "opencl:0"
  std::string name;     // the device's own name
  std::string details;  // platform, version, work-group limits ...
  uint64_t memory = 0;  // bytes of device memory (0: the host's)
};

// The backends this build has ("cpu" always; GPU backends behind their CMake options).
std::vector<std::string> backend_names();
// Every device of every backend of this build.
std::vector<DeviceInfo> device_infos();
// The backend called `name` ("cpu", "opencl" = "opencl:0", "opencl:1", ...). Throws
// std::invalid_argument for a kind this build does not have (naming the CMake option that adds
// it) and DeviceError for a device that does not exist.
const Backend& find_backend(const std::string& name);

}  // namespace pyllm

// The device seam: what a context asks of the hardware that runs a range of its layers.
//
// A context (csrc/model/context.cc) plans each chunk of tokens on the host — positions, RoPE
// angles, which keys each token sees and where its K/V rows go — embeds the tokens into host
// rows of hidden state, and hands those rows through its stages in layer order. A stage is one
// backend's share of one context: the weights of a range of layers prepared for its device
// (uploaded, repacked), the K/V storage of those layers, and, on the stage that owns the model's
// head, the final norm and output projection. Which backend runs which layers is the context's
// placement (csrc/model/placement.h), decided once when the context is made.
//
// A new backend (OpenCL, CUDA, a range of layers on another MPI rank) implements Device and
// Stage in its own folder beside csrc/cpu/ and registers a factory in csrc/backend/registry.cc;
// the forward's logic, the context and the Python layer do not change.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/attention_schedule.h"
#include "pyllm/model.h"

namespace pyllm {

// One chunk of n tokens as every stage sees it; all of it lives in host memory and stays valid
// for the duration of one run_layers() call.
struct Chunk {
  int n = 0;
  const int* pos = nullptr;   // position of token t in its sequence
  const int* seq = nullptr;   // sequence (KV region) of token t
  const float* rope = nullptr;  // [n][n_rot]: (cos, sin) pairs of token t's angles
  const AttentionSchedule* schedule = nullptr;  // keys token t sees, its K/V row, the grids
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
  // Head stages only: final norm + output projection of hidden rows[0..count) (rows of a
  // [n][n_embd] host array) into logits (count rows of n_vocab).
  virtual void output(const float* hidden, const int* rows, int count, float* logits) = 0;

  // The saved state's per-layer part, for each of the stage's layers in order: the K rows, then
  // the V rows, of positions [0, n_past) of sequence 0, in the cache's element type.
  virtual int64_t state_bytes(int n_past) const = 0;
  virtual void save_state(int n_past, uint8_t* out) const = 0;
  virtual void load_state(int n_past, const uint8_t* in) = 0;

 protected:
  explicit Stage(const LayerRange& range) : range_(range) {}

 private:
  LayerRange range_;
};

// One backend instance serving one context: for the CPU, a thread pool and the scratch
// activations its stages share (stages of one context run one after another, never at once).
class Device {
 public:
  virtual ~Device() = default;
  virtual const char* name() const = 0;
  // The stage of `range`: its weights prepared on the device, its K/V storage allocated.
  virtual std::unique_ptr<Stage> make_stage(const LayerRange& range) = 0;
  virtual int n_threads() const = 0;
};

// The backends this build has ("cpu" always; GPU backends behind their CMake options).
std::vector<std::string> backend_names();
// A device of backend `name` for a context of `model` with `params`; throws
// std::invalid_argument for a name this build does not have.
std::unique_ptr<Device> make_device(const std::string& name, const Model& model,
                                    const ContextParams& params);

}  // namespace pyllm

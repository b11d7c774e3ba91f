// ScratchBuf: a zeroed float buffer that costs memory only where it is written.
//
// Scratch activations are sized for a whole n_batch chunk (and attention scratch for n_ctx),
// but a decode step or a short prompt writes a few rows of them. std::vector<float>(n) writes
// every element, making all of it resident at once (12 MB for a 135M model's context); calloc
// gets a large block from the kernel as zero pages that become memory only when first written.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

namespace pyllm {

class ScratchBuf {
 public:
  // n zeroed floats; the previous contents are dropped
  void resize(size_t n) {
    float* p = nullptr;
    if (n) {
      p = static_cast<float*>(std::calloc(n, sizeof(float)));
      if (!p) throw std::bad_alloc();
    }
    p_.reset(p);
    n_ = n;
  }
  float* data() { return p_.get(); }
  const float* data() const { return p_.get(); }
  size_t size() const { return n_; }

 private:
  struct FreeDeleter {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, FreeDeleter> p_;
  size_t n_ = 0;
};

}  // namespace pyllm

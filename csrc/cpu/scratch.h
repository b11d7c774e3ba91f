// ZeroedBuf: a zeroed buffer that costs memory only where it is written.
//
// Buffers sized for the worst case -- scratch activations for a whole n_batch chunk, the KV
// cache for all n_ctx positions -- are mostly never written by a decode step or a short prompt.
// std::vector<T>(n) writes every element, making all of it resident at once (12 MB of scratch
// for a 135M model's context); calloc gets a large block from the kernel as zero pages that
// become memory only when first written.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

namespace pyllm {

template <typename T>
class ZeroedBuf {
 public:
  // n zeroed elements; the previous contents are dropped
  void resize(size_t n) {
    T* p = nullptr;
    if (n) {
      p = static_cast<T*>(std::calloc(n, sizeof(T)));
      if (!p) throw std::bad_alloc();
    }
    p_.reset(p);
    n_ = n;
  }
  T* data() { return p_.get(); }
  const T* data() const { return p_.get(); }
  size_t size() const { return n_; }

 private:
  struct FreeDeleter {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, FreeDeleter> p_;
  size_t n_ = 0;
};

using ScratchBuf = ZeroedBuf<float>;

}  // namespace pyllm

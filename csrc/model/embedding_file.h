// EmbeddingFile: the embedding table's rows read from its file (pread) rather than through the
// read-only mapping the rest of the weights are viewed in. Reading a mapped row maps more than
// the row: the kernel maps the page-cache pages around a fault (64 KB of fault-around, or the
// whole folio, up to 2 MiB, on kernels that map large folios whole: seen on 6.18), so over a
// long generation the lookups would map most of the table into the process (14 MB of
// SmolLM2's 17.7 MB after 30 spread tokens). A read costs one system call and maps nothing.
#pragma once

#include <cstdint>

namespace pyllm {

class EmbeddingFile {
 public:
  // Keeps a duplicate of fd (the caller's stays the caller's); the table's first byte is at
  // `offset` in the file, rows of `row_bytes`.
  EmbeddingFile(int fd, int64_t offset, int64_t row_bytes);
  ~EmbeddingFile();
  EmbeddingFile(const EmbeddingFile&) = delete;
  EmbeddingFile& operator=(const EmbeddingFile&) = delete;
  // Whether a descriptor is held (the duplicate succeeded, and the platform has pread).
  bool open() const { return fd_ >= 0; }
  // Reads row `row` (row_bytes) into dst; false when the read fails or comes short, and the
  // caller then reads the mapped row (the same bytes).
  bool read(int64_t row, void* dst) const;

 private:
  int fd_ = -1;
  int64_t offset_ = 0;
  int64_t row_bytes_ = 0;
};

}  // namespace pyllm

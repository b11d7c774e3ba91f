// EmbeddingFile (see embedding_file.h): a duplicated descriptor and pread.
#include "model/embedding_file.h"

#include <cerrno>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <unistd.h>
#define PYLLM_HAVE_PREAD 1
#endif

namespace pyllm {

EmbeddingFile::EmbeddingFile(int fd, int64_t offset, int64_t row_bytes)
    : offset_(offset), row_bytes_(row_bytes) {
#ifdef PYLLM_HAVE_PREAD
  // close-on-exec: a model's descriptor must not leak into processes it starts (MPI workers)
  if (fd >= 0 && offset >= 0 && row_bytes > 0) fd_ = fcntl(fd, F_DUPFD_CLOEXEC, 0);
#else
  (void)fd;
#endif
}

EmbeddingFile::~EmbeddingFile() {
#ifdef PYLLM_HAVE_PREAD
  if (fd_ >= 0) close(fd_);
#endif
}

bool EmbeddingFile::read(int64_t row, void* dst) const {
#ifdef PYLLM_HAVE_PREAD
  if (fd_ < 0 || row < 0) return false;
  char* out = static_cast<char*>(dst);
  int64_t done = 0;
  while (done < row_bytes_) {
    const ssize_t got = pread(fd_, out + done, static_cast<size_t>(row_bytes_ - done),
                              static_cast<off_t>(offset_ + row * row_bytes_ + done));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;  // an error, or the file is shorter than it was
    done += got;
  }
  return true;
#else
  (void)row;
  (void)dst;
  return false;
#endif
}

}  // namespace pyllm

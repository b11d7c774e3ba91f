// C++ test of EmbeddingFile (model/embedding_file.h), plain and under the sanitizers
// (csrc/tests/run.sh): rows read from a file equal the bytes written, whatever row and offset;
// the descriptor is the model's own (the caller's may close); a row past the end of the file, a
// negative row and a bad descriptor give false, never a partial row. Exit status 0 = pass.
#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "model/embedding_file.h"
#include "tests/check.h"

using namespace pyllm;

int main() {
  constexpr int64_t kOffset = 1234, kRow = 360, kRows = 37;  // an odd offset, Q4_1 rows of 576
  std::vector<uint8_t> bytes(static_cast<size_t>(kOffset + kRow * kRows));
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>((i * 131 + 7) >> 3);

  char name[] = "/tmp/pyllm-embedding-XXXXXX";
  const int fd = mkstemp(name);
  CHECK(fd >= 0, "mkstemp");
  if (fd < 0) return pyllm::testing::test_exit_status();
  unlink(name);  // the descriptor keeps it
  CHECK(write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()), "write");

  EmbeddingFile file(fd, kOffset, kRow);
  close(fd);  // the caller's descriptor: the file keeps its own
  CHECK(file.open(), "a descriptor is held");
  std::vector<uint8_t> row(kRow, 0xEE);
  for (int64_t r : {int64_t(0), int64_t(1), int64_t(17), kRows - 1}) {
    CHECK(file.read(r, row.data()), "row %lld reads", static_cast<long long>(r));
    bool same = true;
    for (int64_t i = 0; i < kRow; ++i) same = same && row[i] == bytes[kOffset + r * kRow + i];
    CHECK(same, "row %lld has the file's bytes", static_cast<long long>(r));
  }
  // past the end (the file shrank, or a bad id) and negative rows: false
  CHECK(!file.read(kRows, row.data()), "the row after the last");
  CHECK(!file.read(kRows + 1000, row.data()), "far past the end");
  CHECK(!file.read(-1, row.data()), "a negative row");

  EmbeddingFile closed(-1, 0, kRow);
  CHECK(!closed.open() && !closed.read(0, row.data()), "no descriptor: nothing read");
  EmbeddingFile bad(fd, 0, kRow);  // fd is closed by now: the duplicate fails
  CHECK(!bad.open() && !bad.read(0, row.data()), "a closed descriptor: nothing read");
  return pyllm::testing::test_exit_status();
}

// Bindings that build a tokenizer's tables faster than Python can: the merge pair table of a
// byte-level BPE vocabulary (pyllm/tokenizer/bpe.py uses this when the extension is there, and
// its own code, which also words every error, when it is not or when this declines).
//
// A vocabulary has ~50k-150k tokens and as many merges; splitting each merge, looking its three
// strings up and building the pair dict is ~50 ms of Python per load, a third of a cold run's
// time to its first token on a small model, and ~5 ms here.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <deque>
#include <string>
#include <string_view>
#include <vector>

#include "bindings/register.h"

namespace py = pybind11;

namespace pyllm::bindings {
namespace {

// A str's UTF-8 bytes (the str keeps them), or false when it is no str or holds lone
// surrogates (surrogateescape'd bytes of a file): the Python path handles those.
bool utf8_of(PyObject* obj, std::string_view& out) {
  if (!PyUnicode_Check(obj)) return false;
  Py_ssize_t n = 0;
  const char* p = PyUnicode_AsUTF8AndSize(obj, &n);
  if (p == nullptr) {
    PyErr_Clear();
    return false;
  }
  out = std::string_view(p, static_cast<size_t>(n));
  return true;
}

// Symbol ids of a BPE vocabulary: a token's text has its token id; other texts (alphabet
// characters or merge results the vocabulary lacks) get ids from n_vocab up, in the order they
// are first asked for -- the order bpe.py's own path interns them in. An open-addressing table
// (FNV-1a, linear probing, at most half full): no allocation per entry, as std::unordered_map
// would make, and sized for the tokens (texts that are no token are few), since fresh memory
// is a cold start's cost.
class SymbolIds {
 public:
  explicit SymbolIds(size_t n_vocab) : n_vocab_(n_vocab) { rehash(2 * n_vocab + 1024); }

  void add_token(std::string_view text, int64_t id) {
    Slot& s = find(text);
    if (s.id < 0) place(s, text, id);
  }

  int64_t intern(std::string_view text) {
    Slot& s = find(text);
    if (s.id >= 0) return s.id;
    store_.emplace_back(text);
    const auto id = static_cast<int64_t>(n_vocab_ + extra_.size());
    extra_.push_back(store_.back());
    place(s, store_.back(), id);
    return id;
  }

  const std::vector<std::string_view>& extra() const { return extra_; }

 private:
  struct Slot {
    std::string_view text;
    int64_t id = -1;
  };

  static uint64_t hash(std::string_view text) {
    uint64_t h = 1469598103934665603ull;
    for (const char c : text) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ull;
    return h;
  }

  // The slot holding text, or the empty one where it would go.
  Slot& find(std::string_view text) {
    for (size_t i = hash(text) & mask_;; i = (i + 1) & mask_) {
      Slot& s = slots_[i];
      if (s.id < 0 || s.text == text) return s;
    }
  }

  void place(Slot& s, std::string_view text, int64_t id) {
    s = Slot{text, id};
    if (2 * ++used_ > slots_.size()) rehash(2 * slots_.size());
  }

  void rehash(size_t at_least) {
    size_t cap = 16;
    while (cap < at_least) cap *= 2;
    std::vector<Slot> old(cap);
    old.swap(slots_);
    mask_ = cap - 1;
    for (const Slot& s : old) {
      if (s.id >= 0) find(s.text) = s;
    }
  }

  size_t n_vocab_;
  size_t mask_ = 0;
  size_t used_ = 0;
  std::vector<Slot> slots_;
  std::deque<std::string> store_;  // texts of extra ids (a deque never moves them)
  std::vector<std::string_view> extra_;
};

// Fills `out` (a dict; bpe.py's PairTable) with left * stride + right -> rank * stride + merged
// for every merge, the first (lowest) rank of a pair listed twice winning. Returns (byte ids,
// extra texts in id order, stride), or None when the Python path must do it: an element that is
// not a str, a str with lone surrogates, a merge that is not "left right".
py::object bpe_pair_table(const py::list& tokens, const py::list& merges,
                          const py::list& byte_chars, const py::dict& out) {
  const size_t n_vocab = tokens.size();
  SymbolIds ids(n_vocab);
  std::string_view text;
  for (size_t i = 0; i < n_vocab; ++i) {
    if (!utf8_of(tokens[i].ptr(), text)) return py::none();
    ids.add_token(text, static_cast<int64_t>(i));
  }
  std::vector<int64_t> byte_ids;
  byte_ids.reserve(byte_chars.size());
  for (const auto& c : byte_chars) {
    if (!utf8_of(c.ptr(), text)) return py::none();
    byte_ids.push_back(ids.intern(text));
  }
  // A merge splits at its first space after position 0 (a left part may itself be a space
  // where spaces are not byte-encoded); the right part must not be empty.
  const size_t n_merges = merges.size();
  std::vector<std::string_view> lefts(n_merges), rights(n_merges);
  for (size_t i = 0; i < n_merges; ++i) {
    if (!utf8_of(merges[i].ptr(), text)) return py::none();
    const size_t pos = text.find(' ', 1);
    if (pos == std::string_view::npos || pos + 1 == text.size()) return py::none();
    lefts[i] = text.substr(0, pos);
    rights[i] = text.substr(pos + 1);
  }
  // Interned in bpe.py's order: every left part, then every right part, then every result.
  std::vector<int64_t> left_ids(n_merges), right_ids(n_merges), merged_ids(n_merges);
  for (size_t i = 0; i < n_merges; ++i) left_ids[i] = ids.intern(lefts[i]);
  for (size_t i = 0; i < n_merges; ++i) right_ids[i] = ids.intern(rights[i]);
  std::string merged;
  for (size_t i = 0; i < n_merges; ++i) {
    merged.assign(lefts[i]).append(rights[i]);
    merged_ids[i] = ids.intern(merged);
  }
  // Every id stays below the stride, merge results included.
  const int64_t stride = static_cast<int64_t>(n_vocab + ids.extra().size() + 1);
  for (size_t i = 0; i < n_merges; ++i) {
    py::object key = py::reinterpret_steal<py::object>(
        PyLong_FromLongLong(left_ids[i] * stride + right_ids[i]));
    py::object value = py::reinterpret_steal<py::object>(
        PyLong_FromLongLong(static_cast<int64_t>(i) * stride + merged_ids[i]));
    if (!key || !value || PyDict_SetDefault(out.ptr(), key.ptr(), value.ptr()) == nullptr) {
      throw py::error_already_set();
    }
  }
  py::list extra(ids.extra().size());
  for (size_t i = 0; i < ids.extra().size(); ++i) {
    const std::string_view e = ids.extra()[i];
    PyObject* s = PyUnicode_DecodeUTF8(e.data(), static_cast<Py_ssize_t>(e.size()), "strict");
    if (s == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(extra.ptr(), static_cast<Py_ssize_t>(i), s);  // steals the reference
  }
  py::list bytes(byte_ids.size());
  for (size_t i = 0; i < byte_ids.size(); ++i) bytes[i] = py::int_(byte_ids[i]);
  return py::make_tuple(bytes, extra, stride);
}

}  // namespace

void register_tokenizer(py::module_& m) {
  m.def("bpe_pair_table", &bpe_pair_table, py::arg("tokens"), py::arg("merges"),
        py::arg("byte_chars"), py::arg("out"),
        "Fill out with a byte-level BPE vocabulary's merge pairs (left * stride + right -> "
        "rank * stride + merged; the lowest rank of a pair listed twice): (byte ids, texts of "
        "the ids past the vocabulary, stride), or None when the Python path must build it.");
}

}  // namespace pyllm::bindings

// Bindings that build and run a byte-level BPE vocabulary's merge table faster and smaller
// than Python can (pyllm/tokenizer/bpe.py uses them when the extension is there, and its own
// code, which also words every error, when it is not or when the builder declines).
//
// A vocabulary has ~50k-150k tokens and as many merges; splitting each merge, looking its three
// strings up and building a pair dict is ~50 ms of Python per load, a third of a cold run's
// time to its first token on a small model, and ~5 ms here. The table itself is 16 bytes a
// pair here against ~110 in a dict of int objects: 3-4 MB less resident on a small model.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <deque>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "bindings/gguf_strings.h"
#include "bindings/register.h"

namespace py = pybind11;

namespace pyllm::bindings {
namespace {

// UTF-8 bytes of Python strs that leave nothing behind in them: an ASCII str's own bytes,
// others encoded into this arena (PyUnicode_AsUTF8AndSize would keep a UTF-8 copy inside
// every non-ASCII str for as long as it lives: ~0.7 MB over a vocabulary held by the model).
class Utf8Arena {
 public:
  // false when obj is no str or holds lone surrogates (surrogateescape'd bytes of a file): the
  // Python path handles those.
  bool view(PyObject* obj, std::string_view& out) {
    if (!PyUnicode_Check(obj)) return false;
    if (PyUnicode_IS_COMPACT_ASCII(obj)) {
      out = std::string_view(static_cast<const char*>(PyUnicode_DATA(obj)),
                             static_cast<size_t>(PyUnicode_GET_LENGTH(obj)));
      return true;
    }
    PyObject* encoded = PyUnicode_AsUTF8String(obj);
    if (encoded == nullptr) {
      PyErr_Clear();
      return false;
    }
    store_.emplace_back(PyBytes_AS_STRING(encoded), static_cast<size_t>(PyBytes_GET_SIZE(encoded)));
    Py_DECREF(encoded);
    out = store_.back();
    return true;
  }

 private:
  std::deque<std::string> store_;  // a deque never moves its strings
};

// Texts (tokens, merges) from a list of str or read straight from a GGUF string array (buffer,
// position, count: the reader's StringArray.location) without making a str of any; `keep`
// holds the buffer while they are read. False when the Python path must take them: an element
// that is no str, lone surrogates, bytes that are not UTF-8 (Python would decode those with
// surrogateescape, and the merged text of two escaped halves need not be their bytes joined).
bool read_texts(const py::object& texts, Utf8Arena& arena, std::vector<std::string_view>& out,
                std::unique_ptr<py::buffer_info>& keep) {
  if (py::isinstance<py::list>(texts)) {
    const py::list list = texts.cast<py::list>();
    out.resize(list.size());
    for (size_t i = 0; i < out.size(); ++i) {
      if (!arena.view(list[i].ptr(), out[i])) return false;
    }
    return true;
  }
  const py::tuple loc = texts.cast<py::tuple>();
  if (loc.size() != 3) throw std::invalid_argument("texts: a list of str or (buffer, pos, count)");
  keep = std::make_unique<py::buffer_info>(loc[0].cast<py::buffer>().request());
  const auto count = loc[2].cast<int64_t>();
  out.resize(static_cast<size_t>(count < 0 ? 0 : count));
  bool utf8 = true;
  const int64_t end = walk_gguf_strings(*keep, loc[1].cast<int64_t>(), count,
                                        [&](int64_t i, uint64_t, std::string_view text) {
    out[static_cast<size_t>(i)] = text;
    if (utf8 && std::any_of(text.begin(), text.end(), [](char c) { return c & 0x80; })) {
      // Python's own strict decoder says what is UTF-8
      PyObject* s = PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()),
                                         "strict");
      if (s == nullptr) PyErr_Clear();
      utf8 = s != nullptr;
      Py_XDECREF(s);
    }
  });
  return end >= 0 && utf8;
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

// bpe.py's pair table: left * stride + right -> rank * stride + merged (ids below the stride,
// so the smallest value is the lowest rank), with the merge of a short pre-token over it.
// Open addressing (multiplicative hash, linear probing, at most half full).
class BpePairs {
 public:
  BpePairs(size_t n_pairs, const std::vector<int64_t>& byte_ids, int64_t stride)
      : stride_(stride) {
    size_t cap = 16;
    while (cap < 2 * n_pairs + 2) cap *= 2;
    slots_.assign(cap, Slot{});
    mask_ = cap - 1;
    shift_ = 64;
    for (size_t c = cap; c > 1; c /= 2) --shift_;
    std::copy(byte_ids.begin(), byte_ids.end(), byte_ids_.begin());
  }

  // The first value given for a key stays (a pair listed twice keeps its lowest rank).
  void add(int64_t key, int64_t value) {
    Slot& s = slots_[index_of(static_cast<uint64_t>(key))];
    if (s.key == kEmpty) {
      s = Slot{static_cast<uint64_t>(key), value};
      ++used_;
    }
  }

  int64_t find(int64_t key) const {  // -1: the pair does not merge
    if (key < 0) return -1;
    const Slot& s = slots_[index_of(static_cast<uint64_t>(key))];
    return s.key == kEmpty ? -1 : s.value;
  }

  size_t size() const { return used_; }

  py::list items() const {
    py::list out;
    for (const Slot& s : slots_) {
      if (s.key != kEmpty) out.append(py::make_tuple(static_cast<int64_t>(s.key), s.value));
    }
    return out;
  }

  // bpe.py's _merge_short on the pre-token's UTF-8 bytes: the symbols' ids after merging (the
  // lowest rank first, the leftmost on ties), the same list-scan work added to counter[0].
  py::tuple merge_short(const py::bytes& raw, const py::list& counter) const {
    const std::string_view text(raw);
    std::vector<int64_t> sym(text.size());
    for (size_t i = 0; i < text.size(); ++i) sym[i] = byte_ids_[static_cast<uint8_t>(text[i])];
    if (sym.size() > 1) {
      constexpr int64_t kInf = int64_t{1} << 62;
      auto rank = [&](int64_t a, int64_t b) {
        const int64_t v = find(a * stride_ + b);
        return v < 0 ? kInf : v;
      };
      std::vector<int64_t> ranks(sym.size() - 1);
      for (size_t i = 0; i + 1 < sym.size(); ++i) ranks[i] = rank(sym[i], sym[i + 1]);
      const int64_t first = static_cast<int64_t>(ranks.size());
      while (!ranks.empty()) {
        const auto best = std::min_element(ranks.begin(), ranks.end());  // the leftmost
        if (*best == kInf) break;
        const size_t i = static_cast<size_t>(best - ranks.begin());
        const int64_t merged = *best % stride_;
        sym[i] = merged;
        sym.erase(sym.begin() + static_cast<std::ptrdiff_t>(i) + 1);
        ranks.erase(best);
        if (i < ranks.size()) ranks[i] = rank(merged, sym[i + 1]);
        if (i > 0) ranks[i - 1] = rank(sym[i - 1], merged);
      }
      const int64_t merges = first - static_cast<int64_t>(ranks.size());
      counter[0] = py::int_(counter[0].cast<int64_t>() + merges * (2 * first - merges + 1) / 2);
    }
    py::tuple out(sym.size());
    for (size_t i = 0; i < sym.size(); ++i) {
      PyObject* v = PyLong_FromLongLong(sym[i]);
      if (v == nullptr) throw py::error_already_set();
      PyTuple_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), v);  // steals the reference
    }
    return out;
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  struct Slot {
    uint64_t key = kEmpty;
    int64_t value = -1;
  };

  // The slot holding key, or the empty one where it would go.
  size_t index_of(uint64_t k) const {
    for (size_t i = (k * 0x9E3779B97F4A7C15ull) >> shift_;; i = (i + 1) & mask_) {
      if (slots_[i].key == kEmpty || slots_[i].key == k) return i;
    }
  }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
  int shift_ = 64;
  size_t used_ = 0;
  std::array<int64_t, 256> byte_ids_{};
  int64_t stride_;
};

// The pair table of a vocabulary: (BpePairs, byte ids, extra texts in id order, stride), or
// None when the Python path must build it: a token or merge it cannot take (read_texts), a
// merge that is not "left right".
py::object bpe_pair_table(const py::object& tokens, const py::object& merges,
                          const py::list& byte_chars) {
  Utf8Arena arena;
  std::vector<std::string_view> token_texts, texts;
  std::unique_ptr<py::buffer_info> keep_tokens, keep_merges;  // the file stays exported
  if (!read_texts(tokens, arena, token_texts, keep_tokens)) return py::none();
  if (!read_texts(merges, arena, texts, keep_merges)) return py::none();
  const size_t n_vocab = token_texts.size();
  SymbolIds ids(n_vocab);
  for (size_t i = 0; i < n_vocab; ++i) ids.add_token(token_texts[i], static_cast<int64_t>(i));
  std::string_view text;
  std::vector<int64_t> byte_ids;
  byte_ids.reserve(byte_chars.size());
  for (const auto& c : byte_chars) {
    if (!arena.view(c.ptr(), text)) return py::none();
    byte_ids.push_back(ids.intern(text));
  }
  if (byte_ids.size() != 256) throw std::invalid_argument("byte_chars must have 256 entries");
  // A merge splits at its first space after position 0 (a left part may itself be a space
  // where spaces are not byte-encoded); the right part must not be empty.
  const size_t n_merges = texts.size();
  std::vector<std::string_view> lefts(n_merges), rights(n_merges);
  for (size_t i = 0; i < n_merges; ++i) {
    text = texts[i];
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
  BpePairs pairs(n_merges, byte_ids, stride);
  for (size_t i = 0; i < n_merges; ++i) {
    pairs.add(left_ids[i] * stride + right_ids[i], static_cast<int64_t>(i) * stride + merged_ids[i]);
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
  return py::make_tuple(py::cast(std::move(pairs)), bytes, extra, stride);
}

}  // namespace

void register_tokenizer(py::module_& m) {
  py::class_<BpePairs>(m, "BpePairs",
                       "A byte-level BPE merge table (left * stride + right -> rank * stride + "
                       "merged), made by bpe_pair_table.")
      .def("__getitem__", &BpePairs::find, py::arg("key"), "The value, or -1 for no merge.")
      .def(
          "get",
          [](const BpePairs& p, int64_t key, py::object dflt) -> py::object {
            const int64_t v = p.find(key);
            return v < 0 ? dflt : py::int_(v);
          },
          py::arg("key"), py::arg("default") = py::none(), "The value, or default.")
      .def("__len__", &BpePairs::size)
      .def("items", &BpePairs::items, "(key, value) pairs in no particular order.")
      .def("merge_short", &BpePairs::merge_short, py::arg("raw"), py::arg("counter"),
           "A pre-token's symbol ids after merging its UTF-8 bytes (bpe.py's _merge_short: "
           "the lowest rank first, the leftmost on ties); adds the scan's work to counter[0].");
  m.def("bpe_pair_table", &bpe_pair_table, py::arg("tokens"), py::arg("merges"),
        py::arg("byte_chars"),
        "A byte-level BPE vocabulary's merge table from its tokens and its merges (each a list "
        "of str, or (buffer, pos, count) of a GGUF string array): (BpePairs, byte ids, texts "
        "of the ids past the vocabulary, stride), or None when the Python path must build it.");
}

}  // namespace pyllm::bindings

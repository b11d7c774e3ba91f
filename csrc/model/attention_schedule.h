// Attention scheduling for one chunk of tokens: which keys each token sees, where its K/V row
// goes, and how the attention grids are split across threads.
//
// A run of consecutive tokens of one sequence and the query heads of one KV group form one grid
// of rows (see AttentionArgs), which the kernel takes in blocks that load each K/V row once: the
// heads of a GQA group for a decode token, heads and tokens for a prompt. Threads get contiguous
// row ranges of equal cost (a row costs its number of visible keys, so causal prompts split
// evenly too).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace pyllm {

struct AttentionSchedule {
  std::vector<int> visible;      // keys token t sees: pos[t] + 1
  std::vector<int64_t> kv_row;   // cache row of token t: sequence region + position
  std::vector<int> runs;         // first token of each run of consecutive tokens of one sequence
  std::vector<int64_t> run_cost; // cost of one grid of each run (group rows per token)
  int64_t cost_total = 0;        // all grids: every run times n_head_kv
  int n_tokens = 0;
  int group = 1;                 // query heads per KV head
  int n_head_kv = 1;

  // Plans tokens [0, n) at positions pos[t] of sequences seq[t] (n_ctx rows per sequence).
  // Keeps its vectors' capacity: a decode step allocates nothing once warmed up.
  void plan(const int* pos, const int* seq, int n, int n_ctx, int n_head, int n_head_kv);

  // Thread ith of nth: calls fn(t, g, lo, hi) for each part of a grid in its cost range, where
  // t is the run's first token, g the KV head, and [lo, hi) the grid's rows (row l: token
  // t + l / group).
  template <typename Fn>
  void for_each_part(int ith, int nth, Fn&& fn) const {
    const int64_t c0 = cost_total * ith / nth, c1 = cost_total * (ith + 1) / nth;
    const int n = n_tokens;
    int64_t cum = 0;  // cost of the rows before the current grid
    for (size_t ri = 0; ri < runs.size() && cum < c1; ++ri) {
      const int t = runs[ri];
      const int len = (ri + 1 < runs.size() ? runs[ri + 1] : n) - t;
      for (int g = 0; g < n_head_kv && cum < c1; ++g) {
        if (cum + run_cost[ri] <= c0) {  // the whole grid precedes this thread's range
          cum += run_cost[ri];
          continue;
        }
        // rows whose cost starts in [c0, c1); only a grid across a range boundary is walked
        // row by row
        int lo = -1, hi = 0;
        if (cum >= c0 && cum + run_cost[ri] <= c1) {
          lo = 0;
          hi = len * group;
          cum += run_cost[ri];
        } else {
          for (int l = 0; l < len * group && cum < c1; ++l) {
            if (cum >= c0) {
              if (lo < 0) lo = l;
              hi = l + 1;
            }
            cum += visible[t + l / group];
          }
        }
        if (lo < 0) continue;
        fn(t, g, lo, hi);
      }
    }
  }
};

}  // namespace pyllm

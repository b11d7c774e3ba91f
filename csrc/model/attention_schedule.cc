// AttentionSchedule::plan (see attention_schedule.h).
#include "model/attention_schedule.h"

namespace pyllm {

void AttentionSchedule::plan(const int* pos, const int* seq, int n, int n_ctx, int n_head,
                             int n_head_kv_) {
  n_tokens = n;
  group = n_head / n_head_kv_;
  n_head_kv = n_head_kv_;
  visible.resize(n);
  kv_row.resize(n);
  for (int t = 0; t < n; ++t) {
    visible[t] = pos[t] + 1;
    kv_row[t] = int64_t(seq[t]) * n_ctx + pos[t];
  }
  runs.clear();
  for (int t = 0; t < n; ++t) {
    if (t == 0 || seq[t] != seq[t - 1]) runs.push_back(t);
  }
  run_cost.assign(runs.size(), 0);
  cost_total = 0;
  for (size_t ri = 0; ri < runs.size(); ++ri) {
    const int end = ri + 1 < runs.size() ? runs[ri + 1] : n;
    for (int t = runs[ri]; t < end; ++t) run_cost[ri] += int64_t(group) * visible[t];
    cost_total += run_cost[ri] * n_head_kv;
  }
}

}  // namespace pyllm

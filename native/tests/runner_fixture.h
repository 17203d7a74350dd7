#pragma once
// What the runner tests share: a generated DiT model in a temp dir, and plans built from
// [first, last, resident] groups with exactly the scratch the kernels need.
#include <algorithm>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "ferry/model.h"
#include "ferry/runner.h"
#include "test_support.h"

namespace ferry_test {

struct Fixture {
  TempDir dir;
  std::string path;
  std::shared_ptr<ferry::DitModel> model;
  explicit Fixture(const DitSpec& spec = DitSpec{}) {
    path = dir.file("model.safetensors");
    write_dit(path, spec);
    model = ferry::DitModel::open(path);
  }
};

// The largest scratch any of base segments first..last needs for batch × tokens.
inline uint64_t scratch_for(const ferry::DitModel& m, int64_t first, int64_t last, int64_t batch,
                            int64_t tokens) {
  const ferry::DitDims d = ferry::job_dims(m.dims(), batch, tokens);
  uint64_t s = 0;
  for (int64_t b = first; b <= last; b++) {
    s = std::max<uint64_t>(s, ferry::segment_scratch_bytes(m.base_segments()[b].kind, d));
  }
  return s;
}

using Groups = std::vector<std::tuple<int64_t, int64_t, bool>>;

inline std::vector<ferry::PlanSegment> plan_of(const ferry::DitModel& m, const Groups& groups,
                                               int64_t batch, int64_t tokens) {
  std::vector<ferry::PlanSegment> out;
  for (auto [first, last, resident] : groups) {
    out.push_back({first, last, resident, scratch_for(m, first, last, batch, tokens)});
  }
  return out;
}

}  // namespace ferry_test

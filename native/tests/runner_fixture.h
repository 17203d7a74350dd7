#pragma once
// What the runner tests share: a generated DiT model in a temp dir, and plans built from
// [first, last, resident] groups.
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
  std::shared_ptr<ferry::Model> model;
  explicit Fixture(const DitSpec& spec = DitSpec{}) {
    path = dir.file("model.safetensors");
    write_dit(path, spec);
    model = ferry::Model::open(path);
  }
};

using Groups = std::vector<std::tuple<int64_t, int64_t, bool>>;

inline std::vector<ferry::PlanSegment> plan_of(const Groups& groups) {
  std::vector<ferry::PlanSegment> out;
  for (auto [first, last, resident] : groups) out.push_back({first, last, resident});
  return out;
}

inline std::vector<ferry::PlanSegment> per_base(const ferry::Model& m, bool resident) {
  Groups groups;
  for (int64_t i = 0; i < static_cast<int64_t>(m.base_segments().size()); i++) {
    groups.emplace_back(i, i, resident);
  }
  return plan_of(groups);
}

inline std::vector<ferry::PlanSegment> one_segment(const ferry::Model& m, bool resident) {
  return plan_of({{0, static_cast<int64_t>(m.base_segments().size()) - 1, resident}});
}

}  // namespace ferry_test

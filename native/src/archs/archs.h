#pragma once
// The architectures Ferry knows, for the registry (registry.cpp) that picks one for a file or a
// configuration. Each family's file defines its detection, its configuration reader and its
// ModelArch.
#include <map>
#include <memory>
#include <string>

#include "ferry/arch.h"
#include "ferry/safetensors.h"

namespace ferry {

// Ferry's synthetic DiT ("ferry-dit"): safetensors __metadata__ ferry.arch = "dit", or GGUF
// general.architecture = "ferry-dit".
bool is_ferry_dit(const ModelFile& file);
std::unique_ptr<ModelArch> ferry_dit_for_file(const ModelFile& file);
std::unique_ptr<ModelArch> ferry_dit_from_config(const std::map<std::string, double>& config);

}  // namespace ferry

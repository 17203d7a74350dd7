#pragma once
// The architectures Ferry knows, for the registry (registry.cpp) that picks one for a file or a
// configuration. Each family's file defines its detection, its configuration reader and its
// ModelArch.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "ferry/arch.h"
#include "ferry/safetensors.h"

namespace ferry {

// Ferry's synthetic DiT ("ferry-dit"): safetensors __metadata__ ferry.arch = "dit", or GGUF
// general.architecture = "ferry-dit".
bool is_ferry_dit(const ModelFile& file);
std::unique_ptr<ModelArch> ferry_dit_for_file(const ModelFile& file);
std::unique_ptr<ModelArch> ferry_dit_from_config(const std::map<std::string, double>& config);

// FLUX.1 [dev]/[schnell] (flux.cpp): GGUF general.architecture = "flux", or BFL's tensor names
// (img_in.weight and double_blocks.0.img_attn.qkv.weight), bare or under model.diffusion_model.
bool is_flux(const ModelFile& file);
std::unique_ptr<ModelArch> flux_for_file(const ModelFile& file);
std::unique_ptr<ModelArch> flux_from_config(const std::map<std::string, double>& config);
// The sampler's timesteps t[0..S] (BFL's get_schedule, in float64).
std::vector<double> flux_timesteps(int64_t steps, int64_t image_tokens, bool shift);

}  // namespace ferry

// Which architecture a file or a configuration is.
#include "archs.h"
#include "ferry/errors.h"
#include "ferry/runner.h"

namespace ferry {

ggml_tensor* Activations::get(const std::string& name) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) throw InvalidArgumentError("activations: no tensor \"" + name + "\"");
  return it->second;
}

bool ModelArch::generate_input(const ActivationSpec& spec, uint64_t seed,
                               std::vector<float>& out) const {
  out.resize(static_cast<size_t>(spec.elements()));
  initial_input(seed, out.data(), out.size());
  return true;
}

std::unique_ptr<ModelArch> arch_for_file(const ModelFile& file) {
  if (is_ferry_dit(file)) return ferry_dit_for_file(file);
  if (is_flux(file)) return flux_for_file(file);
  if (file.format() == ModelFormat::kGguf) {
    const auto it = file.metadata().find("general.architecture");
    const std::string declared = it == file.metadata().end() ? "none" : "\"" + it->second + "\"";
    throw ModelFormatError(
        file.path() + ": unsupported GGUF architecture " + declared +
        " (Ferry runs \"ferry-dit\" and \"flux\"; write one with `ferry gen-model`)");
  }
  throw ModelFormatError(file.path() +
                         ": not a model Ferry can run: no __metadata__ \"ferry.arch\" and no "
                         "known tensor layout (FLUX.1 files hold img_in.weight and "
                         "double_blocks.0.img_attn.qkv.weight; write one with `ferry gen-model`)");
}

std::unique_ptr<ModelArch> arch_from_config(const std::string& arch,
                                            const std::map<std::string, double>& config) {
  if (arch == "ferry-dit" || arch == "dit") return ferry_dit_from_config(config);
  if (arch == "flux") return flux_from_config(config);
  throw InvalidArgumentError("unknown architecture \"" + arch + "\" (known: ferry-dit, flux)");
}

}  // namespace ferry

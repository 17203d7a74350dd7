/**
 * FLUX.1 [dev] and [schnell] files as the planner, `ferry inspect`, gen-model and the reference
 * see them: recognised from the header alone, the configuration read from the tensors. The
 * layout itself — which tensors, with which shapes, in which base segment — is the native
 * architecture's (native/src/archs/flux.cpp), asked for through the addon's `describeArch`, so
 * it lives in one place.
 *
 * Recognition follows flux.cpp's rules: GGUF `general.architecture = "flux"`, or BFL's tensor
 * names (`img_in.weight` and `double_blocks.0.img_attn.qkv.weight`), bare or under the
 * `model.diffusion_model.` prefix of ComfyUI/sd.cpp checkpoints, whose other tensors (a VAE, text
 * encoders) are not the transformer's and are ignored. The configuration: hidden size from
 * `img_in.weight` [hidden, 64], depths by counting blocks, [dev] by `guidance_in.*`; FLUX.1's
 * fixed numbers are in FLUX_CONSTANTS.
 */
import { loadAddon, mapNativeError } from "../native/addon";
import type { NativeArchLayout, NativeJobShape } from "../native/AddonTypes";
import type { ModelHeader, ModelTensor } from "./modelFile";
import { isGgmlComputeType } from "./quantize";
import { ModelFormatError } from "./safetensors";

/** The prefix ComfyUI and sd.cpp checkpoints put before the transformer's tensors. */
export const FLUX_PREFIX = "model.diffusion_model.";

/** The GGUF architecture name the shared quantized FLUX.1 files declare. */
export const GGUF_FLUX_ARCHITECTURE = "flux";

/** FLUX.1's fixed dimensions (BFL's FluxParams for dev and schnell). */
export const FLUX_CONSTANTS = {
  headDim: 128,
  /** 16 latent channels × a 2×2 patch, in and out. */
  channels: 64,
  /** T5-XXL embedding width. */
  context: 4096,
  /** CLIP-L pooled vector width. */
  vec: 768,
  /** Pixels per image token side: the VAE's 8× and the 2×2 patch. */
  pixelsPerToken: 16,
  mlpRatio: 4,
  axes: [16, 56, 56],
  theta: 10000,
} as const;

/** Text tokens when a FLUX job does not say: FLUX.1-dev's T5 sequence length. */
export const FLUX_DEFAULT_TXT_TOKENS = 512;

export interface FluxConfig {
  /** Hidden size (3072 in FLUX.1); a multiple of 128. */
  hidden: number;
  /** Double-stream blocks (19). */
  depth: number;
  /** Single-stream blocks (38). */
  depthSingle: number;
  /** FLUX.1 [dev]: a guidance embedding (guidance_in.*); [schnell] has none. */
  guidance: boolean;
}

/** A FLUX file's configuration and the prefix its transformer tensors carry ("" or FLUX_PREFIX). */
export interface FluxModel {
  config: FluxConfig;
  prefix: string;
}

/** The configuration as the native architecture takes it. */
export function fluxNativeConfig(config: FluxConfig): Record<string, number> {
  return {
    hidden: config.hidden,
    depth: config.depth,
    depth_single: config.depthSingle,
    guidance: config.guidance ? 1 : 0,
  };
}

/** "FLUX.1-dev, hidden 3072 (24 heads), 19 double + 38 single blocks". */
export function describeFlux(config: FluxConfig): string {
  return `FLUX.1-${config.guidance ? "dev" : "schnell"}, hidden ${config.hidden} (${config.hidden / FLUX_CONSTANTS.headDim} heads), ${config.depth} double + ${config.depthSingle} single blocks`;
}

/**
 * The native architecture's layout for `config` (weights per base segment, names without a
 * prefix) and, with a job, its activations. RangeError for a configuration it refuses.
 */
export function fluxLayout(config: FluxConfig, job?: NativeJobShape): NativeArchLayout {
  try {
    return loadAddon().describeArch("flux", fluxNativeConfig(config), job);
  } catch (error) {
    const mapped = mapNativeError(error);
    if (mapped instanceof Error && mapped.name === "InvalidArgumentError") {
      throw new RangeError(mapped.message, { cause: error });
    }
    throw mapped;
  }
}

/** Image tokens of a width × height image: (H/16)·(W/16), each a multiple of 16. */
export function fluxImageTokens(width: number, height: number): number {
  const p = FLUX_CONSTANTS.pixelsPerToken;
  for (const [label, value] of [
    ["width", width],
    ["height", height],
  ] as const) {
    if (!Number.isSafeInteger(value) || value <= 0 || value % p !== 0) {
      throw new RangeError(`--${label} must be a positive multiple of ${p} pixels (got ${value})`);
    }
  }
  return (width / p) * (height / p);
}

function prefixOf(header: ModelHeader): string {
  return header.tensors.some((t) => t.name === `${FLUX_PREFIX}img_in.weight`) ? FLUX_PREFIX : "";
}

/** Whether a header is a FLUX.1 transformer's (flux.cpp's is_flux). */
export function isFluxHeader(header: ModelHeader): boolean {
  if (header.format === "gguf") {
    const arch = header.gguf.metadata.get("general.architecture");
    if (arch) return arch.type === "string" && arch.value === GGUF_FLUX_ARCHITECTURE;
  }
  const prefix = prefixOf(header);
  const names = new Set(header.tensors.map((t) => t.name));
  return (
    names.has(`${prefix}img_in.weight`) && names.has(`${prefix}double_blocks.0.img_attn.qkv.weight`)
  );
}

/** The largest block index + 1 among "<prefix><group>.<i>." names (flux.cpp's count_blocks). */
function countBlocks(header: ModelHeader, prefix: string, group: string): number {
  const head = `${prefix}${group}.`;
  let count = 0;
  for (const t of header.tensors) {
    if (!t.name.startsWith(head)) continue;
    const m = /^(0|[1-9][0-9]{0,8})\./.exec(t.name.slice(head.length));
    if (!m) {
      throw new ModelFormatError(
        `${header.path}: tensor "${t.name}" is not a FLUX.1 ${group} tensor (expected ${head}<index>.…)`,
      );
    }
    const index = Number(m[1]);
    if (index >= header.tensors.length) {
      throw new ModelFormatError(
        `${header.path}: tensor "${t.name}": block index ${index} but the file holds only ${header.tensors.length} tensors`,
      );
    }
    count = Math.max(count, index + 1);
  }
  return count;
}

/**
 * A FLUX file's configuration and prefix, read from its tensors (flux.cpp's flux_for_file), or a
 * ModelFormatError naming the tensor that does not fit.
 */
export function fluxModelFromHeader(header: ModelHeader): FluxModel {
  const prefix = prefixOf(header);
  const where = `${header.path} (FLUX.1)`;
  const imgIn = header.tensors.find((t) => t.name === `${prefix}img_in.weight`);
  if (!imgIn) {
    throw new ModelFormatError(
      `${where}: missing tensor "img_in.weight" (FLUX.1's first layer; also looked under "${FLUX_PREFIX}")`,
    );
  }
  const [hidden, channels] = imgIn.shape;
  if (
    imgIn.shape.length !== 2 ||
    channels !== FLUX_CONSTANTS.channels ||
    !(hidden! > 0) ||
    hidden! % FLUX_CONSTANTS.headDim !== 0
  ) {
    throw new ModelFormatError(
      `${where}: tensor "${imgIn.name}" has shape [${imgIn.shape.join(", ")}], expected [hidden, 64] with hidden a multiple of 128 (FLUX.1 [dev]/[schnell] take 64 latent channels in 128-wide heads; Fill, Depth and Canny variants are not supported)`,
    );
  }
  const config: FluxConfig = {
    hidden: hidden!,
    depth: countBlocks(header, prefix, "double_blocks"),
    depthSingle: countBlocks(header, prefix, "single_blocks"),
    guidance: header.tensors.some((t) => t.name === `${prefix}guidance_in.in_layer.weight`),
  };
  if (config.depth === 0) {
    throw new ModelFormatError(
      `${where}: missing tensor "${prefix}double_blocks.0.img_attn.qkv.weight" (no double blocks)`,
    );
  }
  return { config, prefix };
}

/** Safetensors dtypes FLUX weights may have (GGUF: any type ggml computes, for matrices). */
const SAFETENSORS_FLOAT_DTYPES: ReadonlySet<string> = new Set(["F32", "F16", "BF16"]);
const GGUF_VECTOR_TYPES: ReadonlySet<string> = new Set(["f32", "f16", "bf16"]);

/** A FLUX file's tensors grouped by base segment, in the architecture's order. */
export interface FluxSegmentTensors {
  name: string;
  kind: string;
  tensors: ModelTensor[];
}

/**
 * Checks a header's tensors against the FLUX.1 layout (names, shapes, types; tensors outside the
 * prefix of a prefixed file are ignored) and returns them per base segment — the binding the
 * native model does when it opens the file. ModelFormatError naming the tensor.
 */
export function checkFluxTensors(header: ModelHeader, model: FluxModel): FluxSegmentTensors[] {
  const byName = new Map(header.tensors.map((t) => [t.name, t]));
  const layout = fluxLayout(model.config);
  const where = `${header.path} (${describeFlux(model.config)})`;
  const used = new Set<string>();
  const out: FluxSegmentTensors[] = [];
  for (const segment of layout.segments) {
    const tensors: ModelTensor[] = [];
    for (const spec of segment.weights) {
      const name = model.prefix + spec.name;
      const t = byName.get(name);
      if (!t) throw new ModelFormatError(`${where}: missing tensor "${name}"`);
      if (t.shape.length !== spec.shape.length || t.shape.some((d, i) => d !== spec.shape[i])) {
        throw new ModelFormatError(
          `${where}: tensor "${name}" has shape [${t.shape.join(", ")}], expected [${spec.shape.join(", ")}]`,
        );
      }
      const ok =
        header.format === "safetensors"
          ? SAFETENSORS_FLOAT_DTYPES.has(t.dtype)
          : spec.matrix
            ? isGgmlComputeType(t.dtype) || loadAddonWeightType(t.dtype)
            : GGUF_VECTOR_TYPES.has(t.dtype);
      if (!ok) {
        throw new ModelFormatError(
          `${where}: tensor "${name}" has dtype ${t.dtype}; ${spec.matrix ? "weight matrices must be F32, F16 or BF16 (GGUF: a type ggml multiplies with)" : "norm scales and biases must be f32, f16 or bf16"}`,
        );
      }
      used.add(name);
      tensors.push(t);
    }
    out.push({ name: segment.name, kind: segment.kind, tensors });
  }
  const extra = header.tensors
    .filter((t) => !used.has(t.name) && t.name.startsWith(model.prefix))
    .map((t) => `"${t.name}"`);
  if (extra.length > 0) {
    throw new ModelFormatError(
      `${where}: unexpected tensor${extra.length > 1 ? "s" : ""} ${extra.slice(0, 5).join(", ")}${extra.length > 5 ? ", …" : ""}`,
    );
  }
  return out;
}

/** Whether ggml's CPU backend multiplies with `type` (k-quants, iq4_nl, …), from the addon. */
function loadAddonWeightType(type: string): boolean {
  weightTypes ??= new Set(
    loadAddon()
      .ggmlTypes()
      .filter((t) => t.weight)
      .map((t) => t.name),
  );
  return weightTypes.has(type);
}
let weightTypes: Set<string> | undefined;

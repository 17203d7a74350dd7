/**
 * The synthetic DiT-style architecture Ferry generates, plans and runs: an embedding, N
 * pre-norm transformer blocks (attention + 4× MLP, RMSNorm, no mask), and a final projection back
 * to the latent channels. Tensor names and shapes here are the contract between the generator,
 * the header-only planner (segments.ts), the TypeScript reference and the native kernels
 * (native/include/ferry/kernels.h). Weights follow PyTorch's Linear convention: [out, in].
 */
import { ModelFormatError, type SafetensorsHeader, type SafetensorsTensor } from "./safetensors";

export interface DitConfig {
  /** N: transformer blocks. */
  blocks: number;
  /** D: hidden width. */
  hidden: number;
  /** H: attention heads (D % H == 0). */
  heads: number;
  /** C: latent channels in and out. */
  channels: number;
}

export interface DitTensorSpec {
  name: string;
  shape: number[];
  /** Base segment the tensor belongs to: "prelude", "blocks.<i>" or "final". */
  segment: string;
}

/** safetensors `__metadata__` keys that describe a Ferry DiT. */
export const DIT_METADATA_KEYS = {
  arch: "ferry.arch",
  hidden: "ferry.hidden",
  heads: "ferry.heads",
  channels: "ferry.channels",
  blocks: "ferry.blocks",
} as const;

/** Suffixes of one block's tensors, in file order, with their shapes for hidden width D. */
function blockTensorShapes(d: number): [string, number[]][] {
  return [
    ["norm1.weight", [d]],
    ["attn.qkv.weight", [3 * d, d]],
    ["attn.qkv.bias", [3 * d]],
    ["attn.out.weight", [d, d]],
    ["attn.out.bias", [d]],
    ["norm2.weight", [d]],
    ["mlp.fc1.weight", [4 * d, d]],
    ["mlp.fc1.bias", [4 * d]],
    ["mlp.fc2.weight", [d, 4 * d]],
    ["mlp.fc2.bias", [d]],
  ];
}

/** Throws a RangeError (prefixed by `where`) unless `config` is a usable DiT configuration. */
export function validateDitConfig(config: DitConfig, where = "DiT config"): void {
  for (const key of ["blocks", "hidden", "heads", "channels"] as const) {
    const v = config[key];
    if (!Number.isSafeInteger(v) || v <= 0) {
      throw new RangeError(`${where}: ${key} must be a positive integer (got ${v})`);
    }
  }
  if (config.hidden % config.heads !== 0) {
    throw new RangeError(`${where}: heads ${config.heads} does not divide hidden ${config.hidden}`);
  }
}

/** Every tensor of a DiT with `config`, in file order. */
export function ditTensorSpecs(config: DitConfig): DitTensorSpec[] {
  validateDitConfig(config);
  const d = config.hidden;
  const c = config.channels;
  const specs: DitTensorSpec[] = [
    { name: "embed.weight", shape: [d, c], segment: "prelude" },
    { name: "embed.bias", shape: [d], segment: "prelude" },
  ];
  for (let i = 0; i < config.blocks; i++) {
    for (const [suffix, shape] of blockTensorShapes(d)) {
      specs.push({ name: `blocks.${i}.${suffix}`, shape, segment: `blocks.${i}` });
    }
  }
  specs.push(
    { name: "final.norm.weight", shape: [d], segment: "final" },
    { name: "final.out.weight", shape: [c, d], segment: "final" },
    { name: "final.out.bias", shape: [c], segment: "final" },
  );
  return specs;
}

/** Base segment names in execution order: prelude, blocks.0 … blocks.N−1, final. */
export function ditSegmentNames(config: DitConfig): string[] {
  return ["prelude", ...Array.from({ length: config.blocks }, (_, i) => `blocks.${i}`), "final"];
}

/**
 * The base segment a tensor belongs to ("prelude", "blocks.<i>", "final"), or undefined for a
 * name that is not part of the DiT layout.
 */
export function baseSegmentOf(tensorName: string): string | undefined {
  if (tensorName.startsWith("embed.")) return "prelude";
  if (tensorName.startsWith("final.")) return "final";
  const m = /^blocks\.(0|[1-9][0-9]*)\./.exec(tensorName);
  return m ? `blocks.${m[1]}` : undefined;
}

/** The `__metadata__` a DiT file carries (decimal strings). */
export function ditMetadata(config: DitConfig): Record<string, string> {
  validateDitConfig(config);
  return {
    [DIT_METADATA_KEYS.arch]: "dit",
    [DIT_METADATA_KEYS.blocks]: String(config.blocks),
    [DIT_METADATA_KEYS.hidden]: String(config.hidden),
    [DIT_METADATA_KEYS.heads]: String(config.heads),
    [DIT_METADATA_KEYS.channels]: String(config.channels),
  };
}

/** Reads the DiT configuration from a file's `__metadata__`; ModelFormatError naming `path`. */
export function ditConfigFromMetadata(metadata: Record<string, string>, path: string): DitConfig {
  const arch = metadata[DIT_METADATA_KEYS.arch];
  if (arch === undefined) {
    throw new ModelFormatError(
      `${path}: not a Ferry DiT model: __metadata__ has no "${DIT_METADATA_KEYS.arch}" (write one with \`ferry gen-model\`)`,
    );
  }
  if (arch !== "dit") {
    throw new ModelFormatError(
      `${path}: unsupported architecture "${DIT_METADATA_KEYS.arch}" = ${JSON.stringify(arch)} (expected "dit")`,
    );
  }
  const read = (key: keyof typeof DIT_METADATA_KEYS): number => {
    const field = DIT_METADATA_KEYS[key];
    const text = metadata[field];
    if (text === undefined) throw new ModelFormatError(`${path}: __metadata__ lacks "${field}"`);
    // Plain decimal only: Number() would also accept "0x10", "1e3" or " 4".
    const value = /^[1-9][0-9]*$/.test(text) ? Number(text) : NaN;
    if (!Number.isSafeInteger(value)) {
      throw new ModelFormatError(
        `${path}: __metadata__ "${field}" = ${JSON.stringify(text)} is not a positive decimal integer`,
      );
    }
    return value;
  };
  const config: DitConfig = {
    blocks: read("blocks"),
    hidden: read("hidden"),
    heads: read("heads"),
    channels: read("channels"),
  };
  if (config.hidden % config.heads !== 0) {
    throw new ModelFormatError(
      `${path}: __metadata__ "${DIT_METADATA_KEYS.heads}" = ${config.heads} does not divide "${DIT_METADATA_KEYS.hidden}" = ${config.hidden}`,
    );
  }
  return config;
}

/** Weight dtypes the kernels compute with. */
export const DIT_WEIGHT_DTYPES: ReadonlySet<string> = new Set(["F32", "F16", "BF16"]);

/**
 * Checks a header's tensors against the DiT layout — the same names, shapes, and a float dtype
 * the kernels support — and returns the tensors in spec order. Header-only: no data is read.
 */
export function checkDitTensors(header: SafetensorsHeader, config: DitConfig): SafetensorsTensor[] {
  const byName = new Map(header.tensors.map((t) => [t.name, t]));
  const specs = ditTensorSpecs(config);
  const where = `${header.path} (DiT ${config.blocks} blocks, hidden ${config.hidden}, heads ${config.heads}, channels ${config.channels})`;
  const ordered: SafetensorsTensor[] = [];
  for (const spec of specs) {
    const t = byName.get(spec.name);
    if (!t) throw new ModelFormatError(`${where}: missing tensor "${spec.name}"`);
    if (t.shape.length !== spec.shape.length || t.shape.some((d, i) => d !== spec.shape[i])) {
      throw new ModelFormatError(
        `${where}: tensor "${spec.name}" has shape [${t.shape.join(", ")}], expected [${spec.shape.join(", ")}]`,
      );
    }
    if (!DIT_WEIGHT_DTYPES.has(t.dtype)) {
      throw new ModelFormatError(
        `${where}: tensor "${spec.name}" has dtype ${t.dtype}; DiT weights must be F32, F16 or BF16`,
      );
    }
    ordered.push(t);
  }
  if (header.tensors.length !== specs.length) {
    const expected = new Set(specs.map((s) => s.name));
    const extra = header.tensors.filter((t) => !expected.has(t.name)).map((t) => `"${t.name}"`);
    throw new ModelFormatError(
      `${where}: unexpected tensor${extra.length > 1 ? "s" : ""} ${extra.slice(0, 5).join(", ")}${extra.length > 5 ? ", …" : ""}`,
    );
  }
  return ordered;
}

/**
 * One view of a model file's header, whatever its format: GGUF or safetensors, sniffed from the
 * first bytes. The planner, the reference and `ferry inspect` read tensors through this, so a
 * GGUF model and a safetensors model of the same network look the same to them: names, row-major
 * shapes, stored dtype, absolute byte ranges, and the architecture's configuration (a Ferry DiT's,
 * a FLUX.1 transformer's).
 */
import { openRegularFile } from "./openRegularFile";
import { DIT_METADATA_KEYS, ditConfigFromMetadata, ditTensorSpecs, type DitConfig } from "./dit";
import { fluxModelFromHeader, isFluxHeader, type FluxModel } from "./flux";
import { GGUF_DIT_ARCHITECTURE } from "./genModel";
import {
  GGUF_MAGIC,
  readGgufHeader,
  summarizeGgufValue,
  type GgufHeader,
  type GgufValue,
  type ReadGgufOptions,
} from "./gguf";
import { isGgmlComputeType } from "./quantize";
import { ModelFormatError, readSafetensorsHeader, type SafetensorsHeader } from "./safetensors";

export type ModelFormat = "safetensors" | "gguf";

/** One tensor, format-independent. */
export interface ModelTensor {
  name: string;
  /** The stored type: a ggml type name for GGUF ("f16", "q8_0"), a safetensors dtype ("F16"). */
  dtype: string;
  /** Row-major shape (PyTorch/safetensors order; for GGUF, ne reversed). */
  shape: number[];
  /** Absolute file offset of the first byte. */
  begin: number;
  /** Absolute file offset one past the last byte. */
  end: number;
  /** Bytes as stored (quantization-aware). */
  bytes: number;
}

interface ModelHeaderBase {
  path: string;
  fileBytes: number;
  /** Absolute offset of the tensor data section. */
  dataStart: number;
  /**
   * Metadata as strings: safetensors `__metadata__` as is; GGUF scalars in decimal, strings as
   * is, arrays summarized (`[string × 32000] "<unk>", …`) — the typed values are in `gguf`.
   */
  metadata: Record<string, string>;
  /** Tensors in data order (by `begin`). */
  tensors: ModelTensor[];
  /** The Ferry DiT configuration, when the metadata declares a valid one. */
  ditConfig?: DitConfig;
  /** A FLUX.1 transformer's configuration and tensor prefix, when the tensors are one's. */
  fluxModel?: FluxModel;
}

export type ModelHeader =
  | (ModelHeaderBase & { format: "gguf"; gguf: GgufHeader })
  | (ModelHeaderBase & { format: "safetensors"; safetensors: SafetensorsHeader });

/** Sniffs a file's format from its first bytes: "GGUF" magic, or a safetensors JSON header. */
export async function sniffModelFormat(path: string): Promise<ModelFormat> {
  const { fh } = await openRegularFile(path);
  try {
    const head = new Uint8Array(9);
    const { bytesRead } = await fh.read(head, 0, 9, 0);
    if (bytesRead >= 4 && String.fromCharCode(...head.subarray(0, 4)) === GGUF_MAGIC) {
      return "gguf";
    }
    // safetensors: u64 header length, then JSON that must begin with "{" (the spec requires it).
    // A file too short to tell goes to the safetensors reader, whose error explains the length.
    if (bytesRead < 9 || head[8] === 0x7b) return "safetensors";
    // Says what is missing, never what the file holds.
    throw new ModelFormatError(
      `${path}: not a model file: neither GGUF (no "GGUF" magic) nor safetensors (no JSON header after the 8-byte length)`,
    );
  } finally {
    await fh.close();
  }
}

function ggufMetadataStrings(metadata: Map<string, GgufValue>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [key, value] of metadata) {
    out[key] = value.type === "string" ? value.value : summarizeGgufValue(value);
  }
  return out;
}

/**
 * The DiT configuration a GGUF file declares (`general.architecture = "ferry-dit"` and
 * `ferry-dit.{blocks,hidden,heads,channels}`), or a ModelFormatError saying what is missing.
 */
export function ditConfigFromGguf(header: GgufHeader): DitConfig {
  const path = header.path;
  const arch = header.metadata.get("general.architecture");
  if (arch === undefined) {
    throw new ModelFormatError(
      `${path}: not a Ferry DiT model: no "general.architecture" (write one with \`ferry gen-model --format gguf\`)`,
    );
  }
  if (arch.type !== "string" || arch.value !== GGUF_DIT_ARCHITECTURE) {
    throw new ModelFormatError(
      `${path}: not a Ferry DiT model: "general.architecture" is ${arch.type === "string" ? JSON.stringify(arch.value) : `a ${arch.type}`} (expected "${GGUF_DIT_ARCHITECTURE}")`,
    );
  }
  const read = (name: keyof DitConfig): number => {
    const key = `${GGUF_DIT_ARCHITECTURE}.${name}`;
    const value = header.metadata.get(key);
    if (value === undefined) throw new ModelFormatError(`${path}: metadata lacks "${key}"`);
    // gen-model writes uint32; accept any integer type that holds a positive value.
    const n =
      value.type === "uint64" || value.type === "int64"
        ? Number(value.value)
        : /^u?int(8|16|32)$/.test(value.type)
          ? (value.value as number)
          : NaN;
    if (!Number.isSafeInteger(n) || n <= 0) {
      throw new ModelFormatError(
        `${path}: metadata "${key}" must be a positive integer, got ${value.type} ${value.type === "array" ? "[…]" : String(value.value)}`,
      );
    }
    return n;
  };
  const config: DitConfig = {
    blocks: read("blocks"),
    hidden: read("hidden"),
    heads: read("heads"),
    channels: read("channels"),
  };
  if (config.hidden % config.heads !== 0) {
    throw new ModelFormatError(
      `${path}: "${GGUF_DIT_ARCHITECTURE}.heads" = ${config.heads} does not divide "${GGUF_DIT_ARCHITECTURE}.hidden" = ${config.hidden}`,
    );
  }
  return config;
}

/**
 * The DiT configuration of a model file, or a ModelFormatError saying why it is not a Ferry DiT
 * (no architecture metadata, another architecture, a missing or bad dimension).
 */
export function requireDitConfig(header: ModelHeader): DitConfig {
  return header.format === "gguf"
    ? ditConfigFromGguf(header.gguf)
    : ditConfigFromMetadata(header.metadata, header.path);
}

function optionalDitConfig(header: ModelHeader): DitConfig | undefined {
  const declared =
    header.format === "gguf"
      ? header.gguf.metadata.has("general.architecture")
      : header.metadata[DIT_METADATA_KEYS.arch] !== undefined;
  if (!declared) return undefined;
  try {
    return requireDitConfig(header);
  } catch (err) {
    if (err instanceof ModelFormatError) return undefined;
    throw err;
  }
}

/** The architecture a model file is, with its configuration. */
export type ModelArchitecture =
  { arch: "ferry-dit"; config: DitConfig } | { arch: "flux"; flux: FluxModel };

/**
 * The architecture of a model file: a Ferry DiT when its metadata declares one, FLUX.1 when its
 * tensors are a FLUX.1 transformer's, else a ModelFormatError saying why it is neither (or what
 * does not fit the one it looks like).
 */
export function requireModelArchitecture(header: ModelHeader): ModelArchitecture {
  const declaresDit =
    header.format === "gguf"
      ? header.gguf.metadata.get("general.architecture")?.value === GGUF_DIT_ARCHITECTURE
      : header.metadata[DIT_METADATA_KEYS.arch] !== undefined;
  if (!declaresDit && isFluxHeader(header)) {
    return { arch: "flux", flux: fluxModelFromHeader(header) };
  }
  return { arch: "ferry-dit", config: requireDitConfig(header) };
}

export type ReadModelHeaderOptions = ReadGgufOptions;

/**
 * Reads a model file's header (GGUF or safetensors, sniffed from its first bytes) without reading
 * tensor data. Every problem with the file is a ModelFormatError naming it.
 */
export async function readModelHeader(
  path: string,
  options: ReadModelHeaderOptions = {},
): Promise<ModelHeader> {
  const format = await sniffModelFormat(path);
  let header: ModelHeader;
  if (format === "gguf") {
    const gguf = await readGgufHeader(path, options);
    header = {
      format,
      path,
      fileBytes: gguf.fileBytes,
      dataStart: gguf.dataStart,
      metadata: ggufMetadataStrings(gguf.metadata),
      tensors: gguf.tensors
        .map((t) => ({
          name: t.name,
          dtype: t.type,
          shape: t.shape,
          begin: t.begin,
          end: t.end,
          bytes: t.bytes,
        }))
        // Stable: tensor-info order among tensors at the same offset (empty ones).
        .sort((a, b) => a.begin - b.begin || a.end - b.end),
      gguf,
    };
  } else {
    const st = await readSafetensorsHeader(path);
    header = {
      format,
      path,
      fileBytes: st.fileBytes,
      dataStart: st.dataStart,
      metadata: { ...st.metadata },
      tensors: st.tensors.map((t) => ({
        name: t.name,
        dtype: t.dtype,
        shape: t.shape.slice(),
        begin: t.begin,
        end: t.end,
        bytes: t.bytes,
      })),
      safetensors: st,
    };
  }
  const ditConfig = optionalDitConfig(header);
  if (ditConfig) header.ditConfig = ditConfig;
  else if (isFluxHeader(header)) {
    try {
      header.fluxModel = fluxModelFromHeader(header);
    } catch (err) {
      if (!(err instanceof ModelFormatError)) throw err;
    }
  }
  return header;
}

/** Safetensors dtypes the DiT kernels compute with. */
const SAFETENSORS_DIT_DTYPES: ReadonlySet<string> = new Set(["F32", "F16", "BF16"]);

/** True when tensors of `dtype` in a `format` file can be DiT weights. */
export function isDitWeightDtype(format: ModelFormat, dtype: string): boolean {
  return format === "gguf" ? isGgmlComputeType(dtype) : SAFETENSORS_DIT_DTYPES.has(dtype);
}

/**
 * Checks a header's tensors against the DiT layout — the same names, row-major shapes, and a
 * dtype the kernels support (F32/F16/BF16 in safetensors; f32, f16, bf16, q8_0, q4_0 in GGUF) —
 * and returns them in spec order. Header-only: no data is read.
 */
export function checkDitModelTensors(header: ModelHeader, config: DitConfig): ModelTensor[] {
  const byName = new Map(header.tensors.map((t) => [t.name, t]));
  // A DiT has 2 + 10·blocks + 3 tensors. When the metadata claims more blocks than the file can
  // hold (a corrupt "blocks" of 4 billion), list the specs only up to the first block that must
  // be missing — names are unique, so one is — instead of building billions of them.
  const holdable = Math.floor(header.tensors.length / 10) + 1;
  const specs = ditTensorSpecs(config.blocks > holdable ? { ...config, blocks: holdable } : config);
  const where = `${header.path} (DiT ${config.blocks} blocks, hidden ${config.hidden}, heads ${config.heads}, channels ${config.channels})`;
  const ordered: ModelTensor[] = [];
  for (const spec of specs) {
    const t = byName.get(spec.name);
    if (!t) throw new ModelFormatError(`${where}: missing tensor "${spec.name}"`);
    if (t.shape.length !== spec.shape.length || t.shape.some((d, i) => d !== spec.shape[i])) {
      throw new ModelFormatError(
        `${where}: tensor "${spec.name}" has shape [${t.shape.join(", ")}], expected [${spec.shape.join(", ")}]`,
      );
    }
    if (!isDitWeightDtype(header.format, t.dtype)) {
      throw new ModelFormatError(
        `${where}: tensor "${spec.name}" has dtype ${t.dtype}; DiT weights must be ${header.format === "gguf" ? "f32, f16, bf16, q8_0 or q4_0" : "F32, F16 or BF16"}`,
      );
    }
    ordered.push(t);
  }
  if (config.blocks > holdable) {
    // Unreachable: the truncated spec list has more names than the file has tensors.
    throw new ModelFormatError(`${where}: the file has only ${header.tensors.length} tensors`);
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

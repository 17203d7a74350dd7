/**
 * Synthetic DiT model generator (`ferry gen-model`): deterministic weights from a seed, written
 * tensor by tensor in chunks, so a model of any size needs only a few MB of heap and tests and
 * demos need no download.
 *
 * Weights: each tensor has its own SplitMix64 counter stream keyed by (seed, tensor name); element
 * j draws u_j = ((splitmix64(key + j) >> 40) / 2^24)·2 − 1 ∈ [-1, 1). Scaling keeps activations
 * in range over many sampler steps:
 *   - weight matrices [out, in]: u/√in (variance-preserving, like PyTorch's Linear init);
 *   - biases: 0.02·u;
 *   - norm weights: 1 + 0.1·u.
 * Values are rounded to float32, then to f16/bf16 (nearest even) or quantized with ggml's own
 * quantizer (ggml_quantize_chunk, through the native addon) when asked for. The float32 values
 * depend only on the seed and the tensor, never on the format or dtype, so every file made from
 * one seed holds the same model.
 *
 * Formats: safetensors (f32, f16, bf16) or GGUF (those and the quantized types of
 * GEN_MODEL_QUANT_DTYPES: q8_0, q4_0, the k-quants, iq4_nl, …). GGUF files carry
 * `general.architecture = "ferry-dit"` and `ferry-dit.{blocks,hidden,heads,channels}` (uint32);
 * tensor names are the safetensors names, dimensions in ggml order (ne = reversed shape). In a
 * quantized file every 2-D weight matrix is quantized, and norm weights and biases stay f32 — as
 * llama.cpp quantizes — except a matrix whose rows (ne[0], its input width) are not a whole number
 * of the type's blocks (32 elements; 256 for the k-quants and iq4_xs: e.g. embed.weight with 16
 * channels), which cannot be quantized and is stored f16, the last-resort type llama.cpp's
 * quantizer also falls back to.
 */
import { FLOAT_DTYPE_BYTES, type FloatDtype } from "./half";
import {
  ditTensorSpecs,
  ditMetadata,
  validateDitConfig,
  type DitConfig,
  type DitTensorSpec,
} from "./dit";
import { fillUniform, normalizeSeed, splitmix64, toU64 } from "./initialInput";
import { writeSafetensors, type TensorToWrite } from "./safetensors";
import { writeGguf, type GgufTensorToWrite } from "./ggufWriter";
import type { GgufValue } from "./gguf";
import { ggmlNbytes, ggmlType } from "./ggmlTypes";
import { encodeFloats as encodeFloatValues } from "./half";
import { loadAddon } from "../native/addon";

/** Float weight types, written in either format (the CLI spelling). */
export const GEN_MODEL_FLOAT_DTYPES = ["f32", "f16", "bf16"] as const;
/**
 * ggml quantized types, written in GGUF only: every type ggml's CPU backend multiplies with that
 * its quantizer makes without an importance matrix.
 */
export const GEN_MODEL_QUANT_DTYPES = [
  "q8_0",
  "q4_0",
  "q4_1",
  "q5_0",
  "q5_1",
  "q2_K",
  "q3_K",
  "q4_K",
  "q5_K",
  "q6_K",
  "iq4_nl",
  "iq4_xs",
] as const;
/** Every weight type gen-model writes. */
export const GEN_MODEL_DTYPES = [...GEN_MODEL_FLOAT_DTYPES, ...GEN_MODEL_QUANT_DTYPES] as const;
export type GenModelDtype = (typeof GEN_MODEL_DTYPES)[number];

/** File formats gen-model writes. */
export const GEN_MODEL_FORMATS = ["safetensors", "gguf"] as const;
export type GenModelFormat = (typeof GEN_MODEL_FORMATS)[number];

/** The GGUF architecture name of a Ferry DiT, and the prefix of its metadata keys. */
export const GGUF_DIT_ARCHITECTURE = "ferry-dit";

export const SAFETENSORS_DTYPE: Record<(typeof GEN_MODEL_FLOAT_DTYPES)[number], FloatDtype> = {
  f32: "F32",
  f16: "F16",
  bf16: "BF16",
};

export function isQuantDtype(
  dtype: GenModelDtype,
): dtype is (typeof GEN_MODEL_QUANT_DTYPES)[number] {
  return (GEN_MODEL_QUANT_DTYPES as readonly string[]).includes(dtype);
}

/** The format a path implies: ".gguf" (any case) → gguf, anything else → safetensors. */
export function formatFromPath(path: string): GenModelFormat {
  return /\.gguf$/i.test(path) ? "gguf" : "safetensors";
}

/**
 * The ggml type a tensor of a `dtype` model is stored as: the dtype itself for f32/f16/bf16; for
 * a quantized dtype, the dtype for 2-D weight matrices whose rows are whole blocks of it, f16 for
 * other matrices (rows that cannot be split into blocks), and f32 for 1-D tensors (norm weights,
 * biases).
 */
export function genModelTensorType(
  spec: Pick<DitTensorSpec, "name" | "shape">,
  dtype: GenModelDtype,
): string {
  if (!isQuantDtype(dtype)) return dtype;
  if (spec.shape.length !== 2) return "f32";
  return spec.shape[1]! % ggmlType(dtype).blockSize === 0 ? dtype : "f16";
}

/** A chunk of float32 values (whole rows of `rowLength`) as ggml `type` bytes. */
export function encodeAs(type: string, values: Float32Array, rowLength: number, out: Uint8Array) {
  if (type === "f32" || type === "f16" || type === "bf16") {
    return encodeFloatValues(values, SAFETENSORS_DTYPE[type], out);
  }
  return loadAddon().quantize(type, values, rowLength);
}

export interface GenModelOptions {
  /** Transformer blocks (N). @default 4 */
  blocks?: number;
  /** Hidden width (D). @default 256 */
  hidden?: number;
  /** Attention heads (H); must divide `hidden`. @default 4 */
  heads?: number;
  /** Latent channels (C). @default 16 */
  channels?: number;
  /**
   * Weight type: f32, f16, bf16 (any format) or q8_0, q4_0 (GGUF only; see genModelTensorType).
   * @default "f32"
   */
  dtype?: GenModelDtype;
  /** File format. @default "gguf" for a path ending in .gguf, else "safetensors" */
  format?: GenModelFormat;
  /** Weight seed, an integer in [0, 2^64). @default 0 */
  seed?: number | bigint;
  /** Called as data is written: bytes of tensor data written so far, and the total. */
  onProgress?: (written: number, total: number) => void;
}

export const GEN_MODEL_DEFAULTS = {
  blocks: 4,
  hidden: 256,
  heads: 4,
  channels: 16,
  dtype: "f32",
  seed: 0,
} as const;

export interface GenModelResult {
  path: string;
  config: DitConfig;
  dtype: GenModelDtype;
  format: GenModelFormat;
  /** Number of weights. */
  params: number;
  /** File size in bytes. */
  bytes: number;
}

/** Elements generated per chunk: 4 MiB of float32, small enough to never matter for the heap. */
const CHUNK_ELEMENTS = 1 << 20;

const FNV_OFFSET = 0xcbf29ce484222325n;
const FNV_PRIME = 0x100000001b3n;

/** FNV-1a 64 of the name's UTF-8 bytes: mixes the tensor name into its stream key. */
function fnv1a64(text: string): bigint {
  let h = FNV_OFFSET;
  for (const byte of new TextEncoder().encode(text)) {
    h = BigInt.asUintN(64, (h ^ BigInt(byte)) * FNV_PRIME);
  }
  return h;
}

/** Counter base of a tensor's stream: splitmix64(splitmix64(seed) ^ fnv1a64(name)). */
export function tensorStreamKey(seed: number | bigint, name: string): bigint {
  return splitmix64(splitmix64(normalizeSeed(seed)) ^ fnv1a64(name));
}

/** How a tensor's uniform draws u ∈ [-1, 1) become weights: value = offset + scale·u. */
export function tensorInit(spec: Pick<DitTensorSpec, "name" | "shape">): {
  offset: number;
  scale: number;
} {
  if (spec.name.endsWith(".bias")) return { offset: 0, scale: 0.02 };
  if (spec.shape.length === 2) return { offset: 0, scale: 1 / Math.sqrt(spec.shape[1]!) };
  // Norm weights (the DiT's) and norm scales (FLUX's QK RMSNorm).
  if (spec.shape.length === 1 && (spec.name.endsWith(".weight") || spec.name.endsWith(".scale"))) {
    return { offset: 1, scale: 0.1 };
  }
  throw new Error(`gen-model: no initialisation rule for tensor "${spec.name}"`);
}

/**
 * Float32 values of elements [start, start + out.length) of a generated tensor, into `out`. The
 * same numbers the file holds for f32 (f16/bf16 files hold these rounded).
 */
export function generateTensorValues(
  seed: number | bigint,
  spec: Pick<DitTensorSpec, "name" | "shape">,
  start: number,
  out: Float32Array,
): void {
  const { offset, scale } = tensorInit(spec);
  fillUniform(out, toU64(tensorStreamKey(seed, spec.name) + BigInt(start)));
  for (let i = 0; i < out.length; i++) out[i] = offset + scale * out[i]!;
}

/** Bytes of one generated tensor, chunk by chunk. Buffers are reused between chunks. */
export function* tensorChunks(
  seed: bigint,
  spec: Pick<DitTensorSpec, "name" | "shape">,
  encode: (values: Float32Array, out: Uint8Array) => Uint8Array,
  values: Float32Array,
  encoded: Uint8Array,
): Generator<Uint8Array> {
  const count = spec.shape.reduce((a, b) => a * b, 1);
  // Chunks are whole rows, so every chunk is whole blocks of any type (blocks never cross rows).
  const row = spec.shape[spec.shape.length - 1]!;
  const rows = row > CHUNK_ELEMENTS ? row : CHUNK_ELEMENTS - (CHUNK_ELEMENTS % row);
  for (let start = 0; start < count; start += rows) {
    const n = Math.min(rows, count - start);
    const chunk = values.subarray(0, n);
    generateTensorValues(seed, spec, start, chunk);
    yield encode(chunk, encoded);
  }
}

/**
 * One pair of chunk buffers for a whole model (grown for a row longer than a chunk); the writer
 * consumes a chunk before asking for the next.
 */
export function chunkBuffers(): (spec: Pick<DitTensorSpec, "shape">) => {
  values: Float32Array;
  encoded: Uint8Array;
} {
  let buffers: { values: Float32Array; encoded: Uint8Array } | undefined;
  return (spec) => {
    const need = Math.max(CHUNK_ELEMENTS, spec.shape[spec.shape.length - 1]!);
    if (!buffers || buffers.values.length < need) {
      buffers = { values: new Float32Array(need), encoded: new Uint8Array(need * 4) };
    }
    return buffers;
  };
}

/** The generated model's tensors, ready for writeSafetensors; data is produced lazily. */
export function genModelTensors(
  config: DitConfig,
  dtype: GenModelDtype,
  seed: number | bigint,
): TensorToWrite[] {
  if (isQuantDtype(dtype)) {
    throw new RangeError(
      `--dtype ${dtype} is a ggml quantized type; safetensors has none: use --format gguf`,
    );
  }
  const seedValue = normalizeSeed(seed);
  const type = SAFETENSORS_DTYPE[dtype];
  const buffers = chunkBuffers();
  return ditTensorSpecs(config).map((spec) => ({
    name: spec.name,
    dtype: type,
    shape: spec.shape,
    data: () => {
      const { values, encoded } = buffers(spec);
      return tensorChunks(
        seedValue,
        spec,
        (v, out) => encodeFloatValues(v, type, out),
        values,
        encoded,
      );
    },
  }));
}

/** The generated model's tensors, ready for writeGguf (ne = reversed shape); data is lazy. */
export function genModelGgufTensors(
  config: DitConfig,
  dtype: GenModelDtype,
  seed: number | bigint,
): GgufTensorToWrite[] {
  const seedValue = normalizeSeed(seed);
  const buffers = chunkBuffers();
  return ditTensorSpecs(config).map((spec) => {
    const type = genModelTensorType(spec, dtype);
    return {
      name: spec.name,
      type,
      ne: spec.shape.slice().reverse(),
      data: () => {
        const { values, encoded } = buffers(spec);
        const row = spec.shape[spec.shape.length - 1]!;
        return tensorChunks(
          seedValue,
          spec,
          (v, out) => encodeAs(type, v, row, out),
          values,
          encoded,
        );
      },
    };
  });
}

/** GGUF metadata of a Ferry DiT: the architecture and its four dimensions (uint32). */
export function ditGgufMetadata(config: DitConfig): Map<string, GgufValue> {
  validateDitConfig(config);
  const u32 = (value: number): GgufValue => ({ type: "uint32", value });
  return new Map<string, GgufValue>([
    ["general.architecture", { type: "string", value: GGUF_DIT_ARCHITECTURE }],
    [`${GGUF_DIT_ARCHITECTURE}.blocks`, u32(config.blocks)],
    [`${GGUF_DIT_ARCHITECTURE}.hidden`, u32(config.hidden)],
    [`${GGUF_DIT_ARCHITECTURE}.heads`, u32(config.heads)],
    [`${GGUF_DIT_ARCHITECTURE}.channels`, u32(config.channels)],
  ]);
}

/**
 * Validates gen-model options, throwing RangeError messages phrased as CLI flags. `out` decides
 * the format when `options.format` is absent.
 */
export function resolveGenModelOptions(
  options: GenModelOptions,
  out?: string,
): {
  config: DitConfig;
  dtype: GenModelDtype;
  format: GenModelFormat;
  seed: bigint;
} {
  const config: DitConfig = {
    blocks: options.blocks ?? GEN_MODEL_DEFAULTS.blocks,
    hidden: options.hidden ?? GEN_MODEL_DEFAULTS.hidden,
    heads: options.heads ?? GEN_MODEL_DEFAULTS.heads,
    channels: options.channels ?? GEN_MODEL_DEFAULTS.channels,
  };
  for (const key of ["blocks", "hidden", "heads", "channels"] as const) {
    if (!Number.isSafeInteger(config[key]) || config[key] <= 0) {
      throw new RangeError(`--${key} must be a positive integer (got ${config[key]})`);
    }
  }
  if (config.hidden % config.heads !== 0) {
    throw new RangeError(`--heads ${config.heads} does not divide --hidden ${config.hidden}`);
  }
  validateDitConfig(config);
  return { config, ...resolveFileOptions(options, out) };
}

/**
 * The options every generated model has, whatever its architecture — weight type, file format
 * (from `out`'s extension when unset) and seed — checked together (a quantized type needs GGUF).
 * RangeError messages phrased as CLI flags.
 */
export function resolveFileOptions(
  options: { dtype?: GenModelDtype; format?: GenModelFormat; seed?: number | bigint },
  out?: string,
): { dtype: GenModelDtype; format: GenModelFormat; seed: bigint } {
  const dtype = options.dtype ?? GEN_MODEL_DEFAULTS.dtype;
  if (!(GEN_MODEL_DTYPES as readonly string[]).includes(dtype)) {
    throw new RangeError(`--dtype must be one of ${GEN_MODEL_DTYPES.join(", ")} (got ${dtype})`);
  }
  const format = options.format ?? (out !== undefined ? formatFromPath(out) : "safetensors");
  if (!(GEN_MODEL_FORMATS as readonly string[]).includes(format)) {
    throw new RangeError(
      `--format must be one of ${GEN_MODEL_FORMATS.join(", ")} (got ${String(format)})`,
    );
  }
  if (format === "safetensors" && isQuantDtype(dtype)) {
    throw new RangeError(
      `--dtype ${dtype} is a ggml quantized type and needs GGUF: use --format gguf or a .gguf file name`,
    );
  }
  let seed: bigint;
  try {
    seed = normalizeSeed(options.seed ?? GEN_MODEL_DEFAULTS.seed);
  } catch {
    throw new RangeError(`--seed must be an integer in [0, 2^64) (got ${options.seed})`);
  }
  return { dtype, format, seed };
}

/**
 * Parameter count and tensor-data bytes of a generated model, without generating it: the bytes
 * as stored (quantized types count their blocks), not counting GGUF's alignment padding.
 */
export function genModelSize(
  config: DitConfig,
  dtype: GenModelDtype,
): { params: number; dataBytes: number } {
  return tensorsSize(ditTensorSpecs(config), dtype);
}

/** Parameters and data bytes of tensors written in `dtype` (any architecture's specs). */
export function tensorsSize(
  specs: readonly Pick<DitTensorSpec, "name" | "shape">[],
  dtype: GenModelDtype,
): { params: number; dataBytes: number } {
  let params = 0;
  let dataBytes = 0;
  for (const spec of specs) {
    const count = spec.shape.reduce((a, b) => a * b, 1);
    params += count;
    dataBytes += isQuantDtype(dtype)
      ? ggmlNbytes(genModelTensorType(spec, dtype), spec.shape.slice().reverse())
      : count * FLOAT_DTYPE_BYTES[SAFETENSORS_DTYPE[dtype]];
  }
  return { params, dataBytes };
}

/**
 * Writes a synthetic DiT to `out` (atomically: nothing is left at `out` if it fails), as
 * safetensors or GGUF. The same options always produce the same bytes.
 */
export async function genModel(
  out: string,
  options: GenModelOptions = {},
): Promise<GenModelResult> {
  const { config, dtype, format, seed } = resolveGenModelOptions(options, out);
  const { params } = genModelSize(config, dtype);
  const written =
    format === "gguf"
      ? await writeGguf(out, ditGgufMetadata(config), genModelGgufTensors(config, dtype, seed), {
          onProgress: options.onProgress,
        })
      : await writeSafetensors(out, ditMetadata(config), genModelTensors(config, dtype, seed), {
          onProgress: options.onProgress,
        });
  return { path: out, config, dtype, format, params, bytes: written.bytes };
}

/**
 * A plain TypeScript reference of the DiT model, in float64 from the file's weights: the ground
 * truth the native kernels (float32, threaded, streamed) are compared against. Written for
 * clarity, not speed — it loads the whole model and is meant for small models.
 *
 * Math (PyTorch Linear convention, weight [out, in], y = x·Wᵀ + b), per base segment:
 *   prelude: x = z·Wembᵀ + b
 *   block:   h = rmsnorm(x)·norm1; [q | k | v] = h·Wqkvᵀ + b; per sample and head j (columns
 *            j·D/H …): softmax(q·kᵀ/√(D/H))·v, no mask; x += concat(heads)·Woᵀ + bo;
 *            h = rmsnorm(x)·norm2; x += gelu_tanh(h·W1ᵀ + b1)·W2ᵀ + b2
 *   final:   y = rmsnorm(x)·w·Wᵀ + b
 * rmsnorm(x) = x / sqrt(mean(x²) + 1e-6) over D. A job of S steps: z ← z − (1/S)·model(z), S times.
 *
 * Weights come from safetensors (F32/F16/BF16) or GGUF (f32/f16/bf16/q8_0/q4_0) files; quantized
 * weights are dequantized exactly as ggml does (to float32), then computed with in float64.
 *
 * The native layer runs on ggml's CPU backend, whose arithmetic this reference follows where it
 * departs from plain float math (the rest is float64 here, float32 there):
 * a matrix product first converts its activations to the weight type's dot-product type:
 * float16 for f16 weights, bfloat16 for bf16, q8_0 blocks (32 values, scale max|x|/127 stored as
 * float16, values rounded to nearest-even of x·127/max|x|) for q8_0 and q4_0 weights.
 */
import { promises as fs } from "node:fs";
import type { DitConfig } from "./dit";
import { initialInput } from "./initialInput";
import {
  checkDitModelTensors,
  readModelHeader,
  requireDitConfig,
  type ModelFormat,
  type ModelTensor,
} from "./modelFile";
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16 } from "./half";
import { decodeGgml, isGgmlComputeType } from "./quantize";
import { decodeTensor, isSafetensorsDtype, ModelFormatError } from "./safetensors";

/** Epsilon of every RMSNorm; the kernels use the same (kRmsNormEps). */
export const RMS_NORM_EPS = 1e-6;

/** A model's weights as float64 values, by tensor name, and the type each is stored as. */
export interface DitWeights {
  config: DitConfig;
  tensors: Map<string, Float64Array>;
  /** Stored type by tensor name ("F32", "f16", "q8_0", …); absent = float32. */
  types?: Map<string, string>;
}

export interface LoadDitWeightsOptions {
  /**
   * Refuse models whose tensor data is larger than this: the reference keeps every weight in
   * float64 (2–4× the file) and is only meant for small models.
   * @default 1 GiB
   */
  maxModelBytes?: number;
}

/** Reads a tensor's stored bytes from an open file. */
export async function readStored(
  fh: fs.FileHandle,
  path: string,
  t: ModelTensor,
): Promise<Uint8Array> {
  const bytes = new Uint8Array(t.bytes);
  let filled = 0;
  while (filled < t.bytes) {
    const { bytesRead } = await fh.read(bytes, filled, t.bytes - filled, t.begin + filled);
    if (bytesRead === 0) break;
    filled += bytesRead;
  }
  if (filled !== t.bytes) {
    throw new ModelFormatError(
      `${path}: tensor "${t.name}" is truncated (${filled} of ${t.bytes} bytes readable)`,
    );
  }
  return bytes;
}

/** A tensor's stored bytes as float64 values, decoded by its format's rules. */
export function decodeStored(format: ModelFormat, t: ModelTensor, bytes: Uint8Array): Float64Array {
  if (format === "gguf" && isGgmlComputeType(t.dtype)) {
    return Float64Array.from(decodeGgml(t.dtype, bytes));
  }
  if (format === "safetensors" && isSafetensorsDtype(t.dtype)) {
    return Float64Array.from(decodeTensor(t.dtype, bytes));
  }
  throw new ModelFormatError(`reference: cannot decode tensor "${t.name}" of dtype ${t.dtype}`);
}

/**
 * Loads every tensor of a DiT file (GGUF or safetensors), validated against the layout its
 * metadata declares.
 */
export async function loadDitWeights(
  path: string,
  options: LoadDitWeightsOptions = {},
): Promise<DitWeights> {
  const header = await readModelHeader(path);
  const config = requireDitConfig(header);
  const tensors = checkDitModelTensors(header, config);
  const maxBytes = options.maxModelBytes ?? 1024 ** 3;
  const total = tensors.reduce((sum, t) => sum + t.bytes, 0);
  if (total > maxBytes) {
    throw new RangeError(
      `${path}: ${total} bytes of weights is more than the reference loads (${maxBytes}); use a smaller model`,
    );
  }
  const map = new Map<string, Float64Array>();
  const types = new Map<string, string>();
  const fh = await fs.open(path, "r");
  try {
    for (const t of tensors) {
      map.set(t.name, decodeStored(header.format, t, await readStored(fh, path, t)));
      types.set(t.name, t.dtype);
    }
  } finally {
    await fh.close();
  }
  return { config, tensors: map, types };
}

function weight(weights: DitWeights, name: string): Float64Array {
  const w = weights.tensors.get(name);
  if (!w) throw new ModelFormatError(`reference: missing tensor "${name}"`);
  return w;
}

/** A matrix weight with the conversion ggml applies to the activations it multiplies. */
function matrix(weights: DitWeights, name: string): { w: Float64Array; type: string } {
  return { w: weight(weights, name), type: weights.types?.get(name) ?? "f32" };
}

const f16Round = (v: number) => f16ToF32(f32ToF16(v));
const bf16Round = (v: number) => bf16ToF32(f32ToBf16(v));

/** ggml's CPU q8_0 quantization of one row (AVX2 rule), dequantized: the values a q8_0 dot uses. */
function q8Round(row: Float64Array): Float64Array {
  const out = new Float64Array(row.length);
  for (let b = 0; b < row.length; b += 32) {
    let max = 0;
    for (let i = b; i < b + 32; i++) max = Math.max(max, Math.abs(Math.fround(row[i]!)));
    const d = f16Round(Math.fround(max / 127));
    const id = max !== 0 ? Math.fround(127 / max) : 0;
    for (let i = b; i < b + 32; i++) {
      const q = roundHalfEven(Math.fround(Math.fround(row[i]!) * id));
      out[i] = q * d;
    }
  }
  return out;
}

function roundHalfEven(v: number): number {
  const r = Math.round(v);
  return Math.abs(v - Math.trunc(v)) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** The activation row as ggml's matmul sees it for a weight stored as `type`. */
export function matmulActivations(type: string, row: Float64Array): Float64Array {
  switch (type.toLowerCase()) {
    case "f32":
      return row; // float32 activations times float32 weights: float64 here is the exact math
    case "f16":
      return row.map(f16Round);
    case "bf16":
      return row.map(bf16Round);
    case "q8_0":
    case "q4_0":
      return q8Round(row);
    default:
      throw new ModelFormatError(`reference: no ggml activation rule for weights of type ${type}`);
  }
}

/**
 * y[m, n] = Σ_k a(x[m, ·])[k]·W[n, k] + b[n] for x [rows, k], W [n, k], where a() converts the
 * activations as ggml does for the weight's type (matmulActivations; f32 when not given).
 */
export function linear(
  x: Float64Array,
  rows: number,
  w: Float64Array | { w: Float64Array; type: string },
  b: Float64Array | undefined,
  outFeatures: number,
): Float64Array {
  const type = w instanceof Float64Array ? "f32" : w.type;
  if (!(w instanceof Float64Array)) w = w.w;
  const inFeatures = x.length / rows;
  if (w.length !== outFeatures * inFeatures) {
    throw new RangeError(
      `linear: weight has ${w.length} values, expected ${outFeatures}×${inFeatures}`,
    );
  }
  const y = new Float64Array(rows * outFeatures);
  for (let m = 0; m < rows; m++) {
    const xo = m * inFeatures;
    const row = matmulActivations(type, x.subarray(xo, xo + inFeatures));
    for (let n = 0; n < outFeatures; n++) {
      const wo = n * inFeatures;
      let acc = 0;
      for (let k = 0; k < inFeatures; k++) acc += row[k]! * w[wo + k]!;
      if (b) acc += b[n]!;
      y[m * outFeatures + n] = acc;
    }
  }
  return y;
}

/** Per row of length d: x / sqrt(mean(x²) + eps) · w. */
export function rmsnorm(x: Float64Array, d: number, w: Float64Array): Float64Array {
  const y = new Float64Array(x.length);
  for (let o = 0; o < x.length; o += d) {
    let sum = 0;
    for (let k = 0; k < d; k++) sum += x[o + k]! * x[o + k]!;
    const scale = 1 / Math.sqrt(sum / d + RMS_NORM_EPS);
    for (let k = 0; k < d; k++) y[o + k] = x[o + k]! * scale * w[k]!;
  }
  return y;
}

/** GELU, tanh approximation: 0.5·v·(1 + tanh(√(2/π)·(v + 0.044715·v³))). */
export function geluTanh(v: number): number {
  return 0.5 * v * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (v + 0.044715 * v * v * v)));
}

/** Softmax of `values` in place (max-subtracted, so large scores do not overflow). */
export function softmaxInPlace(values: Float64Array): void {
  let max = -Infinity;
  for (const v of values) max = Math.max(max, v);
  let sum = 0;
  for (let i = 0; i < values.length; i++) {
    values[i] = Math.exp(values[i]! - max);
    sum += values[i]!;
  }
  for (let i = 0; i < values.length; i++) values[i] = values[i]! / sum;
}

/**
 * Multi-head self-attention over qkv [B·T, 3D] (q, k, v side by side), no mask; returns the
 * heads concatenated, [B·T, D].
 */
export function attention(
  qkv: Float64Array,
  batch: number,
  tokens: number,
  hidden: number,
  heads: number,
): Float64Array {
  const dh = hidden / heads;
  const scale = 1 / Math.sqrt(dh);
  const stride = 3 * hidden;
  const out = new Float64Array(batch * tokens * hidden);
  const scores = new Float64Array(tokens);
  for (let b = 0; b < batch; b++) {
    const row0 = b * tokens;
    for (let j = 0; j < heads; j++) {
      const qo = j * dh;
      const ko = hidden + j * dh;
      const vo = 2 * hidden + j * dh;
      for (let t = 0; t < tokens; t++) {
        const qRow = (row0 + t) * stride;
        for (let s = 0; s < tokens; s++) {
          const kRow = (row0 + s) * stride;
          let dot = 0;
          for (let c = 0; c < dh; c++) dot += qkv[qRow + qo + c]! * qkv[kRow + ko + c]!;
          scores[s] = dot * scale;
        }
        softmaxInPlace(scores);
        const oRow = (row0 + t) * hidden + j * dh;
        for (let s = 0; s < tokens; s++) {
          const p = scores[s]!;
          const vRow = (row0 + s) * stride + vo;
          for (let c = 0; c < dh; c++) out[oRow + c] = out[oRow + c]! + p * qkv[vRow + c]!;
        }
      }
    }
  }
  return out;
}

/** x ← block i(x), in place; x is [B·T, D]. */
export function blockForward(
  weights: DitWeights,
  i: number,
  x: Float64Array,
  batch: number,
  tokens: number,
): void {
  const { hidden: d, heads } = weights.config;
  const m = batch * tokens;
  const p = `blocks.${i}.`;
  const h1 = rmsnorm(x, d, weight(weights, `${p}norm1.weight`));
  const qkv = linear(
    h1,
    m,
    matrix(weights, `${p}attn.qkv.weight`),
    weight(weights, `${p}attn.qkv.bias`),
    3 * d,
  );
  const att = attention(qkv, batch, tokens, d, heads);
  const proj = linear(
    att,
    m,
    matrix(weights, `${p}attn.out.weight`),
    weight(weights, `${p}attn.out.bias`),
    d,
  );
  for (let k = 0; k < x.length; k++) x[k] = x[k]! + proj[k]!;
  const h2 = rmsnorm(x, d, weight(weights, `${p}norm2.weight`));
  const hidden = linear(
    h2,
    m,
    matrix(weights, `${p}mlp.fc1.weight`),
    weight(weights, `${p}mlp.fc1.bias`),
    4 * d,
  );
  for (let k = 0; k < hidden.length; k++) hidden[k] = geluTanh(hidden[k]!);
  const mlp = linear(
    hidden,
    m,
    matrix(weights, `${p}mlp.fc2.weight`),
    weight(weights, `${p}mlp.fc2.bias`),
    d,
  );
  for (let k = 0; k < x.length; k++) x[k] = x[k]! + mlp[k]!;
}

/** One forward pass: model(z) for z [B·T, C]; returns [B·T, C]. */
export function ditForward(
  weights: DitWeights,
  z: Float64Array,
  batch: number,
  tokens: number,
): Float64Array {
  const { hidden: d, channels: c, blocks } = weights.config;
  const m = batch * tokens;
  if (z.length !== m * c) {
    throw new RangeError(
      `ditForward: input has ${z.length} values, expected ${batch}×${tokens}×${c}`,
    );
  }
  const x = linear(z, m, matrix(weights, "embed.weight"), weight(weights, "embed.bias"), d);
  for (let i = 0; i < blocks; i++) blockForward(weights, i, x, batch, tokens);
  const h = rmsnorm(x, d, weight(weights, "final.norm.weight"));
  return linear(h, m, matrix(weights, "final.out.weight"), weight(weights, "final.out.bias"), c);
}

/** S sampler steps in float64: z ← z − (1/S)·model(z). Returns a new array. */
export function runSteps(
  weights: DitWeights,
  input: ArrayLike<number>,
  batch: number,
  tokens: number,
  steps: number,
): Float64Array {
  const z = Float64Array.from(input);
  const dt = 1 / steps;
  for (let s = 0; s < steps; s++) {
    const y = ditForward(weights, z, batch, tokens);
    for (let k = 0; k < z.length; k++) z[k] = z[k]! - dt * y[k]!;
  }
  return z;
}

export interface ReferenceOptions extends LoadDitWeightsOptions {
  /** Samples (B). */
  batch: number;
  /** Tokens per sample (T). */
  tokens: number;
  /** Sampler steps (S ≥ 1). */
  steps: number;
  /** Seed of the initial input when `input` is not given. @default 0 */
  seed?: number | bigint;
  /** Initial latent [B, T, C]. @default initialInput(batch, tokens, channels, seed) */
  input?: Float32Array;
}

/** Runs a job of `steps` steps on a (small) model file, in float64; returns z as float32. */
export async function runReference(
  modelPath: string,
  options: ReferenceOptions,
): Promise<Float32Array> {
  const { batch, tokens, steps } = options;
  for (const [label, value] of [
    ["batch", batch],
    ["tokens", tokens],
    ["steps", steps],
  ] as const) {
    if (!Number.isSafeInteger(value) || value <= 0) {
      throw new RangeError(`runReference: ${label} must be a positive integer (got ${value})`);
    }
  }
  const weights = await loadDitWeights(modelPath, options);
  const c = weights.config.channels;
  const input = options.input ?? initialInput(batch, tokens, c, options.seed ?? 0);
  if (input.length !== batch * tokens * c) {
    throw new RangeError(
      `runReference: input has ${input.length} values, expected ${batch}×${tokens}×${c} = ${batch * tokens * c}`,
    );
  }
  return Float32Array.from(runSteps(weights, input, batch, tokens, steps));
}

/**
 * ggml block quantization, bit-exact with ggml's reference quantizers (ggml/src/ggml-quants.c
 * `quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`) and dequantizers (`dequantize_row_q8_0`,
 * `dequantize_row_q4_0`), plus the float element types, so a GGUF written here holds exactly the
 * bytes llama.cpp's `ggml_quantize_chunk` would produce from the same float32 weights, and reads
 * back the values ggml (and Ferry's native kernels) compute with.
 *
 * Block layouts (ggml/src/ggml-common.h), little-endian:
 *   q8_0 (32 elements, 34 bytes): d: f16 | qs: int8[32];       x[j] = qs[j]·d
 *   q4_0 (32 elements, 18 bytes): d: f16 | qs: uint8[16];      x[j] = ((qs[j] & 15) − 8)·d,
 *                                                               x[j+16] = ((qs[j] >> 4) − 8)·d
 * ggml computes in float32: every intermediate below is rounded with Math.fround where C rounds
 * to float, so the rounding matches bit for bit.
 */
import { bf16ToF32, encodeFloats, f16ToF32, f32ToF16, type FloatDtype } from "./half";

/** Elements per q8_0 block (QK8_0). */
export const QK8_0 = 32;
/** Bytes per q8_0 block: f16 scale + 32 int8. */
export const BLOCK_Q8_0_BYTES = 34;
/** Elements per q4_0 block (QK4_0). */
export const QK4_0 = 32;
/** Bytes per q4_0 block: f16 scale + 16 bytes of nibbles. */
export const BLOCK_Q4_0_BYTES = 18;

/** Quantized types Ferry writes and decodes. */
export type QuantType = "q8_0" | "q4_0";
/** ggml element types Ferry writes and computes with (ggml names). */
export type GgmlComputeType = "f32" | "f16" | "bf16" | QuantType;

export const GGML_COMPUTE_TYPES: readonly GgmlComputeType[] = [
  "f32",
  "f16",
  "bf16",
  "q8_0",
  "q4_0",
];

export function isGgmlComputeType(name: string): name is GgmlComputeType {
  return (GGML_COMPUTE_TYPES as readonly string[]).includes(name);
}

const fround = Math.fround;

/** C's roundf: halfway cases away from zero (Math.round rounds them towards +∞). */
function roundf(x: number): number {
  return x < 0 ? -Math.round(-x) : Math.round(x);
}

function checkBlocks(what: string, n: number, block: number): number {
  if (n % block !== 0) {
    throw new RangeError(`${what}: ${n} values is not a whole number of ${block}-element blocks`);
  }
  return n / block;
}

function target(out: Uint8Array | undefined, size: number, what: string): Uint8Array {
  if (!out) return new Uint8Array(size);
  if (out.length < size)
    throw new RangeError(`${what}: output holds ${out.length} bytes, ${size} needed`);
  return out.subarray(0, size);
}

function checkFinite(values: ArrayLike<number>, what: string): void {
  for (let i = 0; i < values.length; i++) {
    if (!Number.isFinite(values[i]!)) {
      // ggml's result for NaN/Inf is undefined behaviour (a float→int8 cast out of range).
      throw new RangeError(`${what}: value ${values[i]} at index ${i} is not finite`);
    }
  }
}

/**
 * q8_0 blocks of float32 `values` (length a multiple of 32), as quantize_row_q8_0_ref:
 * d = amax/127, q = roundf(x·(1/d)); the scale is stored as f16 (round to nearest even).
 * `out` is reused when given. Non-finite input is a RangeError.
 */
export function quantizeQ8_0(values: Float32Array, out?: Uint8Array): Uint8Array {
  const blocks = checkBlocks("quantizeQ8_0", values.length, QK8_0);
  checkFinite(values, "quantizeQ8_0");
  const bytes = target(out, blocks * BLOCK_Q8_0_BYTES, "quantizeQ8_0");
  for (let b = 0; b < blocks; b++) {
    const x = b * QK8_0;
    let amax = 0;
    for (let j = 0; j < QK8_0; j++) amax = Math.max(amax, Math.abs(values[x + j]!));
    const d = fround(amax / 127);
    const id = d !== 0 ? fround(1 / d) : 0;
    const o = b * BLOCK_Q8_0_BYTES;
    const h = f32ToF16(d);
    bytes[o] = h & 0xff;
    bytes[o + 1] = h >>> 8;
    for (let j = 0; j < QK8_0; j++) {
      // |x·id| ≤ 127 (up to float rounding), so the int8 store never wraps.
      bytes[o + 2 + j] = roundf(fround(values[x + j]! * id)) & 0xff;
    }
  }
  return bytes;
}

/**
 * q4_0 blocks of float32 `values` (length a multiple of 32), as quantize_row_q4_0_ref: the
 * element of largest magnitude (the first, on ties) keeps its sign in d = max/−8, so it maps to
 * quant 0 exactly; q = min(15, (int8)(x·(1/d) + 8.5)). Element j goes in the low nibble of byte j
 * and element j+16 in the high nibble. `out` is reused when given. Non-finite input is a RangeError.
 */
export function quantizeQ4_0(values: Float32Array, out?: Uint8Array): Uint8Array {
  const blocks = checkBlocks("quantizeQ4_0", values.length, QK4_0);
  checkFinite(values, "quantizeQ4_0");
  const bytes = target(out, blocks * BLOCK_Q4_0_BYTES, "quantizeQ4_0");
  const half = QK4_0 / 2;
  for (let b = 0; b < blocks; b++) {
    const x = b * QK4_0;
    let amax = 0;
    let max = 0;
    for (let j = 0; j < QK4_0; j++) {
      const v = values[x + j]!;
      if (amax < Math.abs(v)) {
        amax = Math.abs(v);
        max = v;
      }
    }
    const d = fround(max / -8);
    const id = d !== 0 ? fround(1 / d) : 0;
    const o = b * BLOCK_Q4_0_BYTES;
    const h = f32ToF16(d);
    bytes[o] = h & 0xff;
    bytes[o + 1] = h >>> 8;
    for (let j = 0; j < half; j++) {
      // x·id ∈ [−8, 8] up to rounding, so x·id + 8.5 ∈ (0, 16.5]: the C truncation to int8 is
      // Math.trunc here and never negative; MIN(15, ·) folds the +8 end into the top quant.
      const x0 = fround(values[x + j]! * id);
      const x1 = fround(values[x + half + j]! * id);
      const q0 = Math.min(15, Math.max(0, Math.trunc(fround(x0 + 8.5))));
      const q1 = Math.min(15, Math.max(0, Math.trunc(fround(x1 + 8.5))));
      bytes[o + 2 + j] = q0 | (q1 << 4);
    }
  }
  return bytes;
}

/** Float32 values of q8_0 blocks, as dequantize_row_q8_0 (x = q·d in float32). */
export function dequantizeQ8_0(bytes: Uint8Array, out?: Float32Array): Float32Array {
  const blocks = checkBlocks("dequantizeQ8_0", bytes.length, BLOCK_Q8_0_BYTES);
  const values = out ?? new Float32Array(blocks * QK8_0);
  if (values.length < blocks * QK8_0) throw new RangeError(`dequantizeQ8_0: output too small`);
  for (let b = 0; b < blocks; b++) {
    const o = b * BLOCK_Q8_0_BYTES;
    const d = f16ToF32(bytes[o]! | (bytes[o + 1]! << 8));
    for (let j = 0; j < QK8_0; j++) {
      const q = (bytes[o + 2 + j]! << 24) >> 24; // int8
      values[b * QK8_0 + j] = q * d; // the store rounds to float32, as the C product does
    }
  }
  return values;
}

/** Float32 values of q4_0 blocks, as dequantize_row_q4_0 (x = (nibble − 8)·d in float32). */
export function dequantizeQ4_0(bytes: Uint8Array, out?: Float32Array): Float32Array {
  const blocks = checkBlocks("dequantizeQ4_0", bytes.length, BLOCK_Q4_0_BYTES);
  const values = out ?? new Float32Array(blocks * QK4_0);
  if (values.length < blocks * QK4_0) throw new RangeError(`dequantizeQ4_0: output too small`);
  const half = QK4_0 / 2;
  for (let b = 0; b < blocks; b++) {
    const o = b * BLOCK_Q4_0_BYTES;
    const d = f16ToF32(bytes[o]! | (bytes[o + 1]! << 8));
    for (let j = 0; j < half; j++) {
      const q = bytes[o + 2 + j]!;
      values[b * QK4_0 + j] = ((q & 0x0f) - 8) * d;
      values[b * QK4_0 + half + j] = ((q >>> 4) - 8) * d;
    }
  }
  return values;
}

const FLOAT_OF: Record<"f32" | "f16" | "bf16", FloatDtype> = {
  f32: "F32",
  f16: "F16",
  bf16: "BF16",
};

/** Bytes of `count` elements of `type` (count a whole number of blocks for quantized types). */
export function encodedBytes(type: GgmlComputeType, count: number): number {
  switch (type) {
    case "f32":
      return count * 4;
    case "f16":
    case "bf16":
      return count * 2;
    case "q8_0":
      return checkBlocks("q8_0", count, QK8_0) * BLOCK_Q8_0_BYTES;
    case "q4_0":
      return checkBlocks("q4_0", count, QK4_0) * BLOCK_Q4_0_BYTES;
  }
}

/**
 * float32 values → little-endian bytes of `type`, as ggml stores them. `out` is reused when given
 * (a streaming writer allocates nothing per chunk). Returns the filled prefix of `out`.
 */
export function encodeGgml(
  values: Float32Array,
  type: GgmlComputeType,
  out?: Uint8Array,
): Uint8Array {
  switch (type) {
    case "q8_0":
      return quantizeQ8_0(values, out);
    case "q4_0":
      return quantizeQ4_0(values, out);
    default:
      return encodeFloats(values, FLOAT_OF[type], out);
  }
}

/** Little-endian bytes of `type` → float32 values (the values ggml computes with). */
export function decodeGgml(type: GgmlComputeType, bytes: Uint8Array): Float32Array {
  switch (type) {
    case "q8_0":
      return dequantizeQ8_0(bytes);
    case "q4_0":
      return dequantizeQ4_0(bytes);
    case "f32": {
      checkBlocks("f32", bytes.length, 4);
      // Copy first: the bytes may not be 4-byte aligned in their buffer.
      return new Float32Array(bytes.slice().buffer);
    }
    case "f16":
    case "bf16": {
      checkBlocks(type, bytes.length, 2);
      const n = bytes.length / 2;
      const out = new Float32Array(n);
      const convert = type === "f16" ? f16ToF32 : bf16ToF32;
      for (let i = 0; i < n; i++) out[i] = convert(bytes[2 * i]! | (bytes[2 * i + 1]! << 8));
      return out;
    }
  }
}

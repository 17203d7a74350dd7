/**
 * IEEE 754 binary16 ("f16") and bfloat16 ("bf16") ↔ float32 conversion.
 *
 * Narrowing rounds to nearest, ties to even — the same rule as the native layer
 * (native/include/ferry/dtype.h) and PyTorch's `.half()` / `.bfloat16()` — so a model written by
 * `ferry gen-model` holds exactly the bits those would produce from the same float32 weights.
 * NaN narrows to a quiet NaN of the same sign; values too large become ±Infinity.
 */

// One scratch word reinterpreted both ways, to read a float32's bits without allocating.
const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);

/** The bits of `value` rounded to float32. */
export function f32Bits(value: number): number {
  scratchF32[0] = value;
  return scratchU32[0]!;
}

/** The float32 whose bits are `bits` (as a JS number). */
export function f32FromBits(bits: number): number {
  scratchU32[0] = bits >>> 0;
  return scratchF32[0]!;
}

/** float32 bits → binary16 bits, round to nearest even. */
export function f32BitsToF16(bits: number): number {
  const sign = (bits >>> 16) & 0x8000;
  const exponent = (bits >>> 23) & 0xff;
  const mantissa = bits & 0x7fffff;
  if (exponent === 0xff) {
    // Infinity keeps its sign; any NaN becomes the canonical quiet NaN with the same sign.
    return mantissa === 0 ? sign | 0x7c00 : sign | 0x7e00;
  }
  // Re-bias: float32 bias 127, binary16 bias 15.
  const e = exponent - 112;
  if (e >= 0x1f) return sign | 0x7c00; // beyond the largest finite half even before rounding
  if (e <= 0) {
    // Result is a half subnormal (or zero). Half subnormals count units of 2^-24, and the
    // float's value is (1.mantissa)·2^(exponent-127) = M·2^(e-14-24) with the implicit bit in M,
    // so the unit count is M >> (14 - e). Below e = -10 even the largest M (< 2^24) is under
    // half a unit, so the result is ±0 (float32 subnormals land here too).
    if (e < -10) return sign;
    const m = mantissa | 0x800000;
    const shift = 14 - e; // 14..24
    let half = m >>> shift;
    const rest = m & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (rest > halfway || (rest === halfway && (half & 1) !== 0)) half += 1; // may become 0x400, the smallest normal: correct
    return sign | half;
  }
  let half = (e << 10) | (mantissa >>> 13);
  const rest = mantissa & 0x1fff;
  // A carry out of the mantissa bumps the exponent, and from the top exponent gives 0x7c00 (∞).
  if (rest > 0x1000 || (rest === 0x1000 && (half & 1) !== 0)) half += 1;
  return sign | half;
}

/** A number → binary16 bits (via float32, as the weights are float32 first). */
export function f32ToF16(value: number): number {
  return f32BitsToF16(f32Bits(value));
}

/** binary16 bits → its exact value. */
export function f16ToF32(h: number): number {
  const sign = (h & 0x8000) !== 0 ? -1 : 1;
  const exponent = (h >>> 10) & 0x1f;
  const mantissa = h & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  if (exponent === 0x1f) return mantissa === 0 ? sign * Infinity : NaN;
  return sign * (1024 + mantissa) * 2 ** (exponent - 25);
}

/** float32 bits → bfloat16 bits, round to nearest even. */
export function f32BitsToBf16(bits: number): number {
  bits >>>= 0;
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x7fffff) !== 0) {
    // NaN: truncation could clear every mantissa bit that is left and make it ∞; force quiet.
    return ((bits >>> 16) | 0x40) & 0xffff;
  }
  // Adding 0x7fff plus the lowest kept bit rounds ties to even; a carry into the exponent is the
  // correct rounding (up to ∞ from the largest finite values). Finite inputs stay below 2^32.
  const lsb = (bits >>> 16) & 1;
  return ((bits + 0x7fff + lsb) / 0x10000) & 0xffff;
}

/** A number → bfloat16 bits (via float32). */
export function f32ToBf16(value: number): number {
  return f32BitsToBf16(f32Bits(value));
}

/** bfloat16 bits → its exact value. */
export function bf16ToF32(b: number): number {
  return f32FromBits((b & 0xffff) << 16);
}

/** Float element types Ferry writes and computes with. */
export type FloatDtype = "F32" | "F16" | "BF16";

/** Bytes per element of each float type. */
export const FLOAT_DTYPE_BYTES: Readonly<Record<FloatDtype, number>> = { F32: 4, F16: 2, BF16: 2 };

/**
 * Encodes float32 values as little-endian bytes of `dtype`. `out` (at least
 * `values.length · bytes per element` long) is reused when given, so a caller streaming a large
 * tensor chunk by chunk allocates nothing per chunk. Returns the filled prefix of `out`.
 */
export function encodeFloats(
  values: Float32Array,
  dtype: FloatDtype,
  out?: Uint8Array,
): Uint8Array {
  const n = values.length;
  const size = n * FLOAT_DTYPE_BYTES[dtype];
  const target = out ?? new Uint8Array(size);
  if (target.length < size) {
    throw new RangeError(`encodeFloats: output holds ${target.length} bytes, ${size} needed`);
  }
  if (dtype === "F32") {
    // Byte copy of the float32 bits; little-endian on every platform Node supports.
    target.set(new Uint8Array(values.buffer, values.byteOffset, size));
    return target.subarray(0, size);
  }
  const bits = new Uint32Array(values.buffer, values.byteOffset, n);
  const convert = dtype === "F16" ? f32BitsToF16 : f32BitsToBf16;
  for (let i = 0, o = 0; i < n; i++, o += 2) {
    const h = convert(bits[i]!);
    target[o] = h & 0xff;
    target[o + 1] = h >>> 8;
  }
  return target.subarray(0, size);
}

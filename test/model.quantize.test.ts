import { describe, expect, it } from "vitest";
import { f16ToF32, f32ToF16 } from "../lib/model/half";
import {
  decodeGgml,
  dequantizeQ4_0,
  dequantizeQ8_0,
  encodedBytes,
  encodeGgml,
  quantizeQ4_0,
  quantizeQ8_0,
} from "../lib/model/quantize";

/** A deterministic pseudo-random float32 block source (xorshift32). */
function randomValues(n: number, seed: number, scale: number): Float32Array {
  let s = seed >>> 0 || 1;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    out[i] = ((s / 2 ** 32) * 2 - 1) * scale;
  }
  return out;
}

const scaleOf = (bytes: Uint8Array, block: number, size: number) =>
  f16ToF32(bytes[block * size]! | (bytes[block * size + 1]! << 8));

describe("q8_0 (ggml quantize_row_q8_0_ref / dequantize_row_q8_0)", () => {
  it("lays a block out as f16 d = amax/127, then 32 int8 round(x/d)", () => {
    // amax 63.5 → d = 0.5 exactly, so every quant is exact: q = 2x = j − 16.
    const x = new Float32Array(32);
    for (let j = 0; j < 32; j++) x[j] = (j - 16) * 0.5;
    x[31] = 63.5;
    const q = quantizeQ8_0(x);
    expect(q.length).toBe(34);
    expect(q[0] | (q[1]! << 8)).toBe(0x3800); // 0.5 as f16
    const int8 = new Int8Array(q.buffer, 2, 32);
    expect(Array.from(int8.slice(0, 31))).toEqual(Array.from({ length: 31 }, (_, j) => j - 16));
    expect(int8[31]).toBe(127);
    expect(Array.from(dequantizeQ8_0(q))).toEqual(Array.from(x));
  });

  it("rounds halfway cases away from zero, as C's roundf", () => {
    const x = new Float32Array(32);
    x[0] = 63.5; // d = 0.5
    x[1] = 1.25; // 2.5 → 3
    x[2] = -1.25; // −2.5 → −3 (Math.round would give −2)
    x[3] = 0.25; // 0.5 → 1
    x[4] = -0.25; // −0.5 → −1
    const int8 = new Int8Array(quantizeQ8_0(x).buffer, 2, 32);
    expect(Array.from(int8.slice(0, 5))).toEqual([127, 3, -3, 1, -1]);
  });

  it("quantizes with the float32 scale and stores it rounded to f16", () => {
    const x = new Float32Array(32).fill(0.001);
    x[0] = 1; // d = 1/127, not representable in f16
    const q = quantizeQ8_0(x);
    const d = Math.fround(1 / 127);
    expect(q[0]! | (q[1]! << 8)).toBe(f32ToF16(d));
    const int8 = new Int8Array(q.buffer, 2, 32);
    // 0.001·(1/d) = 0.127 → 0; and x[0]·(1/d) = 127
    expect(int8[0]).toBe(127);
    expect(int8[1]).toBe(0);
  });

  it("keeps an all-zero block zero", () => {
    const q = quantizeQ8_0(new Float32Array(64));
    expect(Array.from(q)).toEqual(new Array(68).fill(0));
    expect(Array.from(dequantizeQ8_0(q))).toEqual(new Array(64).fill(0));
  });

  it("dequantizes within half a step of the input", () => {
    const x = randomValues(32 * 64, 7, 3);
    const q = quantizeQ8_0(x);
    const y = dequantizeQ8_0(q);
    for (let b = 0; b < 64; b++) {
      const d = scaleOf(q, b, 34);
      for (let j = 0; j < 32; j++) {
        const i = b * 32 + j;
        // half a step, plus the f16 rounding of d times the largest quant
        expect(Math.abs(y[i]! - x[i]!)).toBeLessThanOrEqual(d / 2 + 127 * d * 2 ** -11 + 1e-7);
      }
    }
  });
});

describe("q4_0 (ggml quantize_row_q4_0_ref / dequantize_row_q4_0)", () => {
  it("uses the signed max: d = max/−8, q = min(15, trunc(x/d + 8.5)), j low / j+16 high nibble", () => {
    const x = new Float32Array(32);
    x[0] = -8; // the max magnitude, negative → d = 1
    x[1] = 7; // 15.5 → 15
    x[2] = -0.5; // 8.0 → 8
    x[3] = 0.49; // 8.99 → 8
    x[4] = -0.51; // 7.99 → 7
    x[16] = 3; // 11.5 → 11, high nibble of byte 0
    x[17] = -3; // 5.5 → 5, high nibble of byte 1
    const q = quantizeQ4_0(x);
    expect(q.length).toBe(18);
    expect(q[0]! | (q[1]! << 8)).toBe(0x3c00); // d = 1.0
    expect(q[2]).toBe(0 | (11 << 4));
    expect(q[3]).toBe(15 | (5 << 4));
    expect(q[4]).toBe(8 | (8 << 4));
    expect(q[5]).toBe(8 | (8 << 4));
    expect(q[6]).toBe(7 | (8 << 4));
    const y = dequantizeQ4_0(q);
    expect(Array.from(y.slice(0, 5))).toEqual([-8, 7, 0, 0, -1]);
    expect([y[16], y[17]]).toEqual([3, -3]);
  });

  it("maps a positive max to quant 0 and clamps its negative mirror to 15", () => {
    const x = new Float32Array(32);
    x[0] = 8; // d = −1
    x[1] = -8; // 16.5 → 16 → clamped to 15 → dequantizes to −7
    const q = quantizeQ4_0(x);
    expect(f16ToF32(q[0]! | (q[1]! << 8))).toBe(-1);
    expect(q[2]! & 0x0f).toBe(0);
    expect(q[3]! & 0x0f).toBe(15);
    const y = dequantizeQ4_0(q);
    expect([y[0], y[1]]).toEqual([8, -7]);
  });

  it("takes the first element of largest magnitude on ties", () => {
    const x = new Float32Array(32);
    x[5] = -4;
    x[9] = 4;
    const q = quantizeQ4_0(x);
    expect(f16ToF32(q[0]! | (q[1]! << 8))).toBe(0.5); // −4 / −8
    const flipped = new Float32Array(32);
    flipped[5] = 4;
    flipped[9] = -4;
    expect(f16ToF32(quantizeQ4_0(flipped)[0]! | (quantizeQ4_0(flipped)[1]! << 8))).toBe(-0.5);
  });

  it("stores an all-zero block as d = −0 and quants 8", () => {
    const q = quantizeQ4_0(new Float32Array(32));
    // 0.0f / −8 is −0.0f in C too, so ggml writes the f16 bits 0x8000.
    expect(Array.from(q)).toEqual([0x00, 0x80, ...new Array(16).fill(0x88)]);
    expect(dequantizeQ4_0(q).every((v) => v === 0)).toBe(true);
  });

  it("dequantizes within a step of the input", () => {
    const x = randomValues(32 * 64, 11, 2);
    const q = quantizeQ4_0(x);
    const y = dequantizeQ4_0(q);
    for (let b = 0; b < 64; b++) {
      const d = Math.abs(scaleOf(q, b, 18));
      for (let j = 0; j < 32; j++) {
        const i = b * 32 + j;
        expect(Math.abs(y[i]! - x[i]!)).toBeLessThanOrEqual(d * (1 + 8 * 2 ** -10) + 1e-7);
      }
    }
  });
});

describe("encodeGgml / decodeGgml", () => {
  it("round-trips the float types and reuses the output buffer", () => {
    const x = Float32Array.from([1, -2.5, 3.140625, 65504, -0]);
    const out = new Uint8Array(64);
    expect(Array.from(decodeGgml("f32", encodeGgml(x, "f32", out)))).toEqual(Array.from(x));
    expect(Array.from(decodeGgml("f16", encodeGgml(x, "f16")))).toEqual(Array.from(x));
    expect(Array.from(decodeGgml("bf16", encodeGgml(x, "bf16")))).toEqual([
      1, -2.5, 3.140625, 65536, -0,
    ]);
    const encoded = encodeGgml(new Float32Array(32).fill(1), "q8_0", out);
    expect(encoded.buffer).toBe(out.buffer);
    expect(encoded.length).toBe(34);
  });

  it("decodes bytes that are not aligned in their buffer", () => {
    const bytes = new Uint8Array(9);
    new DataView(bytes.buffer).setFloat32(1, 1.5, true);
    new DataView(bytes.buffer).setFloat32(5, -2, true);
    expect(Array.from(decodeGgml("f32", bytes.subarray(1)))).toEqual([1.5, -2]);
  });

  it("sizes and validates", () => {
    expect(encodedBytes("q8_0", 64)).toBe(68);
    expect(encodedBytes("q4_0", 64)).toBe(36);
    expect(encodedBytes("bf16", 3)).toBe(6);
    expect(() => encodedBytes("q4_0", 33)).toThrow(
      "33 values is not a whole number of 32-element blocks",
    );
    expect(() => quantizeQ8_0(new Float32Array(31))).toThrow(RangeError);
    expect(() => dequantizeQ4_0(new Uint8Array(17))).toThrow(RangeError);
    const nan = new Float32Array(32);
    nan[3] = NaN;
    expect(() => quantizeQ4_0(nan)).toThrow("value NaN at index 3 is not finite");
    expect(() => quantizeQ8_0(new Float32Array(32).fill(Infinity))).toThrow(/not finite/);
    expect(() => quantizeQ8_0(new Float32Array(32), new Uint8Array(10))).toThrow(/34 needed/);
  });
});

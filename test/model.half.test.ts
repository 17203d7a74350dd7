import { describe, expect, it } from "vitest";
import {
  bf16ToF32,
  encodeFloats,
  f16ToF32,
  f32Bits,
  f32BitsToBf16,
  f32BitsToF16,
  f32FromBits,
  f32ToBf16,
  f32ToF16,
} from "../lib/model/half";

/** Independent RNE narrowing: the representable neighbours of x, pick the nearer / even one. */
function nearestEven(x: number, candidates: [number, number][]): number {
  // candidates: [bits, value] sorted by value, bracketing x
  let best = candidates[0]!;
  for (const c of candidates) {
    const dc = Math.abs(c[1] - x);
    const db = Math.abs(best[1] - x);
    if (dc < db || (dc === db && (c[0] & 1) === 0)) best = c;
  }
  return best[0];
}

describe("f16", () => {
  it("round-trips every finite binary16 exactly", () => {
    for (let h = 0; h < 0x10000; h++) {
      const v = f16ToF32(h);
      if (Number.isNaN(v)) {
        expect((h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0).toBe(true);
        expect(Number.isNaN(f16ToF32(f32ToF16(v)))).toBe(true);
        continue;
      }
      expect(f32ToF16(v)).toBe(h);
    }
  });

  it("decodes known values", () => {
    expect(f16ToF32(0x3c00)).toBe(1);
    expect(f16ToF32(0xc000)).toBe(-2);
    expect(f16ToF32(0x7bff)).toBe(65504);
    expect(f16ToF32(0x0001)).toBe(2 ** -24);
    expect(f16ToF32(0x0400)).toBe(2 ** -14);
    expect(f16ToF32(0x7c00)).toBe(Infinity);
    expect(f16ToF32(0xfc00)).toBe(-Infinity);
    expect(Object.is(f16ToF32(0x8000), -0)).toBe(true);
  });

  it("rounds to nearest, ties to even", () => {
    // 1 + 2^-11 is exactly halfway between 1 (even) and 1 + 2^-10 (odd): goes to 1.
    expect(f32ToF16(1 + 2 ** -11)).toBe(0x3c00);
    // 1 + 3·2^-11 is halfway between 1+2^-10 (odd) and 1+2^-9 (even): goes up.
    expect(f32ToF16(1 + 3 * 2 ** -11)).toBe(0x3c02);
    // Just above the tie rounds up.
    expect(f32ToF16(1 + 2 ** -11 + 2 ** -20)).toBe(0x3c01);
    // Overflow: 65520 is the tie between 65504 and 65536 (∞) → even mantissa is ∞.
    expect(f32ToF16(65519)).toBe(0x7bff);
    expect(f32ToF16(65520)).toBe(0x7c00);
    expect(f32ToF16(-1e6)).toBe(0xfc00);
    // Subnormals: half of the smallest subnormal is a tie → 0; just above → smallest.
    expect(f32ToF16(2 ** -25)).toBe(0x0000);
    expect(f32ToF16(2 ** -25 + 2 ** -40)).toBe(0x0001);
    expect(f32ToF16(3 * 2 ** -25)).toBe(0x0002); // 1.5 units → 2 (even)
    expect(f32ToF16(-(2 ** -30))).toBe(0x8000);
    // Largest subnormal + rounding carries into the smallest normal.
    expect(f32ToF16(2 ** -14 - 2 ** -26)).toBe(0x0400);
    expect(f32ToF16(NaN) & 0x7e00).toBe(0x7e00);
  });

  it("matches brute-force nearest-even on random float32s", () => {
    let state = 12345;
    for (let n = 0; n < 20000; n++) {
      state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
      // Exponents that land in half's normal and subnormal ranges.
      const bits = ((state & 0x807fffff) | ((((state >>> 23) % 40) + 95) << 23)) >>> 0;
      const x = f32FromBits(bits);
      const h = f32BitsToF16(bits);
      const lo = h & 0x7fff;
      const sign = h & 0x8000;
      const neighbours: [number, number][] = [lo - 1, lo, lo + 1]
        .filter((v) => v >= 0 && v <= 0x7c00)
        .map((v) => [sign | v, f16ToF32(sign | v)]);
      expect(h).toBe(nearestEven(x, neighbours));
    }
  });
});

describe("bf16", () => {
  it("round-trips every finite bfloat16 exactly", () => {
    for (let b = 0; b < 0x10000; b++) {
      const v = bf16ToF32(b);
      if (Number.isNaN(v)) continue;
      expect(f32ToBf16(v)).toBe(b);
    }
  });

  it("rounds to nearest, ties to even, and keeps NaN a NaN", () => {
    expect(f32ToBf16(1)).toBe(0x3f80);
    expect(bf16ToF32(0xc040)).toBe(-3);
    // 1 + 2^-8 is halfway between 1 (even) and 1 + 2^-7: stays 1.
    expect(f32ToBf16(1 + 2 ** -8)).toBe(0x3f80);
    // 1 + 3·2^-8: between 1+2^-7 (odd) and 1+2^-6 (even): up.
    expect(f32ToBf16(1 + 3 * 2 ** -8)).toBe(0x3f82);
    expect(f32ToBf16(1 + 2 ** -8 + 2 ** -20)).toBe(0x3f81);
    // Largest finite float32 rounds to ∞.
    expect(f32ToBf16(f32FromBits(0x7f7fffff))).toBe(0x7f80);
    // A NaN whose payload is only in the low 16 bits must not become ∞.
    expect(f32BitsToBf16(0x7f800001)).toBe(0x7fc0);
    expect(f32BitsToBf16(0xff800001)).toBe(0xffc0);
    expect(f32ToBf16(-Infinity)).toBe(0xff80);
  });
});

describe("encodeFloats", () => {
  const values = Float32Array.from([-3, -2, -1, 0, 1, 2, 0.1]);

  it("writes little-endian float32 bytes", () => {
    const bytes = encodeFloats(values, "F32");
    const view = new DataView(bytes.buffer, bytes.byteOffset);
    expect(bytes.length).toBe(28);
    expect(view.getUint32(24, true)).toBe(f32Bits(0.1));
  });

  it("writes f16 and bf16 bits, reusing the output buffer", () => {
    const out = new Uint8Array(64).fill(0xaa);
    const f16 = encodeFloats(values, "F16", out);
    expect(f16.buffer).toBe(out.buffer);
    expect(f16.length).toBe(14);
    const v16 = new DataView(f16.buffer, f16.byteOffset);
    expect([0, 1, 2, 3, 4, 5, 6].map((i) => v16.getUint16(2 * i, true))).toEqual([
      0xc200, 0xc000, 0xbc00, 0x0000, 0x3c00, 0x4000, 0x2e66,
    ]);
    const bf = encodeFloats(values, "BF16");
    const vb = new DataView(bf.buffer, bf.byteOffset);
    // 0.1f = 0x3DCCCCCD → bf16 0x3DCD (rounded up)
    expect(vb.getUint16(12, true)).toBe(0x3dcd);
    expect(vb.getUint16(0, true)).toBe(0xc040);
  });

  it("refuses an output buffer that is too small", () => {
    expect(() => encodeFloats(values, "F16", new Uint8Array(10))).toThrow(/14 needed/);
  });
});

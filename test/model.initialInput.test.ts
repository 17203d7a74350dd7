import { describe, expect, it } from "vitest";
import {
  fillUniform,
  fromU64,
  initialInput,
  splitmix64,
  splitmix64Fast,
  toU64,
} from "../lib/model/initialInput";

const MASK = (1n << 64n) - 1n;

/** The definition, spelled out independently of the module. */
function bigIntElement(seed: bigint, i: number): number {
  const r = splitmix64((seed + BigInt(i)) & MASK);
  return (Number(r >> 40n) / 2 ** 24) * 2 - 1;
}

describe("splitmix64", () => {
  it("matches the published SplitMix64 sequence", () => {
    // Vigna's splitmix64.c seeded with 0: state += γ, output mix(state) — i.e. splitmix64(k·γ).
    const gamma = 0x9e3779b97f4a7c15n;
    const expected = [0xe220a8397b1dcdafn, 0x6e789e6aa1b965f4n, 0x06c45d188009454fn];
    expected.forEach((value, k) => expect(splitmix64((BigInt(k) * gamma) & MASK)).toBe(value));
  });

  it("32-bit-halves version equals the BigInt definition", () => {
    const inputs = [0n, 1n, 2n, MASK, MASK - 1n, 0xffffffffn, 0x100000000n, 0x8000000000000000n];
    let x = 0x0123456789abcdefn;
    for (let n = 0; n < 2000; n++) {
      x = splitmix64(x);
      inputs.push(x);
    }
    for (const v of inputs) expect(fromU64(splitmix64Fast(toU64(v)))).toBe(splitmix64(v));
  });
});

describe("initialInput", () => {
  it("element i is ((splitmix64(seed + i) >> 40) / 2^24)·2 − 1, row-major", () => {
    for (const seed of [0n, 7n, 123456789n, MASK - 3n]) {
      const z = initialInput(2, 3, 5, seed);
      expect(z.length).toBe(30);
      for (let i = 0; i < z.length; i++) expect(z[i]).toBe(bigIntElement(seed, i));
    }
  });

  it("carries across the 32-bit boundary of the counter", () => {
    const seed = 0xfffffffen; // elements cross lo = 0xffffffff → hi + 1
    const z = initialInput(1, 1, 6, seed);
    for (let i = 0; i < 6; i++) expect(z[i]).toBe(bigIntElement(seed, i));
  });

  it("defaults to seed 0, accepts number seeds, stays in [-1, 1) with mean ≈ 0", () => {
    const z = initialInput(4, 64, 16);
    expect(Array.from(initialInput(4, 64, 16, 0))).toEqual(Array.from(z));
    let sum = 0;
    for (const v of z) {
      expect(v).toBeGreaterThanOrEqual(-1);
      expect(v).toBeLessThan(1);
      sum += v;
    }
    expect(Math.abs(sum / z.length)).toBeLessThan(0.05);
    expect(Array.from(initialInput(1, 1, 8, 1)).slice(0, 7)).toEqual(Array.from(z).slice(1, 8));
  });

  it("fillUniform over a slice equals the same slice of the whole", () => {
    const whole = initialInput(1, 10, 10, 42);
    const part = new Float64Array(20);
    fillUniform(part, toU64(42n + 37n));
    expect(Array.from(part)).toEqual(Array.from(whole.subarray(37, 57)));
  });

  it("rejects bad shapes and seeds", () => {
    expect(() => initialInput(0, 1, 1)).toThrow(/batch must be a positive integer/);
    expect(() => initialInput(1, 1.5, 1)).toThrow(/tokens/);
    expect(() => initialInput(1, 1, 1, -1)).toThrow(/seed/);
    expect(() => initialInput(1, 1, 1, 1n << 64n)).toThrow(/seed/);
  });
});

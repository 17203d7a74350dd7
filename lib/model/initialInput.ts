/**
 * SplitMix64 and the job's initial latent.
 *
 * The initial input is defined element by element from a counter (`splitmix64(seed + i)`), not
 * from a sequential generator, so any executor can produce any slice of it (a batch split across
 * GPUs) without generating what comes before, and the native layer and this file agree bit for
 * bit. `splitmix64` is the exact BigInt definition; the hot paths use 32-bit halves and are
 * tested against it.
 */

const MASK64 = (1n << 64n) - 1n;
const GAMMA = 0x9e3779b97f4a7c15n;

/** SplitMix64's finaliser of `x + γ`, all mod 2^64 (Steele, Lea & Flood; Vigna's constants). */
export function splitmix64(x: bigint): bigint {
  let z = (x + GAMMA) & MASK64;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64;
  return z ^ (z >> 31n);
}

/** A 64-bit unsigned value as two unsigned 32-bit halves. */
export interface U64 {
  hi: number;
  lo: number;
}

/** Splits a bigint (taken mod 2^64) into halves. */
export function toU64(x: bigint): U64 {
  const v = BigInt.asUintN(64, x);
  return { hi: Number(v >> 32n), lo: Number(v & 0xffffffffn) };
}

/** Joins halves into a bigint. */
export function fromU64(v: U64): bigint {
  return (BigInt(v.hi >>> 0) << 32n) | BigInt(v.lo >>> 0);
}

// Results of the 32-bit-halves arithmetic below, kept in module state so the per-element loops
// allocate nothing (a 1 GB model is 250 M calls).
let outHi = 0;
let outLo = 0;

/** (ah:al)·(bh:bl) mod 2^64 into outHi:outLo. The low 32×32 product is done in 16-bit limbs so
 * every partial sum stays an exact double. */
function mul64(ah: number, al: number, bh: number, bl: number): void {
  const a0 = al & 0xffff;
  const a1 = al >>> 16;
  const b0 = bl & 0xffff;
  const b1 = bl >>> 16;
  const mid = a1 * b0 + a0 * b1; // < 2^33
  const low = a0 * b0 + (mid % 0x10000) * 0x10000; // < 2^33
  const carry = Math.floor(low / 0x100000000);
  outLo = low >>> 0;
  outHi =
    (a1 * b1 + Math.floor(mid / 0x10000) + carry + Math.imul(ah, bl) + Math.imul(al, bh)) >>> 0;
}

/** `splitmix64` on halves; the result is left in outHi:outLo. */
function splitmix64Halves(hi: number, lo: number): void {
  // z = x + γ
  let zl = lo + 0x7f4a7c15;
  let zh = (hi + 0x9e3779b9 + (zl > 0xffffffff ? 1 : 0)) >>> 0;
  zl >>>= 0;
  // z ^= z >> 30; z *= 0xBF58476D1CE4E5B9
  zl = (zl ^ ((zl >>> 30) | (zh << 2))) >>> 0;
  zh = (zh ^ (zh >>> 30)) >>> 0;
  mul64(zh, zl, 0xbf58476d, 0x1ce4e5b9);
  zh = outHi;
  zl = outLo;
  // z ^= z >> 27; z *= 0x94D049BB133111EB
  zl = (zl ^ ((zl >>> 27) | (zh << 5))) >>> 0;
  zh = (zh ^ (zh >>> 27)) >>> 0;
  mul64(zh, zl, 0x94d049bb, 0x133111eb);
  zh = outHi;
  zl = outLo;
  // z ^= z >> 31
  outLo = (zl ^ ((zl >>> 31) | (zh << 1))) >>> 0;
  outHi = (zh ^ (zh >>> 31)) >>> 0;
}

/** `splitmix64` computed on 32-bit halves (no BigInt); same result. */
export function splitmix64Fast(x: U64): U64 {
  splitmix64Halves(x.hi >>> 0, x.lo >>> 0);
  return { hi: outHi, lo: outLo };
}

/**
 * Fills `out[k]` with the uniform value in [-1, 1) of counter `start + k` (mod 2^64):
 * `((splitmix64(start + k) >> 40) / 2^24)·2 − 1`. The top 24 bits make a value float32 holds
 * exactly, so the result is the same whether stored as float32 or float64.
 *
 * This is the generator's hot loop (one call per weight), so splitmix64 is inlined on local
 * 32-bit halves: the low 32×32→64 products use 16-bit limbs, whose partial products and sums
 * stay below 2^32 and so remain exact unsigned integers.
 */
export function fillUniform(out: Float32Array | Float64Array, start: U64): void {
  let hi = start.hi >>> 0;
  let lo = start.lo >>> 0;
  const n = out.length;
  for (let k = 0; k < n; k++) {
    // z = x + γ
    let zl = lo + 0x7f4a7c15;
    let zh = (hi + 0x9e3779b9 + (zl > 0xffffffff ? 1 : 0)) >>> 0;
    zl >>>= 0;
    // z ^= z >> 30
    zl = (zl ^ ((zl >>> 30) | (zh << 2))) >>> 0;
    zh = (zh ^ (zh >>> 30)) >>> 0;
    // z *= 0xBF58476D_1CE4E5B9
    {
      const a0 = zl & 0xffff;
      const a1 = zl >>> 16;
      const p00 = a0 * 0xe5b9;
      const p01 = a0 * 0x1ce4;
      const p10 = a1 * 0xe5b9;
      const mid = (p00 >>> 16) + (p01 & 0xffff) + (p10 & 0xffff);
      const h =
        a1 * 0x1ce4 +
        (p01 >>> 16) +
        (p10 >>> 16) +
        (mid >>> 16) +
        Math.imul(zh, 0x1ce4e5b9) +
        Math.imul(zl, 0xbf58476d);
      zl = Math.imul(zl, 0x1ce4e5b9) >>> 0;
      zh = h >>> 0;
    }
    // z ^= z >> 27
    zl = (zl ^ ((zl >>> 27) | (zh << 5))) >>> 0;
    zh = (zh ^ (zh >>> 27)) >>> 0;
    // z *= 0x94D049BB_133111EB; only the high half is needed from here on
    {
      const a0 = zl & 0xffff;
      const a1 = zl >>> 16;
      const p00 = a0 * 0x11eb;
      const p01 = a0 * 0x1331;
      const p10 = a1 * 0x11eb;
      const mid = (p00 >>> 16) + (p01 & 0xffff) + (p10 & 0xffff);
      zh =
        (a1 * 0x1331 +
          (p01 >>> 16) +
          (p10 >>> 16) +
          (mid >>> 16) +
          Math.imul(zh, 0x133111eb) +
          Math.imul(zl, 0x94d049bb)) >>>
        0;
    }
    // z ^= z >> 31 leaves the top 24 bits as (zh ^ (zh >>> 31)) >>> 8
    out[k] = (((zh ^ (zh >>> 31)) >>> 8) / 0x1000000) * 2 - 1;
    lo = (lo + 1) >>> 0;
    if (lo === 0) hi = (hi + 1) >>> 0;
  }
}

/** Parses a seed given as a number or bigint, rejecting what is not an integer in [0, 2^64). */
export function normalizeSeed(seed: number | bigint): bigint {
  if (typeof seed === "number") {
    if (!Number.isSafeInteger(seed) || seed < 0) {
      throw new RangeError(`seed must be a non-negative integer (got ${seed})`);
    }
    return BigInt(seed);
  }
  if (seed < 0n || seed > MASK64) {
    throw new RangeError(`seed must be in [0, 2^64) (got ${seed})`);
  }
  return seed;
}

/**
 * The job's initial latent `z` of shape [batch, tokens, channels], row-major: element i is
 * `((splitmix64(seed + i) >> 40) / 2^24)·2 − 1`, uniform in [-1, 1).
 *
 * @param seed counter offset, an integer in [0, 2^64). @default 0
 */
export function initialInput(
  batch: number,
  tokens: number,
  channels: number,
  seed: number | bigint = 0,
): Float32Array {
  for (const [label, value] of [
    ["batch", batch],
    ["tokens", tokens],
    ["channels", channels],
  ] as const) {
    if (!Number.isSafeInteger(value) || value <= 0) {
      throw new RangeError(`initialInput: ${label} must be a positive integer (got ${value})`);
    }
  }
  const out = new Float32Array(batch * tokens * channels);
  fillUniform(out, toU64(normalizeSeed(seed)));
  return out;
}

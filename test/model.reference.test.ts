import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { DitConfig } from "../lib/model/dit";
import { genModel } from "../lib/model/genModel";
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16 } from "../lib/model/half";
import { initialInput } from "../lib/model/initialInput";
import {
  attention,
  blockForward,
  ditForward,
  geluTanh,
  loadDitWeights,
  rmsnorm,
  runReference,
  runSteps,
  softmaxInPlace,
  type DitWeights,
} from "../lib/model/reference";
import { ditTensorSpecs } from "../lib/model/dit";
import { identity, writeDit } from "./model.helpers";

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "ferry-reference-test-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** In-memory weights: zeros except `values`. */
function weightsOf(config: DitConfig, values: Record<string, number[]>): DitWeights {
  const tensors = new Map<string, Float64Array>();
  for (const spec of ditTensorSpecs(config)) {
    const t = new Float64Array(spec.shape.reduce((a, b) => a * b, 1));
    if (values[spec.name]) t.set(values[spec.name]!);
    tensors.set(spec.name, t);
  }
  return { config, tensors };
}

const rms = (...xs: number[]) => Math.sqrt(xs.reduce((s, x) => s + x * x, 0) / xs.length + 1e-6);
const tiny: DitConfig = { blocks: 1, hidden: 2, heads: 1, channels: 2 };

describe("building blocks", () => {
  it("geluTanh matches known values", () => {
    expect(geluTanh(0)).toBe(0);
    expect(geluTanh(1)).toBeCloseTo(0.8411919906082768, 14);
    expect(geluTanh(-1)).toBeCloseTo(-0.15880800939172324, 14);
    expect(geluTanh(10)).toBeCloseTo(10, 12);
    expect(geluTanh(-10)).toBeCloseTo(0, 12);
  });

  it("softmax sums to 1, is shift-invariant and survives large scores", () => {
    const a = Float64Array.from([1, 2, 3]);
    const b = Float64Array.from([1001, 1002, 1003]);
    softmaxInPlace(a);
    softmaxInPlace(b);
    expect(a.reduce((s, v) => s + v, 0)).toBeCloseTo(1, 15);
    for (let i = 0; i < 3; i++) expect(b[i]).toBeCloseTo(a[i]!, 15);
    const e = Math.exp(1) + Math.exp(2) + Math.exp(3);
    expect(a[2]).toBeCloseTo(Math.exp(3) / e, 15);
  });

  it("rmsnorm normalises each row and scales by the weight", () => {
    const y = rmsnorm(Float64Array.from([3, 4, 0, 0]), 2, Float64Array.from([1, 2]));
    expect(y[0]).toBeCloseTo(3 / rms(3, 4), 14);
    expect(y[1]).toBeCloseTo((2 * 4) / rms(3, 4), 14);
    expect(Array.from(y.subarray(2))).toEqual([0, 0]); // eps keeps a zero row finite
  });

  it("attention heads are independent column slices", () => {
    const [batch, tokens, d, heads] = [2, 3, 4, 2];
    let seed = 1;
    const rand = () => ((seed = (seed * 48271) % 2147483647) / 2147483647) * 2 - 1;
    const qkv = Float64Array.from({ length: batch * tokens * 3 * d }, rand);
    const out = attention(qkv, batch, tokens, d, heads);
    const dh = d / heads;
    for (let j = 0; j < heads; j++) {
      // Single-head attention on head j's q, k, v columns alone.
      const slice = new Float64Array(batch * tokens * 3 * dh);
      for (let r = 0; r < batch * tokens; r++) {
        for (let part = 0; part < 3; part++) {
          for (let c = 0; c < dh; c++) {
            slice[r * 3 * dh + part * dh + c] = qkv[r * 3 * d + part * d + j * dh + c]!;
          }
        }
      }
      const single = attention(slice, batch, tokens, dh, 1);
      for (let r = 0; r < batch * tokens; r++) {
        for (let c = 0; c < dh; c++) {
          expect(out[r * d + j * dh + c]).toBeCloseTo(single[r * dh + c]!, 14);
        }
      }
    }
  });

  it("attention with one token returns v; with equal scores, the mean of v within a sample", () => {
    // One token: softmax of a single score is 1, whatever q·k is.
    const one = attention(Float64Array.from([5, -2, 7, 1, 0.5, -3]), 1, 1, 2, 1);
    expect(Array.from(one)).toEqual([0.5, -3]);
    // q = 0 → all scores equal → mean of v over the sample's tokens (not the other sample's).
    const qkv = Float64Array.from([
      ...[0, 0, 1, 1, 2, 4], // sample 0, token 0: q, k, v
      ...[0, 0, 3, 3, 4, 8], // sample 0, token 1
      ...[0, 0, 1, 1, 100, 100], // sample 1, token 0
      ...[0, 0, 1, 1, 200, 300], // sample 1, token 1
    ]);
    expect(Array.from(attention(qkv, 2, 2, 2, 1))).toEqual([3, 6, 3, 6, 150, 200, 150, 200]);
  });
});

describe("block by hand", () => {
  it("attention path: uniform attention adds the mean of the normalised tokens", () => {
    // q = k = 0, v = h; out = identity; MLP path zero (norm2 = 0).
    const w = weightsOf(tiny, {
      "blocks.0.norm1.weight": [1, 1],
      "blocks.0.attn.qkv.weight": [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1],
      "blocks.0.attn.out.weight": identity(2),
    });
    const x = Float64Array.from([3, 4, 1, 0]);
    blockForward(w, 0, x, 1, 2);
    const mean0 = (3 / rms(3, 4) + 1 / rms(1, 0)) / 2;
    const mean1 = (4 / rms(3, 4) + 0) / 2;
    expect(x[0]).toBeCloseTo(3 + mean0, 13);
    expect(x[1]).toBeCloseTo(4 + mean1, 13);
    expect(x[2]).toBeCloseTo(1 + mean0, 13);
    expect(x[3]).toBeCloseTo(0 + mean1, 13);
  });

  it("attention path: q·k/√dh weights tokens by softmax", () => {
    // q = h·[1,0] (first column), k = h·[1,0], v = identity on h; hidden 2, 1 head (dh = 2).
    const w = weightsOf(tiny, {
      "blocks.0.norm1.weight": [1, 1],
      "blocks.0.attn.qkv.weight": [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1],
      "blocks.0.attn.out.weight": identity(2),
    });
    const x = Float64Array.from([3, 4, 1, 0]);
    blockForward(w, 0, x, 1, 2);
    const h = [3 / rms(3, 4), 4 / rms(3, 4), 1 / rms(1, 0), 0];
    // Token 0's scores: q0·k0 = h0², q0·k1 = h0·h2, over √2.
    const s00 = (h[0]! * h[0]!) / Math.SQRT2;
    const s01 = (h[0]! * h[2]!) / Math.SQRT2;
    const p0 = Math.exp(s00) / (Math.exp(s00) + Math.exp(s01));
    expect(x[0]).toBeCloseTo(3 + p0 * h[0]! + (1 - p0) * h[2]!, 13);
    expect(x[1]).toBeCloseTo(4 + p0 * h[1]! + (1 - p0) * h[3]!, 13);
  });

  it("MLP path: x += gelu_tanh(h·W1ᵀ + b1)·W2ᵀ + b2 after the attention residual", () => {
    const fc1 = new Array(16).fill(0);
    fc1[0] = 1; // hidden 0 = h0
    fc1[3] = 1; // hidden 1 = h1
    const fc2 = new Array(16).fill(0);
    fc2[0] = 1; // out 0 = hidden 0
    fc2[9] = 2; // out 1 = 2·hidden 1
    const w = weightsOf(tiny, {
      "blocks.0.attn.out.bias": [0.1, -0.2], // norm1 = 0: attention adds only its bias
      "blocks.0.norm2.weight": [1, 1],
      "blocks.0.mlp.fc1.weight": fc1,
      "blocks.0.mlp.fc1.bias": [0, 0.5, 0, 0, 0, 0, 0, 0],
      "blocks.0.mlp.fc2.weight": fc2,
      "blocks.0.mlp.fc2.bias": [0, 1],
    });
    const x = Float64Array.from([3, 4]);
    blockForward(w, 0, x, 1, 1);
    const a = [3.1, 3.8];
    const r = rms(...a);
    expect(x[0]).toBeCloseTo(a[0]! + geluTanh(a[0]! / r), 13);
    expect(x[1]).toBeCloseTo(a[1]! + 2 * geluTanh(a[1]! / r + 0.5) + 1, 13);
  });
});

describe("runReference", () => {
  it("one step of embed → (zero block) → final on a file, by hand", async () => {
    const path = join(dir, "hand.safetensors");
    await writeDit(path, tiny, {
      "embed.weight": identity(2),
      "final.norm.weight": [1, 1],
      "final.out.weight": [2, 0, 0, 3],
      "final.out.bias": [0.5, -1],
    });
    const z = await runReference(path, {
      batch: 1,
      tokens: 1,
      steps: 1,
      input: Float32Array.of(3, 4),
    });
    const r = rms(3, 4);
    expect(z[0]).toBeCloseTo(Math.fround(3 - ((2 * 3) / r + 0.5)), 6);
    expect(z[1]).toBeCloseTo(Math.fround(4 - ((3 * 4) / r - 1)), 6);
    expect(z).toBeInstanceOf(Float32Array);
  });

  it("S steps are z ← z − (1/S)·model(z), from initialInput(seed) by default", async () => {
    const path = join(dir, "steps.safetensors");
    const config = { blocks: 2, hidden: 8, heads: 2, channels: 3 };
    await genModel(path, { ...config, seed: 3 });
    const weights = await loadDitWeights(path);
    const z0 = Float64Array.from(initialInput(2, 4, 3, 11));
    const z1 = z0.map((v, i) => v - 0.5 * ditForward(weights, z0, 2, 4)[i]!);
    const f1 = ditForward(weights, z1, 2, 4);
    const z2 = z1.map((v, i) => v - 0.5 * f1[i]!);
    const got = await runReference(path, { batch: 2, tokens: 4, steps: 2, seed: 11 });
    expect(Array.from(got)).toEqual(Array.from(Float32Array.from(z2)));
    expect(Array.from(runSteps(weights, z0, 2, 4, 2))).toEqual(Array.from(z2));
  });

  it("samples are independent and tokens are permutation-equivariant (no mask, no positions)", async () => {
    const path = join(dir, "props.safetensors");
    const config = { blocks: 2, hidden: 16, heads: 4, channels: 4 };
    await genModel(path, { ...config, seed: 1 });
    const weights = await loadDitWeights(path);
    const [t, c] = [5, 4];
    const z = Float64Array.from(initialInput(2, t, c, 99));
    const both = ditForward(weights, z, 2, t);
    const second = ditForward(weights, z.slice(t * c), 1, t);
    for (let i = 0; i < t * c; i++) expect(both[t * c + i]).toBeCloseTo(second[i]!, 12);
    // Reverse sample 0's tokens: its outputs reverse too.
    const rev = z.slice(0, t * c);
    for (let k = 0; k < t; k++) rev.set(z.subarray((t - 1 - k) * c, (t - k) * c), k * c);
    const outRev = ditForward(weights, rev, 1, t);
    for (let k = 0; k < t; k++) {
      for (let j = 0; j < c; j++) {
        expect(outRev[k * c + j]).toBeCloseTo(both[(t - 1 - k) * c + j]!, 12);
      }
    }
  });

  it("f16 and bf16 files decode to the rounded weights and give nearby results", async () => {
    const config = { blocks: 2, hidden: 32, heads: 4, channels: 8 };
    const paths = { f32: "", f16: "", bf16: "" };
    for (const dtype of ["f32", "f16", "bf16"] as const) {
      paths[dtype] = join(dir, `dtype-${dtype}.safetensors`);
      await genModel(paths[dtype], { ...config, dtype, seed: 4 });
    }
    const w32 = await loadDitWeights(paths.f32);
    const w16 = await loadDitWeights(paths.f16);
    const wbf = await loadDitWeights(paths.bf16);
    for (const [name, ref] of w32.tensors) {
      expect(Array.from(w16.tensors.get(name)!)).toEqual(
        Array.from(ref, (v) => f16ToF32(f32ToF16(v))),
      );
      expect(Array.from(wbf.tensors.get(name)!)).toEqual(
        Array.from(ref, (v) => bf16ToF32(f32ToBf16(v))),
      );
    }
    const job = { batch: 2, tokens: 8, steps: 4 };
    const [a, b, c] = await Promise.all(
      [paths.f32, paths.f16, paths.bf16].map((p) => runReference(p, job)),
    );
    const dist = (x: Float32Array, y: Float32Array) =>
      Math.sqrt(x.reduce((s, v, i) => s + (v - y[i]!) ** 2, 0) / x.reduce((s, v) => s + v * v, 0));
    expect(dist(a!, b!)).toBeLessThan(1e-2);
    expect(dist(a!, c!)).toBeLessThan(5e-2);
    expect(dist(a!, b!)).toBeGreaterThan(0); // the rounding is really there
  });

  it("stays finite and bounded over many steps on a generated model", async () => {
    const path = join(dir, "long.safetensors");
    await genModel(path, { blocks: 4, hidden: 32, heads: 4, channels: 8, seed: 2 });
    const z = await runReference(path, { batch: 1, tokens: 16, steps: 50 });
    for (const v of z) {
      expect(Number.isFinite(v)).toBe(true);
      expect(Math.abs(v)).toBeLessThan(20);
    }
  });

  it("rejects bad jobs and models too big for the reference", async () => {
    const path = join(dir, "zeros.safetensors");
    await writeDit(path, tiny, {});
    await expect(runReference(path, { batch: 1, tokens: 1, steps: 0 })).rejects.toThrow(
      /steps must be a positive integer/,
    );
    await expect(
      runReference(path, { batch: 1, tokens: 2, steps: 1, input: new Float32Array(3) }),
    ).rejects.toThrow(/input has 3 values, expected 1×2×2 = 4/);
    await expect(
      runReference(path, { batch: 1, tokens: 1, steps: 1, maxModelBytes: 10 }),
    ).rejects.toThrow(/more than the reference loads/);
  });
});

import { mkdtemp, rm, writeFile, readFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { genModel } from "../lib/model/genModel";
import { ModelFormatError } from "../lib/model/safetensors";
import { ditFootprints, modelProfileFromFile } from "../lib/model/segments";
import { writeDit } from "./model.helpers";
import { FIXTURES_DIR } from "./fixturesDir";

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "ferry-segments-test-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

// N=2, D=8, H=2, C=4; B=2, T=3 → M=6. Every number below is worked out by hand.
const config = { blocks: 2, hidden: 8, heads: 2, channels: 4 };

describe("ditFootprints (each segment's ggml graph, measured natively)", () => {
  // Matrix products by hand: prelude 2·M·C·D; block 2·M·(3D² + D² + 4D² + 4D²) + 4·B·H·T²·(D/H)
  // (QKᵀ and P·V); final 2·M·D·C. The graph adds one FLOP per element of its other ops
  // (norms, bias adds, GELU, softmax, copies): a few dozen per hidden value at most.
  const matmul = (d: number, c: number, h: number, b: number, t: number) => {
    const m = b * t;
    return {
      prelude: 2 * m * c * d,
      block: 2 * m * (3 * d * d + d * d + 4 * d * d + 4 * d * d) + 4 * b * h * t * t * (d / h),
      final: 2 * m * d * c,
    };
  };

  it("reads and writes the activations by hand: z in, x through, y out", async () => {
    const [prelude, block, , final] = await ditFootprints(config, { batch: 2, tokens: 3 });
    // M = 6 rows: x is 4·6·8 = 192 bytes, z and y 4·6·4 = 96.
    expect(prelude).toMatchObject({ name: "prelude", output_bytes: 192, prev_cut_bytes: 96 });
    expect(block).toMatchObject({ name: "blocks.0", output_bytes: 192, prev_cut_bytes: 192 });
    expect(final).toMatchObject({ name: "final", output_bytes: 96, prev_cut_bytes: 192 });
    for (const s of [prelude!, block!, final!]) {
      expect(s.external_bytes).toBe(0);
      expect(s.param_bytes).toBe(0);
    }
  });

  it("counts the matrix products' FLOPs from the graph, plus its elementwise ops", async () => {
    const [prelude, block, , final] = await ditFootprints(config, { batch: 2, tokens: 3 });
    const want = matmul(8, 4, 2, 2, 3);
    const m = 6;
    for (const [got, formula] of [
      [prelude!.flops, want.prelude],
      [block!.flops, want.block],
      [final!.flops, want.final],
    ]) {
      expect(got).toBeGreaterThanOrEqual(formula!);
      expect(got - formula!).toBeLessThanOrEqual(64 * m * 8);
    }
  });

  it("sizes compute buffers from ggml_gallocr: attention scores grow with T², not M²", async () => {
    const one = (await ditFootprints(config, { batch: 1, tokens: 64 }))[1]!;
    const eight = (await ditFootprints(config, { batch: 8, tokens: 8 }))[1]!;
    // Same M = 64 rows; one sample of 64 tokens has 64² scores per head, eight of 8 have 8·8².
    expect(one.compute_buffer_bytes).toBeGreaterThan(eight.compute_buffer_bytes);
    const two = (await ditFootprints(config, { batch: 2, tokens: 3 }))[1]!;
    const six = (await ditFootprints(config, { batch: 1, tokens: 6 }))[1]!;
    const big = (await ditFootprints(config, { batch: 1, tokens: 64 }))[1]!;
    // At least one head's score matrix, 4·T² bytes, lives in the buffer.
    expect(big.compute_buffer_bytes).toBeGreaterThanOrEqual(4 * 64 * 64);
    expect(six.flops - two.flops).toBeGreaterThanOrEqual(4 * 1 * 2 * 36 * 4 - 4 * 2 * 2 * 9 * 4);
  });

  it("rejects bad job shapes", async () => {
    await expect(ditFootprints(config, { batch: 0, tokens: 3 })).rejects.toThrow(/batch/);
    await expect(ditFootprints({ ...config, heads: 3 }, { batch: 1, tokens: 1 })).rejects.toThrow(
      /heads must divide hidden/,
    );
  });
});

describe("modelProfileFromFile", () => {
  it("sums stored bytes per base segment and names the profile after the file", async () => {
    const path = join(dir, "small.safetensors");
    await writeDit(path, config, {});
    const profile = await modelProfileFromFile(path, { batch: 2, tokens: 3 });
    expect(profile.name).toBe("small.safetensors");
    expect(profile.segments.map((s) => [s.name, s.param_bytes])).toEqual([
      ["prelude", 160], // (8·4 + 8)·4
      ["blocks.0", 3424], // (8 + 192 + 24 + 64 + 8 + 8 + 256 + 32 + 256 + 8)·4 = 856·4
      ["blocks.1", 3424],
      ["final", 176], // (8 + 32 + 4)·4
    ]);
    const fp = await ditFootprints(config, { batch: 2, tokens: 3 });
    expect(profile.segments[0]).toEqual({ ...fp[0], param_bytes: 160 });
    expect(profile.segments[2]).toEqual({ ...fp[2], param_bytes: 3424 });
    expect(profile.segments[3]).toEqual({ ...fp[3], param_bytes: 176 });
  });

  it("counts bytes as stored: f16/bf16 halves, mixed dtypes per tensor", async () => {
    const half = join(dir, "half.safetensors");
    await writeDit(half, config, {}, "F16");
    expect(
      (await modelProfileFromFile(half, { batch: 1, tokens: 1 })).segments.map(
        (s) => s.param_bytes,
      ),
    ).toEqual([80, 1712, 1712, 88]);
    const mixed = join(dir, "mixed.safetensors");
    await writeDit(mixed, config, {}, "BF16", {
      "blocks.1.mlp.fc1.weight": "F32",
      "final.out.bias": "F32",
    });
    expect(
      (await modelProfileFromFile(mixed, { batch: 1, tokens: 1 })).segments.map(
        (s) => s.param_bytes,
      ),
    ).toEqual([80, 1712, 1712 + 256 * 2, 88 + 4 * 2]);
  });

  it("agrees with a generated model's file size", async () => {
    const path = join(dir, "gen.safetensors");
    const result = await genModel(path, {
      blocks: 3,
      hidden: 32,
      heads: 4,
      channels: 8,
      dtype: "bf16",
    });
    const profile = await modelProfileFromFile(path, { batch: 1, tokens: 16 });
    const total = profile.segments.reduce((s, x) => s + x.param_bytes, 0);
    expect(total).toBe(result.params * 2);
    expect(profile.segments).toHaveLength(5);
  });

  it("reads only the header: garbage tensor data does not change the profile", async () => {
    const path = join(dir, "corrupt-data.safetensors");
    await writeDit(path, config, {});
    const bytes = await readFile(path);
    const n = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
    bytes.fill(0xff, 8 + n);
    await writeFile(path, bytes);
    const profile = await modelProfileFromFile(path, { batch: 2, tokens: 3 });
    expect(profile.segments[1]!.param_bytes).toBe(3424);
  });

  it("gives a ModelFormatError for a file that is not a Ferry DiT", async () => {
    const sample = join(FIXTURES_DIR, "safetensors-samples", "overall.safetensors");
    await expect(modelProfileFromFile(sample, { batch: 1, tokens: 1 })).rejects.toThrow(
      ModelFormatError,
    );
    await expect(modelProfileFromFile(sample, { batch: 1, tokens: 1 })).rejects.toThrow(
      /overall\.safetensors: not a Ferry DiT model/,
    );
  });
});

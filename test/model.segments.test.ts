import { mkdtemp, rm, writeFile, readFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { genModel } from "../lib/model/genModel";
import { ModelFormatError } from "../lib/model/safetensors";
import { modelProfileFromFile, segmentFootprint } from "../lib/model/segments";
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

describe("segmentFootprint", () => {
  it("matches hand-computed numbers", () => {
    expect(segmentFootprint(config, 2, 3)).toEqual({
      prelude: {
        compute_buffer_bytes: 0,
        output_bytes: 192, // 4·6·8
        prev_cut_bytes: 96, // 4·6·4
        external_bytes: 0,
        flops: 384, // 2·6·4·8
      },
      block: {
        compute_buffer_bytes: 1800, // 4·(9·6·8 + 2·3·3) = 4·(432 + 18)
        output_bytes: 192,
        prev_cut_bytes: 192,
        external_bytes: 0,
        flops: 9792, // 2·6·(192+64+256+256) + 4·2·2·9·4 = 9216 + 576
      },
      final: {
        compute_buffer_bytes: 288, // 4·(48 + 24)
        output_bytes: 96, // 4·6·4
        prev_cut_bytes: 192,
        external_bytes: 0,
        flops: 384, // 2·6·8·4
      },
    });
  });

  it("scores only within a sample: attention flops and scratch use T², not M²", () => {
    const one = segmentFootprint(config, 1, 6).block;
    const two = segmentFootprint(config, 2, 3).block;
    // Same M = 6 rows, so only the attention terms differ.
    // 4·B·H·T²·(D/H): B=1,T=6 vs B=2,T=3
    expect(one.flops - two.flops).toBe(4 * 1 * 2 * 36 * 4 - 4 * 2 * 2 * 9 * 4);
    // 4·H·T²: one sample's score matrices
    expect(one.compute_buffer_bytes - two.compute_buffer_bytes).toBe(4 * 2 * (36 - 9));
  });

  it("rejects bad job shapes", () => {
    expect(() => segmentFootprint(config, 0, 3)).toThrow(/batch/);
    expect(() => segmentFootprint({ ...config, heads: 3 }, 1, 1)).toThrow(/does not divide/);
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
    const fp = segmentFootprint(config, 2, 3);
    expect(profile.segments[0]).toEqual({ name: "prelude", param_bytes: 160, ...fp.prelude });
    expect(profile.segments[2]).toEqual({ name: "blocks.1", param_bytes: 3424, ...fp.block });
    expect(profile.segments[3]).toEqual({ name: "final", param_bytes: 176, ...fp.final });
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

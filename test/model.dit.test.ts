import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  baseSegmentOf,
  checkDitTensors,
  ditConfigFromMetadata,
  ditMetadata,
  ditSegmentNames,
  ditTensorSpecs,
} from "../lib/model/dit";
import { encodeFloats } from "../lib/model/half";
import {
  ModelFormatError,
  readSafetensorsHeader,
  writeSafetensors,
  type TensorToWrite,
} from "../lib/model/safetensors";
import { writeDit } from "./model.helpers";

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "ferry-dit-test-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe("ditTensorSpecs", () => {
  it("lists every tensor in file order with [out, in] shapes", () => {
    const specs = ditTensorSpecs({ blocks: 2, hidden: 8, heads: 2, channels: 3 });
    expect(specs.map((s) => `${s.segment} ${s.name} [${s.shape.join(",")}]`)).toEqual([
      "prelude embed.weight [8,3]",
      "prelude embed.bias [8]",
      ...[0, 1].flatMap((i) => [
        `blocks.${i} blocks.${i}.norm1.weight [8]`,
        `blocks.${i} blocks.${i}.attn.qkv.weight [24,8]`,
        `blocks.${i} blocks.${i}.attn.qkv.bias [24]`,
        `blocks.${i} blocks.${i}.attn.out.weight [8,8]`,
        `blocks.${i} blocks.${i}.attn.out.bias [8]`,
        `blocks.${i} blocks.${i}.norm2.weight [8]`,
        `blocks.${i} blocks.${i}.mlp.fc1.weight [32,8]`,
        `blocks.${i} blocks.${i}.mlp.fc1.bias [32]`,
        `blocks.${i} blocks.${i}.mlp.fc2.weight [8,32]`,
        `blocks.${i} blocks.${i}.mlp.fc2.bias [8]`,
      ]),
      "final final.norm.weight [8]",
      "final final.out.weight [3,8]",
      "final final.out.bias [3]",
    ]);
  });

  it("agrees with baseSegmentOf and ditSegmentNames", () => {
    const config = { blocks: 12, hidden: 4, heads: 1, channels: 2 };
    for (const spec of ditTensorSpecs(config)) expect(baseSegmentOf(spec.name)).toBe(spec.segment);
    expect(ditSegmentNames(config)).toEqual([
      "prelude",
      ...Array.from({ length: 12 }, (_, i) => `blocks.${i}`),
      "final",
    ]);
    expect(baseSegmentOf("blocks.10.mlp.fc1.bias")).toBe("blocks.10");
    expect(baseSegmentOf("blocks.01.norm1.weight")).toBeUndefined();
    expect(baseSegmentOf("blocks.x.norm1.weight")).toBeUndefined();
    expect(baseSegmentOf("lm_head.weight")).toBeUndefined();
  });

  it("rejects impossible configurations", () => {
    expect(() => ditTensorSpecs({ blocks: 1, hidden: 10, heads: 4, channels: 1 })).toThrow(
      /heads 4 does not divide hidden 10/,
    );
    expect(() => ditTensorSpecs({ blocks: 0, hidden: 4, heads: 1, channels: 1 })).toThrow(/blocks/);
  });
});

describe("ditConfigFromMetadata", () => {
  const good = ditMetadata({ blocks: 3, hidden: 64, heads: 8, channels: 4 });

  it("round-trips ditMetadata", () => {
    expect(good).toEqual({
      "ferry.arch": "dit",
      "ferry.blocks": "3",
      "ferry.hidden": "64",
      "ferry.heads": "8",
      "ferry.channels": "4",
    });
    expect(ditConfigFromMetadata(good, "m.safetensors")).toEqual({
      blocks: 3,
      hidden: 64,
      heads: 8,
      channels: 4,
    });
  });

  const cases: [string, Record<string, string>, RegExp][] = [
    [
      "no arch",
      { test: "a" },
      /m\.safetensors: not a Ferry DiT model: __metadata__ has no "ferry\.arch"/,
    ],
    ["other arch", { ...good, "ferry.arch": "unet" }, /unsupported architecture .*"unet"/],
    ["missing key", { ...good, "ferry.heads": undefined as never }, /lacks "ferry\.heads"/],
    [
      "zero",
      { ...good, "ferry.blocks": "0" },
      /"ferry\.blocks" = "0" is not a positive decimal integer/,
    ],
    ["hex", { ...good, "ferry.hidden": "0x40" }, /"ferry\.hidden" = "0x40"/],
    ["fraction", { ...good, "ferry.channels": "1.5" }, /"ferry\.channels" = "1\.5"/],
    ["huge", { ...good, "ferry.hidden": "99999999999999999999" }, /"ferry\.hidden"/],
    [
      "indivisible",
      { ...good, "ferry.heads": "5" },
      /"ferry\.heads" = 5 does not divide "ferry\.hidden" = 64/,
    ],
  ];
  for (const [label, metadata, pattern] of cases) {
    it(`rejects ${label}`, () => {
      const clean = Object.fromEntries(Object.entries(metadata).filter(([, v]) => v !== undefined));
      expect(() => ditConfigFromMetadata(clean, "m.safetensors")).toThrow(ModelFormatError);
      expect(() => ditConfigFromMetadata(clean, "m.safetensors")).toThrow(pattern);
    });
  }
});

describe("checkDitTensors", () => {
  const config = { blocks: 1, hidden: 4, heads: 2, channels: 2 };

  async function variant(
    name: string,
    edit: (tensors: TensorToWrite[]) => TensorToWrite[],
  ): Promise<string> {
    const path = join(dir, name);
    const tensors = ditTensorSpecs(config).map((s) => ({
      name: s.name,
      dtype: "F32" as const,
      shape: s.shape,
      data: encodeFloats(new Float32Array(s.shape.reduce((a, b) => a * b, 1)), "F32"),
    }));
    await writeSafetensors(path, ditMetadata(config), edit(tensors));
    return path;
  }

  async function check(path: string) {
    const header = await readSafetensorsHeader(path);
    return checkDitTensors(header, ditConfigFromMetadata(header.metadata, path));
  }

  it("accepts a complete file, returning tensors in spec order", async () => {
    const path = join(dir, "ok.safetensors");
    await writeDit(path, config, {}, "BF16", { "embed.weight": "F32" });
    const tensors = await check(path);
    expect(tensors.map((t) => t.name)).toEqual(ditTensorSpecs(config).map((s) => s.name));
    expect(tensors[0]!.dtype).toBe("F32");
    expect(tensors[1]!.dtype).toBe("BF16");
  });

  it("names a missing tensor", async () => {
    const path = await variant("missing.safetensors", (ts) =>
      ts.filter((t) => t.name !== "blocks.0.attn.out.bias"),
    );
    await expect(check(path)).rejects.toThrow(/missing tensor "blocks\.0\.attn\.out\.bias"/);
  });

  it("names a tensor of the wrong shape", async () => {
    const path = await variant("shape.safetensors", (ts) =>
      ts.map((t) =>
        t.name === "blocks.0.mlp.fc2.weight"
          ? { ...t, shape: [16, 4], data: new Uint8Array(256) }
          : t,
      ),
    );
    await expect(check(path)).rejects.toThrow(
      /tensor "blocks\.0\.mlp\.fc2\.weight" has shape \[16, 4\], expected \[4, 16\]/,
    );
  });

  it("names a tensor of a dtype the kernels cannot use", async () => {
    const path = await variant("dtype.safetensors", (ts) =>
      ts.map((t) => (t.name === "final.out.bias" ? { ...t, dtype: "I32" } : t)),
    );
    await expect(check(path)).rejects.toThrow(/tensor "final\.out\.bias" has dtype I32/);
  });

  it("names unexpected extra tensors", async () => {
    const path = await variant("extra.safetensors", (ts) => [
      ...ts,
      { name: "blocks.1.norm1.weight", dtype: "F32", shape: [4], data: new Uint8Array(16) },
    ]);
    await expect(check(path)).rejects.toThrow(/unexpected tensor "blocks\.1\.norm1\.weight"/);
  });
});

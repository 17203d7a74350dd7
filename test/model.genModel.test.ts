import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Command } from "commander";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { register } from "../cli/commands/genModel";
import { ditConfigFromMetadata, ditTensorSpecs } from "../lib/model/dit";
import {
  genModel,
  genModelSize,
  generateTensorValues,
  tensorInit,
  tensorStreamKey,
} from "../lib/model/genModel";
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16 } from "../lib/model/half";
import { splitmix64 } from "../lib/model/initialInput";
import { readSafetensorsHeader, readTensor } from "../lib/model/safetensors";

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "ferry-genmodel-test-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const small = { blocks: 2, hidden: 16, heads: 4, channels: 4 };

describe("genModel", () => {
  it("writes the DiT layout, metadata and sizes it reports", async () => {
    const path = join(dir, "layout.safetensors");
    const result = await genModel(path, { ...small, dtype: "f16" });
    const header = await readSafetensorsHeader(path);
    expect(ditConfigFromMetadata(header.metadata, path)).toEqual(small);
    expect(header.tensors.map((t) => [t.name, t.shape, t.dtype])).toEqual(
      ditTensorSpecs(small).map((s) => [s.name, s.shape, "F16"]),
    );
    const params = ditTensorSpecs(small).reduce(
      (n, s) => n + s.shape.reduce((a, b) => a * b, 1),
      0,
    );
    expect(result).toMatchObject({
      path,
      config: small,
      dtype: "f16",
      params,
      bytes: header.fileBytes,
    });
    expect(genModelSize(small, "f16")).toEqual({ params, dataBytes: params * 2 });
  });

  it("uses the documented defaults: 4 blocks, hidden 256, 4 heads, 16 channels, f32", async () => {
    const path = join(dir, "defaults.safetensors");
    const result = await genModel(path);
    expect(result.config).toEqual({ blocks: 4, hidden: 256, heads: 4, channels: 16 });
    expect(result.dtype).toBe("f32");
    // prelude 256·16+256, block 12·256² + 11·256, final 256 + 16·256 + 16
    expect(result.params).toBe(4352 + 4 * 789248 + 4368);
  });

  it("is deterministic: same seed → same bytes, another seed → other weights", async () => {
    const a = join(dir, "a.safetensors");
    const b = join(dir, "b.safetensors");
    const c = join(dir, "c.safetensors");
    await genModel(a, { ...small, seed: 7 });
    await genModel(b, { ...small, seed: 7n });
    await genModel(c, { ...small, seed: 8 });
    const [ba, bb, bc] = await Promise.all([readFile(a), readFile(b), readFile(c)]);
    expect(ba.equals(bb)).toBe(true);
    expect(ba.length).toBe(bc.length);
    expect(ba.equals(bc)).toBe(false);
    const header = await readSafetensorsHeader(a);
    const wa = await readTensor(a, header, "blocks.1.attn.qkv.weight");
    const wc = await readTensor(c, header, "blocks.1.attn.qkv.weight");
    expect(wa.filter((v, i) => v === wc[i]).length).toBeLessThan(wa.length / 100);
  });

  it("follows the documented weight scheme and scales", async () => {
    const path = join(dir, "scheme.safetensors");
    const seed = 123;
    await genModel(path, { ...small, seed });
    const header = await readSafetensorsHeader(path);
    for (const spec of ditTensorSpecs(small)) {
      const values = await readTensor(path, header, spec.name);
      const key = tensorStreamKey(seed, spec.name);
      const { offset, scale } = tensorInit(spec);
      // The last element by the definition, independently of the chunked generator.
      const at = values.length - 1;
      const u = (Number(splitmix64(key + BigInt(at)) >> 40n) / 2 ** 24) * 2 - 1;
      expect(values[at]).toBe(Math.fround(offset + scale * u));
      const lo = Math.min(...values);
      const hi = Math.max(...values);
      if (spec.name.endsWith(".bias")) {
        expect(scale).toBe(0.02);
      } else if (spec.shape.length === 2) {
        expect(scale).toBeCloseTo(1 / Math.sqrt(spec.shape[1]!), 12);
      } else {
        expect(offset).toBe(1);
        expect(scale).toBe(0.1);
      }
      expect(lo).toBeGreaterThanOrEqual(Math.fround(offset - scale));
      expect(hi).toBeLessThan(offset + scale);
      if (values.length >= 64) {
        // Spread over most of the range, centred on the offset.
        expect(hi - lo).toBeGreaterThan(1.5 * scale);
        const mean = values.reduce((s, v) => s + v, 0) / values.length;
        expect(Math.abs(mean - offset)).toBeLessThan(scale / 4);
      }
    }
  });

  it("f16 and bf16 files hold the f32 weights rounded to nearest", async () => {
    const f32 = join(dir, "w32.safetensors");
    const f16 = join(dir, "w16.safetensors");
    const bf16 = join(dir, "wbf.safetensors");
    await genModel(f32, { ...small, seed: 5, dtype: "f32" });
    await genModel(f16, { ...small, seed: 5, dtype: "f16" });
    await genModel(bf16, { ...small, seed: 5, dtype: "bf16" });
    const [h32, h16, hbf] = await Promise.all([f32, f16, bf16].map(readSafetensorsHeader));
    for (const name of ["embed.weight", "blocks.0.mlp.fc1.bias", "final.norm.weight"]) {
      const ref = await readTensor(f32, h32!, name);
      expect(await readTensor(f16, h16!, name)).toEqual(ref.map((v) => f16ToF32(f32ToF16(v))));
      expect(await readTensor(bf16, hbf!, name)).toEqual(ref.map((v) => bf16ToF32(f32ToBf16(v))));
    }
  });

  it("chunked generation of a tensor larger than a chunk matches the element-wise definition", async () => {
    // hidden 520: fc1 is 4·520·520 = 1,081,600 elements, more than one 2^20-element chunk.
    const config = { blocks: 1, hidden: 520, heads: 4, channels: 4 };
    const path = join(dir, "chunks.safetensors");
    let calls = 0;
    let last = [0, 0];
    let maxBuffers = 0;
    await genModel(path, {
      ...config,
      seed: 9,
      dtype: "bf16",
      onProgress: (written, total) => {
        calls++;
        expect(written).toBeGreaterThan(last[0]!);
        last = [written, total];
        maxBuffers = Math.max(maxBuffers, process.memoryUsage().arrayBuffers);
      },
    });
    expect(last[0]).toBe(last[1]);
    expect(last[1]).toBe(genModelSize(config, "bf16").dataBytes);
    expect(calls).toBeGreaterThan(10);
    const header = await readSafetensorsHeader(path);
    const spec = ditTensorSpecs(config).find((s) => s.name === "blocks.0.mlp.fc1.weight")!;
    const values = await readTensor(path, header, spec.name);
    expect(values).toHaveLength(1_081_600);
    for (const at of [0, (1 << 20) - 1, 1 << 20, 1_081_599]) {
      const one = new Float32Array(1);
      generateTensorValues(9, spec, at, one);
      expect(values[at]).toBe(bf16ToF32(f32ToBf16(one[0]!)));
    }
  });

  it("validates options before creating anything", async () => {
    const path = join(dir, "never.safetensors");
    await expect(genModel(path, { heads: 5 })).rejects.toThrow(
      "--heads 5 does not divide --hidden 256",
    );
    await expect(genModel(path, { blocks: 0 })).rejects.toThrow(
      "--blocks must be a positive integer",
    );
    await expect(genModel(path, { hidden: 2.5 })).rejects.toThrow(
      "--hidden must be a positive integer",
    );
    await expect(genModel(path, { dtype: "q7_9" as never })).rejects.toThrow(
      "--dtype must be one of f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_K, q3_K, q4_K, q5_K, q6_K, iq4_nl, iq4_xs",
    );
    await expect(genModel(path, { dtype: "q4_0" })).rejects.toThrow(
      "--dtype q4_0 is a ggml quantized type and needs GGUF",
    );
    await expect(genModel(path, { seed: -1 })).rejects.toThrow("--seed must be an integer");
    expect((await readdir(dir)).filter((f) => f.startsWith("never"))).toEqual([]);
  });

  it("leaves no partial file when the output cannot be written", async () => {
    await expect(genModel(join(dir, "no-such-dir", "m.safetensors"), small)).rejects.toThrow(
      /ENOENT/,
    );
  });
});

describe("ferry gen-model", () => {
  afterEach(() => {
    vi.restoreAllMocks();
    process.exitCode = undefined;
  });

  async function cli(args: string[]): Promise<{ stdout: string; stderr: string }> {
    let stdout = "";
    let stderr = "";
    vi.spyOn(process.stdout, "write").mockImplementation((chunk: string | Uint8Array) => {
      stdout += String(chunk);
      return true;
    });
    vi.spyOn(process.stderr, "write").mockImplementation((chunk: string | Uint8Array) => {
      stderr += String(chunk);
      return true;
    });
    const program = new Command("ferry").exitOverride();
    program.configureOutput({ writeOut: (s) => (stdout += s), writeErr: (s) => (stderr += s) });
    register(program);
    try {
      await program.parseAsync(["node", "ferry", "gen-model", ...args]);
    } finally {
      vi.restoreAllMocks();
    }
    return { stdout, stderr };
  }

  it("writes the model and prints a one-line summary", async () => {
    const path = join(dir, "cli.safetensors");
    const { stdout, stderr } = await cli([
      "--out",
      path,
      "--blocks",
      "2",
      "--hidden",
      "16",
      "--heads",
      "4",
      "--channels",
      "4",
      "--dtype",
      "bf16",
      "--seed",
      "18446744073709551615",
    ]);
    expect(process.exitCode).toBeUndefined();
    expect(stderr).toBe("");
    const params = genModelSize(small, "bf16").params;
    const header = await readSafetensorsHeader(path);
    expect(stdout).toBe(
      `wrote ${path}: DiT 2 blocks, hidden 16, 4 heads, 4 channels, bf16; ` +
        `${params.toLocaleString("en-US")} params, ${header.fileBytes.toLocaleString("en-US")} bytes ` +
        `(${(header.fileBytes / 1024).toFixed(1)} KiB)\n`,
    );
    // Same flags through the library give the same bytes.
    const lib = join(dir, "lib.safetensors");
    await genModel(lib, { ...small, dtype: "bf16", seed: 2n ** 64n - 1n });
    expect((await readFile(lib)).equals(await readFile(path))).toBe(true);
  });

  it("reports progress on stderr for large models", async () => {
    const path = join(dir, "large.safetensors");
    // 2 blocks at hidden 1024: 25 M params, 96 MiB of f32 — over the 64 MiB progress threshold.
    const { stdout, stderr } = await cli(["--out", path, "--blocks", "2", "--hidden", "1024"]);
    expect(stdout).toMatch(/^wrote .*large\.safetensors: DiT 2 blocks, hidden 1024/);
    expect(stderr).toMatch(/ferry gen-model: 100% \(96\.\d MiB of 96\.\d MiB\)\n$/);
    await rm(path);
  });

  for (const [args, message] of [
    [["--heads", "5"], "--heads 5 does not divide --hidden 256"],
    [["--blocks", "0"], "--blocks must be a positive integer (got '0')"],
    [["--hidden", "1e3"], "--hidden must be a positive integer (got '1e3')"],
    [["--channels", "-4"], "--channels must be a positive integer (got '-4')"],
    [
      ["--dtype", "q7_9"],
      "--dtype must be one of f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_K, q3_K, q4_K, q5_K, q6_K, iq4_nl, iq4_xs (got q7_9)",
    ],
    [["--dtype", "q8_0"], "--dtype q8_0 is a ggml quantized type and needs GGUF"],
    [["--seed", "18446744073709551616"], "--seed must be an integer in [0, 2^64)"],
  ] as const) {
    it(`refuses ${args.join(" ")}`, async () => {
      const path = join(dir, "bad-flags.safetensors");
      const { stderr } = await cli(["--out", path, ...args]);
      expect(stderr).toContain(`ferry gen-model: ${message}`);
      expect(process.exitCode).toBe(1);
      expect(await readdir(dir)).not.toContain("bad-flags.safetensors");
    });
  }

  it("requires --out", async () => {
    await expect(cli([])).rejects.toThrow(/required option '--out <path>' not specified/);
  });
});

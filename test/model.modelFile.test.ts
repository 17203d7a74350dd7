import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Command } from "commander";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { register } from "../cli/commands/genModel";
import { ditTensorSpecs, type DitConfig } from "../lib/model/dit";
import {
  ditGgufMetadata,
  genModel,
  genModelGgufTensors,
  genModelSize,
  genModelTensorType,
  generateTensorValues,
} from "../lib/model/genModel";
import { readGgufHeader } from "../lib/model/gguf";
import { writeGguf } from "../lib/model/ggufWriter";
import {
  checkDitModelTensors,
  readModelHeader,
  requireDitConfig,
  sniffModelFormat,
} from "../lib/model/modelFile";
import { dequantizeQ4_0, dequantizeQ8_0, quantizeQ4_0, quantizeQ8_0 } from "../lib/model/quantize";
import { loadDitWeights, runReference } from "../lib/model/reference";
import { ModelFormatError, readSafetensorsHeader } from "../lib/model/safetensors";
import { modelProfileFromFile } from "../lib/model/segments";
import { FIXTURES_DIR } from "./fixturesDir";

const LLAMA = join(FIXTURES_DIR, "gguf", "llama-2-tiny-random.gguf");
const OVERALL = join(FIXTURES_DIR, "safetensors-samples", "overall.safetensors");

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "ferry-modelfile-test-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

// hidden and channels are multiples of 32, so every matrix quantizes.
const config: DitConfig = { blocks: 2, hidden: 32, heads: 2, channels: 32 };
const gen = (name: string, dtype: "f32" | "f16" | "bf16" | "q8_0" | "q4_0", extra = {}) =>
  genModel(join(dir, name), { ...config, dtype, seed: 5, ...extra });

describe("readModelHeader", () => {
  it("reads a GGUF file: ggml dtypes, row-major shapes, string metadata, no DiT", async () => {
    const h = await readModelHeader(LLAMA);
    expect(h.format).toBe("gguf");
    expect(h.tensors).toHaveLength(12);
    expect(h.tensors[0]).toEqual({
      name: "token_embd.weight",
      dtype: "f16",
      shape: [32000, 8],
      begin: 724_416,
      end: 724_416 + 512_000,
      bytes: 512_000,
    });
    expect(h.tensors.find((t) => t.name === "blk.0.ffn_down.weight")!.shape).toEqual([8, 32]);
    expect(h.metadata["general.architecture"]).toBe("llama");
    expect(h.metadata["llama.block_count"]).toBe("1");
    expect(h.metadata["llama.attention.layer_norm_rms_epsilon"]).toBe("0.00001");
    expect(h.metadata["tokenizer.ggml.tokens"]).toMatch(/^\[string × 32000\] "<unk>"/);
    expect(h.ditConfig).toBeUndefined();
    expect(() => requireDitConfig(h)).toThrow(
      `${LLAMA}: not a Ferry DiT model: "general.architecture" is "llama" (expected "ferry-dit")`,
    );
  });

  it("reads a safetensors file", async () => {
    const h = await readModelHeader(OVERALL);
    expect(h.format).toBe("safetensors");
    expect(h.metadata).toEqual({ test: "a" });
    expect(h.tensors.map((t) => t.name)).toEqual(["B", "H", "I", "b", "d", "e", "f", "h", "i"]);
    expect(h.tensors[1]).toMatchObject({ dtype: "U16", shape: [6], bytes: 12 });
    expect(() => requireDitConfig(h)).toThrow(/not a Ferry DiT model/);
  });

  it("sniffs the format and names a file that is neither", async () => {
    expect(await sniffModelFormat(LLAMA)).toBe("gguf");
    expect(await sniffModelFormat(OVERALL)).toBe("safetensors");
    const junk = join(dir, "junk.bin");
    await writeFile(junk, Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0]));
    await expect(readModelHeader(junk)).rejects.toThrow(ModelFormatError);
    await expect(readModelHeader(junk)).rejects.toThrow(
      /junk\.bin: not a model file: neither GGUF .* nor safetensors .*\)$/,
    );
    const short = join(dir, "short.bin");
    await writeFile(short, Buffer.from("GG"));
    await expect(readModelHeader(short)).rejects.toThrow(/too short to be safetensors/);
  });

  it("gives the DiT configuration of Ferry files in both formats", async () => {
    await gen("cfg.gguf", "f32");
    await gen("cfg.safetensors", "f32");
    expect((await readModelHeader(join(dir, "cfg.gguf"))).ditConfig).toEqual(config);
    expect((await readModelHeader(join(dir, "cfg.safetensors"))).ditConfig).toEqual(config);
  });
});

describe("gen-model --format gguf", () => {
  it("writes the ferry-dit metadata, the safetensors names and ggml-order dimensions", async () => {
    const result = await gen("m.gguf", "f16");
    expect(result.format).toBe("gguf");
    const h = await readGgufHeader(result.path);
    expect([...h.metadata]).toEqual([
      ["general.architecture", { type: "string", value: "ferry-dit" }],
      ["ferry-dit.blocks", { type: "uint32", value: 2 }],
      ["ferry-dit.hidden", { type: "uint32", value: 32 }],
      ["ferry-dit.heads", { type: "uint32", value: 2 }],
      ["ferry-dit.channels", { type: "uint32", value: 32 }],
    ]);
    const specs = ditTensorSpecs(config);
    expect(h.tensors.map((t) => t.name)).toEqual(specs.map((s) => s.name));
    for (const [i, t] of h.tensors.entries()) {
      expect(t.ne).toEqual(specs[i]!.shape.slice().reverse());
      expect(t.type).toBe("f16");
    }
    expect(result.bytes).toBe(h.fileBytes);
  });

  it("quantizes 2-D weights, keeps norms and biases f32, falls back to f16 for odd rows", async () => {
    const h = await readGgufHeader((await gen("q8.gguf", "q8_0")).path);
    const types = Object.fromEntries(h.tensors.map((t) => [t.name, t.type]));
    expect(types["embed.weight"]).toBe("q8_0");
    expect(types["embed.bias"]).toBe("f32");
    expect(types["blocks.1.norm1.weight"]).toBe("f32");
    expect(types["blocks.1.attn.qkv.weight"]).toBe("q8_0");
    expect(types["blocks.1.mlp.fc2.weight"]).toBe("q8_0");
    expect(types["final.out.bias"]).toBe("f32");
    // 16 latent channels: embed.weight [D, 16] has 16-element rows, not a whole q4_0 block.
    const odd = await readGgufHeader(
      (await genModel(join(dir, "odd.gguf"), { ...config, channels: 16, dtype: "q4_0" })).path,
    );
    const oddTypes = Object.fromEntries(odd.tensors.map((t) => [t.name, t.type]));
    expect(oddTypes["embed.weight"]).toBe("f16");
    expect(oddTypes["final.out.weight"]).toBe("q4_0"); // [16, D]: rows of D
    expect(genModelTensorType({ name: "x.weight", shape: [4, 64] }, "q4_0")).toBe("q4_0");
    expect(genModelTensorType({ name: "x.weight", shape: [64, 48] }, "q8_0")).toBe("f16");
    expect(genModelTensorType({ name: "x.bias", shape: [64] }, "q8_0")).toBe("f32");
    expect(genModelTensorType({ name: "x.weight", shape: [64, 48] }, "bf16")).toBe("bf16");
  });

  it("holds the same f32 weights as the safetensors file of the same seed", async () => {
    const g = await gen("same.gguf", "f32");
    const s = await gen("same.safetensors", "f32");
    const gh = await readModelHeader(g.path);
    const sh = await readSafetensorsHeader(s.path);
    const gBytes = await readFile(g.path);
    const sBytes = await readFile(s.path);
    for (const t of sh.tensors) {
      const gt = gh.tensors.find((x) => x.name === t.name)!;
      expect(gt.bytes).toBe(t.bytes);
      expect(gBytes.subarray(gt.begin, gt.end).equals(sBytes.subarray(t.begin, t.end))).toBe(true);
    }
  });

  it("stores exactly ggml's q8_0 / q4_0 blocks of the generated weights", async () => {
    for (const [dtype, quantize] of [
      ["q8_0", quantizeQ8_0],
      ["q4_0", quantizeQ4_0],
    ] as const) {
      const m = await gen(`exact-${dtype}.gguf`, dtype);
      const h = await readModelHeader(m.path);
      const bytes = await readFile(m.path);
      const spec = ditTensorSpecs(config).find((s) => s.name === "blocks.1.mlp.fc1.weight")!;
      const values = new Float32Array(spec.shape[0]! * spec.shape[1]!);
      generateTensorValues(5, spec, 0, values);
      const t = h.tensors.find((x) => x.name === spec.name)!;
      expect(t.dtype).toBe(dtype);
      expect(bytes.subarray(t.begin, t.end).equals(Buffer.from(quantize(values)))).toBe(true);
    }
  });

  it("is deterministic and reports the quantized data size", async () => {
    const a = await gen("det-a.gguf", "q4_0");
    const b = await gen("det-b.gguf", "q4_0");
    expect((await readFile(a.path)).equals(await readFile(b.path))).toBe(true);
    const h = await readGgufHeader(a.path);
    const stored = h.tensors.reduce((sum, t) => sum + t.bytes, 0);
    expect(genModelSize(config, "q4_0").dataBytes).toBe(stored);
    expect(genModelSize(config, "q4_0").params).toBe(genModelSize(config, "f32").params);
  });

  it("refuses quantized dtypes for safetensors, and bad formats", async () => {
    await expect(gen("never.safetensors", "q8_0")).rejects.toThrow(
      "--dtype q8_0 is a ggml quantized type and needs GGUF: use --format gguf or a .gguf file name",
    );
    await expect(gen("never2.gguf", "q8_0", { format: "safetensors" })).rejects.toThrow(
      /needs GGUF/,
    );
    await expect(gen("never3.bin", "f32", { format: "onnx" })).rejects.toThrow(
      "--format must be one of safetensors, gguf (got onnx)",
    );
    expect((await readdir(dir)).filter((f) => f.startsWith("never"))).toEqual([]);
    // An explicit format wins over the extension.
    const forced = await gen("forced.bin", "q8_0", { format: "gguf" });
    expect((await readGgufHeader(forced.path)).tensors).toHaveLength(25);
  });
});

describe("modelProfileFromFile and runReference on GGUF", () => {
  it("profiles GGUF like safetensors, with the stored (quantized) bytes", async () => {
    const f32g = await modelProfileFromFile((await gen("p.gguf", "f32")).path, {
      batch: 1,
      tokens: 4,
    });
    const f32s = await modelProfileFromFile((await gen("p.safetensors", "f32")).path, {
      batch: 1,
      tokens: 4,
    });
    expect(f32g.segments).toEqual(f32s.segments);
    expect(f32g.name).toBe("p.gguf");
    const bytes = async (dtype: "q8_0" | "q4_0") =>
      (
        await modelProfileFromFile((await gen(`p-${dtype}.gguf`, dtype)).path, {
          batch: 1,
          tokens: 4,
        })
      ).segments.map((s) => [s.name, s.param_bytes]);
    // D = C = 32: a [rows, 32·k] matrix is rows·k blocks; norms and biases are 4 bytes each.
    expect(await bytes("q8_0")).toEqual([
      ["prelude", 32 * 34 + 32 * 4], // embed [32, 32] + bias
      // norm1 128 + qkv 96·34 + bias 384 + out 32·34 + bias 128 + norm2 128
      // + fc1 128·34 + bias 512 + fc2 32·4·34 + bias 128
      ["blocks.0", 128 + 3264 + 384 + 1088 + 128 + 128 + 4352 + 512 + 4352 + 128],
      ["blocks.1", 14464],
      ["final", 128 + 32 * 34 + 128],
    ]);
    expect(await bytes("q4_0")).toEqual([
      ["prelude", 32 * 18 + 128],
      ["blocks.0", 128 + 96 * 18 + 384 + 32 * 18 + 128 + 128 + 128 * 18 + 512 + 128 * 18 + 128],
      ["blocks.1", 8320],
      ["final", 128 + 32 * 18 + 128],
    ]);
  });

  it("refuses a GGUF that is not a Ferry DiT, or breaks its layout", async () => {
    await expect(modelProfileFromFile(LLAMA, { batch: 1, tokens: 1 })).rejects.toThrow(
      /not a Ferry DiT model: "general.architecture" is "llama"/,
    );
    const tensors = genModelGgufTensors(config, "f32", 1);
    const missing = join(dir, "missing.gguf");
    await writeGguf(missing, ditGgufMetadata(config), tensors.slice(0, -1));
    await expect(modelProfileFromFile(missing, { batch: 1, tokens: 1 })).rejects.toThrow(
      /missing\.gguf \(DiT 2 blocks, hidden 32, heads 2, channels 32\): missing tensor "final\.out\.bias"/,
    );
    const k = join(dir, "kquant.gguf");
    await writeGguf(
      k,
      ditGgufMetadata(config),
      tensors.map((t) =>
        t.name === "blocks.0.attn.out.weight"
          ? { ...t, type: "q4_K", ne: [256, 4], data: new Uint8Array(4 * 144) }
          : t,
      ),
    );
    await expect(readModelHeader(k).then((h) => checkDitModelTensors(h, config))).rejects.toThrow(
      /tensor "blocks.0.attn.out.weight" has shape \[4, 256\], expected \[32, 32\]/,
    );
    // A corrupt block count far beyond the file's tensors fails fast, naming the first missing one.
    const huge = join(dir, "huge-blocks.gguf");
    const hugeMeta = ditGgufMetadata(config);
    hugeMeta.set("ferry-dit.blocks", { type: "uint32", value: 4_000_000_000 });
    await writeGguf(huge, hugeMeta, tensors);
    await expect(modelProfileFromFile(huge, { batch: 1, tokens: 1 })).rejects.toThrow(
      /\(DiT 4000000000 blocks, .*\): missing tensor "blocks\.2\.norm1\.weight"/,
    );
    const badMeta = join(dir, "badmeta.gguf");
    const meta = ditGgufMetadata(config);
    meta.set("ferry-dit.heads", { type: "float32", value: 2 });
    await writeGguf(badMeta, meta, tensors);
    await expect(modelProfileFromFile(badMeta, { batch: 1, tokens: 1 })).rejects.toThrow(
      'metadata "ferry-dit.heads" must be a positive integer, got float32 2',
    );
  });

  it("runs the reference on GGUF: f32/f16 exactly as safetensors, q8_0/q4_0 close", async () => {
    const job = { batch: 1, tokens: 4, steps: 2, seed: 3 };
    const zs = await runReference((await gen("r.safetensors", "f32")).path, job);
    const zg = await runReference((await gen("r.gguf", "f32")).path, job);
    expect(Array.from(zg)).toEqual(Array.from(zs));
    const hs = await runReference((await gen("r16.safetensors", "f16")).path, job);
    const hg = await runReference((await gen("r16.gguf", "f16")).path, job);
    expect(Array.from(hg)).toEqual(Array.from(hs));
    const scale = Math.max(...Array.from(zs, Math.abs));
    for (const [dtype, tolerance] of [
      ["q8_0", 0.02],
      ["q4_0", 0.2],
    ] as const) {
      const zq = await runReference((await gen(`r-${dtype}.gguf`, dtype)).path, job);
      const err = Math.max(...Array.from(zq, (v, i) => Math.abs(v - zs[i]!)));
      expect(err).toBeGreaterThan(0);
      expect(err / scale).toBeLessThan(tolerance);
    }
  });

  it("loads quantized weights as ggml dequantizes them", async () => {
    for (const [dtype, q, dq] of [
      ["q8_0", quantizeQ8_0, dequantizeQ8_0],
      ["q4_0", quantizeQ4_0, dequantizeQ4_0],
    ] as const) {
      const w = await loadDitWeights((await gen(`w-${dtype}.gguf`, dtype)).path);
      const spec = ditTensorSpecs(config).find((s) => s.name === "final.out.weight")!;
      const values = new Float32Array(32 * 32);
      generateTensorValues(5, spec, 0, values);
      expect(Array.from(w.tensors.get(spec.name)!)).toEqual(Array.from(dq(q(values))));
      const bias = ditTensorSpecs(config).find((s) => s.name === "final.out.bias")!;
      const biasValues = new Float32Array(32);
      generateTensorValues(5, bias, 0, biasValues);
      expect(Array.from(w.tensors.get(bias.name)!)).toEqual(Array.from(biasValues));
    }
  });
});

describe("ferry gen-model CLI with GGUF", () => {
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
    register(program);
    try {
      await program.parseAsync(["node", "ferry", "gen-model", ...args]);
    } finally {
      vi.restoreAllMocks();
    }
    return { stdout, stderr };
  }

  const small = ["--blocks", "1", "--hidden", "32", "--heads", "2", "--channels", "32"];

  it("picks GGUF from the extension and accepts --dtype q8_0", async () => {
    const path = join(dir, "cli.gguf");
    const { stdout, stderr } = await cli(["--out", path, ...small, "--dtype", "q8_0"]);
    expect(stderr).toBe("");
    expect(process.exitCode).toBeUndefined();
    expect(stdout).toMatch(
      /^wrote .*cli\.gguf: DiT 1 blocks, hidden 32, 2 heads, 32 channels, q8_0 GGUF; /,
    );
    expect((await readModelHeader(path)).format).toBe("gguf");
  });

  it("honours --format over the extension, and refuses bad combinations", async () => {
    const path = join(dir, "cli-forced.model");
    await cli(["--out", path, ...small, "--format", "gguf", "--dtype", "q4_0"]);
    expect((await readModelHeader(path)).format).toBe("gguf");
    const bad = join(dir, "cli-bad.safetensors");
    const { stderr } = await cli(["--out", bad, ...small, "--dtype", "q4_0"]);
    expect(stderr).toContain(
      "ferry gen-model: --dtype q4_0 is a ggml quantized type and needs GGUF",
    );
    expect(process.exitCode).toBe(1);
    process.exitCode = undefined;
    const { stderr: e2 } = await cli(["--out", bad, ...small, "--format", "pt"]);
    expect(e2).toContain("ferry gen-model: --format must be one of safetensors, gguf (got pt)");
    expect(await readdir(dir)).not.toContain("cli-bad.safetensors");
  });
});

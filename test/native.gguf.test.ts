import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { genModel, type GenModelDtype } from "../lib/model/genModel";
import { runReference } from "../lib/model/reference";
import { QUANTIZED_TOLERANCE } from "./referenceTolerance";
import { loadAddon } from "../lib/native/addon";
import type { NativeDevice, NativeDeviceInfoBase } from "../lib/native/AddonTypes";

// The executor reads GGUF files natively (ggml's reader) and computes with any weight type on
// ggml's CPU backend: the same weights give the same bits as safetensors, and quantized files
// match the TypeScript reference (which decodes the same blocks) within the activation type's
// precision.
describe("GGUF models and quantized weights in the native runner", () => {
  const addon = loadAddon();
  const config = { blocks: 2, hidden: 64, heads: 4, channels: 32, seed: 3 };
  const job = { batch: 2, tokens: 8, steps: 2, seed: 0 };
  let dir: string;
  let device: NativeDevice<NativeDeviceInfoBase>;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-gguf-"));
    device = new addon.CpuDevice({ capacityBytes: 64 * 1024 * 1024, threads: 2 });
  });
  afterAll(async () => {
    device?.dispose();
    await rm(dir, { recursive: true, force: true });
  });

  async function runNative(path: string, slots = 0): Promise<Float32Array> {
    const model = await addon.openModel(path);
    try {
      const run = addon.startRun(device, model, {
        ...job,
        segments: model.info().baseSegments.map((_, index) => ({
          firstBase: index,
          lastBase: index,
          resident: false,
        })),
        slots,
      });
      return (await run.done).output;
    } finally {
      model.dispose();
    }
  }

  async function generate(name: string, dtype: GenModelDtype): Promise<string> {
    const path = join(dir, name);
    await genModel(path, { ...config, dtype });
    return path;
  }

  it("reads a GGUF file's tensors and metadata like the safetensors one", async () => {
    const path = await generate("f32.gguf", "f32");
    const model = await addon.openModel(path);
    try {
      const info = model.info();
      expect(info.format).toBe("gguf");
      expect(info.config).toEqual({ hidden: 64, heads: 4, channels: 32, blocks: 2 });
      expect(info.baseSegments.map((s) => s.name)).toEqual([
        "prelude",
        "blocks.0",
        "blocks.1",
        "final",
      ]);
      const qkv = info.tensors.find((t) => t.name === "blocks.0.attn.qkv.weight")!;
      expect(qkv.shape).toEqual([192, 64]);
      expect(qkv.dtype).toBe("f32");
    } finally {
      model.dispose();
    }
  });

  it("gives the same bits for the same f32 weights in GGUF and safetensors", async () => {
    const gguf = await runNative(await generate("same.gguf", "f32"));
    const safetensors = await runNative(await generate("same.safetensors", "f32"));
    expect(Buffer.compare(Buffer.from(gguf.buffer), Buffer.from(safetensors.buffer))).toBe(0);
  });

  for (const dtype of ["q8_0", "q4_0", "f16", "bf16"] as const) {
    const tolerance = QUANTIZED_TOLERANCE[dtype];
    it(`runs ${dtype} weights within ${tolerance} of the reference, the same with overlap`, async () => {
      const path = await generate(`${dtype}.gguf`, dtype);
      const native = await runNative(path);
      const reference = await runReference(path, job);
      let worst = 0;
      for (let i = 0; i < native.length; i++) {
        worst = Math.max(worst, Math.abs(native[i] - reference[i]));
      }
      expect(worst).toBeLessThan(tolerance);
      const overlapped = await runNative(path, 2);
      expect(Buffer.compare(Buffer.from(overlapped.buffer), Buffer.from(native.buffer))).toBe(0);
    });
  }

  it("stays close to the f32 model within quantization error", async () => {
    const f32 = await runNative(await generate("cmp-f32.gguf", "f32"));
    for (const [dtype, tolerance] of [
      ["q8_0", 0.05],
      ["q4_0", 0.3],
    ] as const) {
      const quantized = await runNative(await generate(`cmp-${dtype}.gguf`, dtype));
      let worst = 0;
      for (let i = 0; i < f32.length; i++) worst = Math.max(worst, Math.abs(f32[i] - quantized[i]));
      expect(worst).toBeGreaterThan(0);
      expect(worst).toBeLessThan(tolerance);
    }
  });

  it("refuses a truncated GGUF file with a ModelFormatError naming it", async () => {
    const { open } = await import("node:fs/promises");
    const path = await generate("cut.gguf", "q8_0");
    const fh = await open(path, "r+");
    await fh.truncate(200);
    await fh.close();
    const error = await addon.openModel(path).catch((e: unknown) => e);
    expect((error as Error).name).toBe("ModelFormatError");
    expect((error as Error).message).toContain("cut.gguf");
  });
});

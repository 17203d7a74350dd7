import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadAddon } from "../lib/native/addon";
import type { NativeRunRequest } from "../lib/native/AddonTypes";
import { fluxImageTokens, FLUX_PREFIX } from "../lib/model/flux";
import {
  fluxGeneratedInputs,
  fluxSchedule,
  loadFluxWeights,
  runFluxReference,
  timestepEmbedding,
  type FluxInputs,
  type FluxJob,
} from "../lib/model/fluxReference";
import { genFluxModel, type GenFluxOptions } from "../lib/model/genFlux";
import { checkJobInputs, jobInputSpecs } from "../lib/model/jobInputs";
import { readModelHeader } from "../lib/model/modelFile";
import { modelProfileFromFile } from "../lib/model/segments";
import { writeSafetensors } from "../lib/model/safetensors";
import { planJob } from "../lib/planner/planJob";
import { executionOf } from "../lib/planner/execution";
import { QUANTIZED_TOLERANCE } from "./referenceTolerance";

const addon = loadAddon();
let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "ferry-flux-test-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const job: FluxJob = {
  batch: 2,
  tokens: 6,
  contextTokens: 5,
  steps: 2,
  guidance: 4,
  shift: true,
};

function nativeRequest(
  j: FluxJob,
  segments: NativeRunRequest["segments"],
  inputs?: FluxInputs,
): NativeRunRequest {
  return {
    batch: j.batch,
    tokens: j.tokens,
    contextTokens: j.contextTokens,
    steps: j.steps,
    seed: 0,
    guidance: j.guidance,
    shift: j.shift,
    inputs: inputs && { ...inputs },
    segments,
  };
}

async function runNative(
  path: string,
  j: FluxJob,
  inputs: FluxInputs | undefined,
  plan?: (bases: number) => Pick<NativeRunRequest, "segments" | "execution" | "slots">,
  seed = 0,
): Promise<Float32Array> {
  const model = await addon.openModel(path);
  const device = new addon.CpuDevice({ capacityBytes: 512 << 20, threads: 2 });
  try {
    const bases = model.info().baseSegments.length;
    const shape = plan?.(bases) ?? {
      segments: [{ firstBase: 0, lastBase: bases - 1, resident: false }],
    };
    const out = await addon.startRun(device, model, {
      ...nativeRequest(j, shape.segments, inputs),
      execution: shape.execution,
      slots: shape.slots,
      seed,
    }).done;
    expect(out.shape).toEqual([j.batch, j.tokens, 64]);
    return out.output;
  } finally {
    model.dispose();
    device.dispose();
  }
}

const worstDiff = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
  return worst;
};
const sameBits = (a: Float32Array, b: Float32Array) =>
  Buffer.compare(
    Buffer.from(a.buffer, a.byteOffset, a.byteLength),
    Buffer.from(b.buffer, b.byteOffset, b.byteLength),
  ) === 0;

describe("FLUX.1 reference pieces", () => {
  it("schedule: linspace(1, 0, S+1), and BFL's shift at 256 and 4096 tokens", () => {
    expect(fluxSchedule(4, 4096, false)).toEqual([1, 0.75, 0.5, 0.25, 0]);
    // mu = 0.5 at 256 tokens, 1.15 at 4096: t' = e^mu / (e^mu + 1/t − 1).
    const at256 = fluxSchedule(2, 256, true);
    expect(at256[0]).toBe(1);
    expect(at256[1]).toBeCloseTo(Math.exp(0.5) / (Math.exp(0.5) + 1), 12);
    expect(at256[2]).toBe(0);
    expect(fluxSchedule(2, 4096, true)[1]).toBeCloseTo(Math.exp(1.15) / (Math.exp(1.15) + 1), 12);
  });

  it("timestep embedding: [cos | sin] of t·10000^(−j/128)", () => {
    const e = timestepEmbedding(500);
    expect(e).toHaveLength(256);
    expect(e[0]).toBeCloseTo(Math.cos(500), 4);
    expect(e[128]).toBeCloseTo(Math.sin(500), 4);
    expect(e[64]).toBeCloseTo(Math.cos(500 * Math.pow(10000, -0.5)), 5);
  });

  it("image tokens from pixels: (H/16)·(W/16), a 1024×1024 job has L = 4096", () => {
    expect(fluxImageTokens(1024, 1024)).toBe(4096);
    expect(fluxImageTokens(512, 768)).toBe(32 * 48);
    expect(() => fluxImageTokens(1000, 1024)).toThrow(/--width must be a positive multiple of 16/);
  });
});

// Every supported weight type, [dev] and [schnell], safetensors and GGUF, with and without the
// model.diffusion_model. prefix (a safetensors option: GGUF names stop at 63 bytes).
const CASES: (GenFluxOptions & { label: string; file: string })[] = [
  { label: "f32 schnell safetensors", file: "a.safetensors", dtype: "f32" },
  {
    label: "f32 dev safetensors prefix",
    file: "b.safetensors",
    dtype: "f32",
    guidance: true,
    prefix: true,
  },
  { label: "f16 dev safetensors", file: "c.safetensors", dtype: "f16", guidance: true },
  { label: "bf16 schnell safetensors prefix", file: "d.safetensors", dtype: "bf16", prefix: true },
  { label: "f32 dev gguf", file: "e.gguf", dtype: "f32", guidance: true },
  { label: "f16 schnell gguf", file: "f.gguf", dtype: "f16" },
  { label: "bf16 dev gguf", file: "g.gguf", dtype: "bf16", guidance: true },
  { label: "q8_0 dev gguf", file: "h.gguf", dtype: "q8_0", guidance: true },
  { label: "q8_0 schnell gguf", file: "i.gguf", dtype: "q8_0" },
  { label: "q4_0 dev gguf", file: "j.gguf", dtype: "q4_0", guidance: true },
];

describe("FLUX.1 native forward vs the TypeScript reference", () => {
  it.each(CASES)(
    "$label: agrees within the dtype's tolerance",
    async ({ file, label: _label, ...options }) => {
      const path = join(dir, file);
      await genFluxModel(path, { hidden: 256, depth: 1, depthSingle: 1, seed: 5, ...options });
      const inputs = fluxGeneratedInputs(job, 9);
      const expected = runFluxReference(await loadFluxWeights(path), job, inputs);
      const actual = await runNative(path, job, inputs);
      const tolerance = QUANTIZED_TOLERANCE[options.dtype as keyof typeof QUANTIZED_TOLERANCE];
      expect(worstDiff(actual, expected)).toBeLessThan(tolerance);
      // The model moved the latent: a test of a no-op would pass the line above too.
      expect(worstDiff(actual, inputs.img)).toBeGreaterThan(0.1);
    },
    60_000,
  );

  it("a larger model (2 heads, 2 double + 2 single blocks, 1 step, no shift) agrees too", async () => {
    const path = join(dir, "deep.safetensors");
    await genFluxModel(path, { hidden: 256, depth: 2, depthSingle: 2, guidance: true, seed: 1 });
    const j: FluxJob = { batch: 1, tokens: 4, contextTokens: 3, steps: 1 };
    const inputs = fluxGeneratedInputs(j, 2);
    const expected = runFluxReference(await loadFluxWeights(path), j, inputs);
    expect(worstDiff(await runNative(path, j, inputs), expected)).toBeLessThan(1e-4);
  }, 60_000);

  it("guidance changes a [dev] model's output and not a [schnell] model's", async () => {
    const dev = join(dir, "b.safetensors");
    const schnell = join(dir, "a.safetensors");
    const inputs = fluxGeneratedInputs(job, 9);
    const at = async (path: string, guidance: number) =>
      runNative(path, { ...job, guidance }, inputs);
    expect(worstDiff(await at(dev, 1), await at(dev, 6))).toBeGreaterThan(1e-3);
    expect(sameBits(await at(schnell, 1), await at(schnell, 6))).toBe(true);
  }, 60_000);

  it("inputs absent from the request are generated from the seed as fluxGeneratedInputs says", async () => {
    const path = join(dir, "e.gguf");
    const given = await runNative(path, job, fluxGeneratedInputs(job, 123));
    const generated = await runNative(path, job, undefined, undefined, 123);
    expect(sameBits(given, generated)).toBe(true);
  }, 60_000);
});

describe("FLUX.1 under every plan", () => {
  it("gives the same bits all-resident, streamed one segment at a time, and under the ferry plan with slots", async () => {
    const path = join(dir, "plans.gguf");
    await genFluxModel(path, {
      hidden: 256,
      depth: 2,
      depthSingle: 2,
      guidance: true,
      dtype: "q8_0",
      seed: 3,
    });
    const inputs = fluxGeneratedInputs(job, 4);
    const resident = await runNative(path, job, inputs, (n) => ({
      segments: [{ firstBase: 0, lastBase: n - 1, resident: true }],
      execution: "pooled",
      slots: 1,
    }));
    const streamed = await runNative(path, job, inputs, (n) => ({
      segments: Array.from({ length: n }, (_, i) => ({
        firstBase: i,
        lastBase: i,
        resident: false,
      })),
      execution: "serial",
    }));
    // The ferry policy on a device too small for the model: some segments stream through slots.
    const profile = await modelProfileFromFile(path, job);
    const total = profile.segments.reduce((s, x) => s + x.param_bytes, 0);
    const plan = planJob(
      profile,
      {
        name: "small",
        total_bytes: 128 * 2 ** 20 + total * 0.8,
        free_bytes: 128 * 2 ** 20 + total * 0.8,
        h2d_gbps: 5,
        tflops: 0.001,
        dispatch_us: 20,
      },
      { policy: "ferry", stream: true },
    );
    expect(plan.slots).toBeGreaterThan(0);
    expect(plan.segments.some((s) => !s.resident)).toBe(true);
    const planned = await runNative(path, job, inputs, () => ({
      segments: plan.segments.map((s) => ({
        firstBase: s.base[0],
        lastBase: s.base[1],
        resident: s.resident,
      })),
      execution: executionOf(plan),
      slots: plan.slots,
    }));
    const lookahead = await runNative(path, job, inputs, (n) => ({
      segments: Array.from({ length: n }, (_, i) => ({
        firstBase: i,
        lastBase: i,
        resident: i % 2 === 0,
      })),
      execution: "lookahead",
    }));
    expect(sameBits(resident, streamed)).toBe(true);
    expect(sameBits(resident, planned)).toBe(true);
    expect(sameBits(resident, lookahead)).toBe(true);
  }, 120_000);
});

describe("FLUX.1 files and job inputs", () => {
  it("profiles a FLUX file: the issue's base segments, param bytes as stored, text tokens in the buffers", async () => {
    const path = join(dir, "profile.gguf");
    await genFluxModel(path, {
      hidden: 256,
      depth: 2,
      depthSingle: 1,
      guidance: true,
      dtype: "q8_0",
    });
    const header = await readModelHeader(path);
    expect(header.fluxModel).toEqual({
      config: { hidden: 256, depth: 2, depthSingle: 1, guidance: true },
      prefix: "",
    });
    const short = await modelProfileFromFile(path, { batch: 1, tokens: 16, contextTokens: 8 });
    const long = await modelProfileFromFile(path, { batch: 1, tokens: 16, contextTokens: 64 });
    expect(short.segments.map((s) => s.name)).toEqual([
      "prelude",
      "double_blocks.0",
      "double_blocks.1",
      "single_blocks.0",
      "final",
    ]);
    const stored = header.tensors.reduce((s, t) => s + t.bytes, 0);
    expect(short.segments.reduce((s, x) => s + x.param_bytes, 0)).toBe(stored);
    expect(long.segments[1]!.compute_buffer_bytes).toBeGreaterThan(
      short.segments[1]!.compute_buffer_bytes,
    );
  });

  it("a prefixed checkpoint's other tensors (a VAE) are ignored; a missing one is named", async () => {
    const path = join(dir, "p.safetensors");
    await genFluxModel(path, { hidden: 128, depth: 1, depthSingle: 0, prefix: true });
    const header = await readModelHeader(path);
    const tensors = await Promise.all(
      header.tensors.map(async (t) => ({
        name: t.name,
        dtype: t.dtype as "F32",
        shape: t.shape,
        data: (await readFile(path)).subarray(t.begin, t.end),
      })),
    );
    const withVae = join(dir, "with-vae.safetensors");
    await writeSafetensors(withVae, {}, [
      ...tensors,
      {
        name: "first_stage_model.decoder.conv_in.weight",
        dtype: "F32",
        shape: [4],
        data: new Uint8Array(16),
      },
    ]);
    const profile = await modelProfileFromFile(withVae, { batch: 1, tokens: 4 });
    expect(profile.segments).toHaveLength(3);
    const missing = join(dir, "missing.safetensors");
    await writeSafetensors(
      missing,
      {},
      tensors.filter((t) => t.name !== `${FLUX_PREFIX}double_blocks.0.txt_attn.proj.bias`),
    );
    await expect(modelProfileFromFile(missing, { batch: 1, tokens: 4 })).rejects.toThrow(
      `missing tensor "${FLUX_PREFIX}double_blocks.0.txt_attn.proj.bias"`,
    );
    const native = await addon.openModel(missing).catch((e: Error) => e);
    expect(native).toBeInstanceOf(Error);
    expect((native as Error).message).toContain("double_blocks.0.txt_attn.proj.bias");
  });

  it("request inputs are checked against the model's activations, naming the tensor", async () => {
    const header = await readModelHeader(join(dir, "e.gguf"));
    const specs = jobInputSpecs(header, { batch: 2, tokens: 6, contextTokens: 5 });
    expect(specs.map((s) => [s.name, s.shape])).toEqual([
      ["img", [2, 6, 64]],
      ["txt", [2, 5, 4096]],
      ["vec", [2, 768]],
      ["img_ids", [2, 6, 3]],
    ]);
    const f32 = (n: number) => new Uint8Array(new Float32Array(n).buffer);
    expect(
      checkJobInputs(specs, [{ name: "vec", shape: [2, 768], data: f32(1536) }]).get("vec"),
    ).toHaveLength(1536);
    expect(() =>
      checkJobInputs(specs, [{ name: "txt", shape: [2, 4, 4096], data: f32(2 * 4 * 4096) }]),
    ).toThrow(/input "txt" has shape \[2, 4, 4096\], expected \[2, 5, 4096\]/);
    expect(() => checkJobInputs(specs, [{ name: "vec", shape: [2, 768], data: f32(10) }])).toThrow(
      /input "vec" holds 40 bytes, expected 6144/,
    );
    expect(() => checkJobInputs(specs, [{ name: "z", shape: [1], data: f32(1) }])).toThrow(
      /input "z" is not one this model takes \(img, txt, vec, img_ids\)/,
    );
    const nan = new Float32Array(1536);
    nan[7] = NaN;
    expect(() =>
      checkJobInputs(specs, [{ name: "vec", shape: [2, 768], data: new Uint8Array(nan.buffer) }]),
    ).toThrow(/input "vec" holds a non-finite value at index 7/);
  });

  it("gen-model refuses what it cannot write", async () => {
    await expect(genFluxModel(join(dir, "x.gguf"), { prefix: true })).rejects.toThrow(/63 bytes/);
    await expect(genFluxModel(join(dir, "x.safetensors"), { hidden: 200 })).rejects.toThrow(
      /multiple of 128/,
    );
    await expect(genFluxModel(join(dir, "x.safetensors"), { dtype: "q8_0" })).rejects.toThrow(
      /needs GGUF/,
    );
  });
});

import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  fluxGeneratedInputs,
  loadFluxWeights,
  runFluxReference,
  type FluxJob,
} from "../lib/model/fluxReference";
import type { JobSpec } from "../gen/ferry/v1/scheduler";
import { FerryClientError } from "../lib/client/schedulerClient";
import { genFluxModel } from "../lib/model/genFlux";
import { startCluster, type Cluster } from "../services/cluster/localCluster";
import { QUANTIZED_TOLERANCE } from "./referenceTolerance";
import { runFerry } from "./helpers/ferryProcesses";

// `ferry gen-model --arch flux`, `ferry inspect`, `ferry plan` and `ferry run --inputs` on a FLUX
// file, through a real scheduler and executor process.
describe("a FLUX.1 denoising job end to end", () => {
  let dir: string;
  let cluster: Cluster;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-e2e-flux-"));
    cluster = await startCluster([{ id: "gpu0", vram: "2GiB", threads: 1 }], { modelDirs: [dir] });
  }, 60_000);

  afterAll(async () => {
    await cluster?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it("gen-model writes a FLUX.1-dev GGUF that inspect and plan read from the header", async () => {
    const path = join(dir, "flux-dev.gguf");
    const gen = await runFerry([
      "gen-model",
      "--arch",
      "flux",
      "--hidden",
      "256",
      "--depth",
      "2",
      "--depth-single",
      "1",
      "--guidance",
      "--dtype",
      "q8_0",
      "--out",
      path,
    ]);
    expect(gen.stderr).toBe("");
    expect(gen.stdout).toMatch(
      /FLUX\.1-dev, hidden 256 \(2 heads\), 2 double \+ 1 single blocks, q8_0 GGUF/,
    );
    const inspect = await runFerry(["inspect", path]);
    expect(inspect.code).toBe(0);
    expect(inspect.stdout).toMatch(/general\.architecture\s+string "flux"/);
    expect(inspect.stdout).toContain(
      "FLUX.1-dev, hidden 256 (2 heads), 2 double + 1 single blocks",
    );
    expect(inspect.stdout).toMatch(/double_blocks\.1\s+24/);
    const plan = await runFerry([
      "plan",
      path,
      "--device-memory",
      "1GiB",
      "--width",
      "1024",
      "--height",
      "1024",
      "--txt-tokens",
      "512",
      "--json",
    ]);
    expect(plan.code).toBe(0);
    const json = JSON.parse(plan.stdout) as {
      segments: { base: [number, number]; compute_buffer_bytes: number }[];
    };
    // Five base segments (prelude, 2 double, 1 single, final), buffers for L = 4096, T = 512.
    expect(json.segments.at(-1)!.base[1]).toBe(4);
    expect(Math.max(...json.segments.map((s) => s.compute_buffer_bytes))).toBeGreaterThan(
      50 * 2 ** 20,
    );
  }, 60_000);

  it("ferry run --inputs DIR: the output file is the reference's within tolerance; bad inputs are named", async () => {
    const path = join(dir, "flux-schnell.safetensors");
    await genFluxModel(path, { hidden: 128, depth: 1, depthSingle: 1, seed: 2 });
    const job: FluxJob = { batch: 1, tokens: 16, contextTokens: 4, steps: 2, shift: true };
    const inputs = fluxGeneratedInputs(job, 31);
    const inputDir = join(dir, "inputs");
    await mkdir(inputDir);
    for (const [name, values] of Object.entries(inputs)) {
      await writeFile(join(inputDir, `${name}.bin`), new Uint8Array(values.buffer));
    }
    const out = join(dir, "out.bin");
    const args = ["--scheduler", cluster.client.address, "--model", path, "--inputs", inputDir];
    const run = await runFerry([
      "run",
      ...args,
      "--width",
      "64",
      "--height",
      "64",
      "--steps",
      "2",
      "--shift",
      "--output",
      out,
      "--json",
    ]);
    expect(run.code, run.stderr).toBe(0);
    expect(JSON.parse(run.stdout)).toMatchObject({ output_shape: [1, 16, 64] });
    const bytes = await readFile(out);
    const actual = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
    const expected = runFluxReference(await loadFluxWeights(path), job, inputs);
    let worst = 0;
    for (let i = 0; i < expected.length; i++) {
      worst = Math.max(worst, Math.abs(actual[i]! - expected[i]!));
    }
    expect(worst).toBeLessThan(QUANTIZED_TOLERANCE.f32);

    const wrong = await runFerry(["run", ...args, "--img-tokens", "20", "--steps", "1"]);
    expect(wrong.code).not.toBe(0);
    expect(wrong.stderr).toMatch(/INVALID_ARGUMENT|input "img" holds 4096 bytes, expected 5120/);
    expect(wrong.stderr).toContain('input "img"');
  }, 120_000);

  it("the API checks inputs at submit, defaults FLUX's text tokens to 512, and lists inputs without their bytes", async () => {
    const path = join(dir, "flux-api.safetensors");
    await genFluxModel(path, { hidden: 128, depth: 1, depthSingle: 0, seed: 4 });
    const spec: JobSpec = {
      modelPath: path,
      steps: 1,
      batch: 1,
      tokens: 4,
      seed: 0,
      maxVramGib: undefined,
      policy: "ferry",
      noStream: false,
      executorId: "",
      paramsBackend: "",
      load: "",
      verify: false,
      contextTokens: 0,
      guidance: undefined,
      shift: false,
      inputs: [],
    };
    const vec = (n: number) => Buffer.from(new Float32Array(n).fill(0.5).buffer);
    const refused = await cluster.client
      .runJob({ ...spec, inputs: [{ name: "vec", shape: [1, 768], data: vec(700) }] })
      .catch((error: unknown) => error as FerryClientError);
    expect(refused).toBeInstanceOf(FerryClientError);
    expect((refused as FerryClientError).code).toBe("INVALID_ARGUMENT");
    expect((refused as FerryClientError).message).toContain('input "vec" holds 2800 bytes');
    // Asked for a batch split, a FLUX job gets the single run's bits whether or not it was split.
    const split = await cluster.client.runJob({ ...spec, batch: 2, multiGpu: "batch" });
    const whole = await cluster.client.runJob({ ...spec, batch: 2, multiGpu: "single" });
    expect(Buffer.from(split.output).equals(Buffer.from(whole.output))).toBe(true);
    const result = await cluster.client.runJob({
      ...spec,
      inputs: [{ name: "vec", shape: [1, 768], data: vec(768) }],
    });
    expect(result.outputShape).toEqual([1, 4, 64]);
    const job = await cluster.client.getJob(result.jobId);
    expect(job.spec!.contextTokens).toBe(512);
    expect(job.spec!.inputs).toHaveLength(1);
    expect(job.spec!.inputs[0]).toMatchObject({ name: "vec", shape: [1, 768] });
    expect(job.spec!.inputs[0]!.data).toHaveLength(0);
    const models = await cluster.client.listModels();
    expect(models.find((m) => m.name === "flux-api")).toMatchObject({
      architecture: "flux",
      format: "safetensors",
      error: "",
    });
  }, 60_000);
});

import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { JobState, JobSpec } from "../gen/ferry/v1/scheduler";
import { genModel, type GenModelDtype } from "../lib/model/genModel";
import { loadAddon } from "../lib/native/addon";
import { genFluxModel } from "../lib/model/genFlux";
import { startCluster, type Cluster } from "../services/cluster/localCluster";
import { samplesOf } from "../services/scheduler/scheduler";
import {
  chooseMultiGpu,
  possibleShareSizes,
  shareSizes,
  SPLIT_GAIN,
  type SplitCandidate,
} from "../services/scheduler/multiGpu";

describe("batch split: the cost model's choice", () => {
  const idle = (id: string, runS: (samples: number) => number): SplitCandidate<string> => ({
    id,
    price: (samples) => ({ plan: `${id}:${samples}`, runS: runS(samples), coldLoadS: 0 }),
  });

  it("divides a batch into contiguous shares that differ by at most one sample", () => {
    expect(shareSizes(7, 3)).toEqual([3, 2, 2]);
    expect(shareSizes(8, 4)).toEqual([2, 2, 2, 2]);
    expect(possibleShareSizes(5, 8)).toEqual([1, 2, 3]);
    expect(possibleShareSizes(1, 8)).toEqual([]);
  });

  it("splits a compute-bound job over every idle executor", () => {
    // Compute-bound: a run takes 1 s per sample.
    const decision = chooseMultiGpu({
      mode: "auto",
      batch: 8,
      single: { id: "a", finishS: 8, idle: true },
      idle: ["a", "b", "c", "d"].map((id) => idle(id, (samples) => samples)),
    });
    expect(decision.mode).toBe("batch");
    expect(decision.shares.map((s) => [s.firstSample, s.samples])).toEqual([
      [0, 2],
      [2, 2],
      [4, 2],
      [6, 2],
    ]);
    expect(decision.splitS).toBe(2);
    expect(decision.explanation.at(-1)).toMatch(/chose a batch split over 4: predicted 4.00×/);
  });

  it("keeps a transfer-bound job on one executor and says why", () => {
    // Transfer-bound: 10 s of copies whatever the batch, 0.01 s of compute per sample.
    const decision = chooseMultiGpu({
      mode: "auto",
      batch: 8,
      single: { id: "a", finishS: 10.08, idle: true },
      idle: ["a", "b", "c", "d"].map((id) => idle(id, (samples) => 10 + 0.01 * samples)),
    });
    expect(decision.mode).toBe("single");
    expect(decision.shares).toEqual([]);
    expect(decision.splitS! * SPLIT_GAIN).toBeGreaterThan(decision.singleS!);
    expect(decision.explanation.at(-1)).toMatch(/saves compute, not transfers/);
    // Asked for, it splits anyway.
    const forced = chooseMultiGpu({
      mode: "batch",
      batch: 8,
      single: { id: "a", finishS: 10.08, idle: true },
      idle: ["a", "b"].map((id) => idle(id, (samples) => 10 + 0.01 * samples)),
    });
    expect(forced.mode).toBe("batch");
    expect(forced.shares).toHaveLength(2);
  });

  it("never splits a batch of one, a job asking for one executor, or over one idle executor", () => {
    const one = [idle("a", (s) => s)];
    const two = [idle("a", (s) => s), idle("b", (s) => s)];
    const single = { id: "a", finishS: 4, idle: true };
    expect(chooseMultiGpu({ mode: "auto", batch: 1, single, idle: two }).mode).toBe("single");
    expect(chooseMultiGpu({ mode: "single", batch: 4, single, idle: two }).mode).toBe("single");
    expect(chooseMultiGpu({ mode: "batch", batch: 4, single, idle: one }).mode).toBe("single");
  });

  it("splits a batch that fits no single executor's budget", () => {
    const decision = chooseMultiGpu({
      mode: "auto",
      batch: 4,
      single: undefined,
      idle: ["a", "b"].map((id) => ({
        id,
        price: (samples: number) =>
          samples <= 2 ? { plan: id, runS: samples, coldLoadS: 0 } : undefined,
      })),
    });
    expect(decision.mode).toBe("batch");
    expect(decision.shares.map((s) => s.samples)).toEqual([2, 2]);
  });

  it("cuts input tensors by sample for a share", () => {
    const data = Buffer.from(Float32Array.from({ length: 5 * 6 }, (_, i) => i).buffer);
    const [img] = samplesOf([{ name: "img", shape: [5, 3, 2], data }], 2, 2);
    expect(img.shape).toEqual([2, 3, 2]);
    expect([...new Float32Array(img.data.buffer, img.data.byteOffset, 12)]).toEqual(
      Array.from({ length: 12 }, (_, i) => 12 + i),
    );
  });
});

// ggml's per-row results must not depend on the batch size for a split to be bitwise the single
// run: checked on the native layer directly, for every weight type and two thread counts, with
// shares of unequal size.
describe("batch split: ggml computes each sample alike whatever the batch", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-split-native-"));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  const dtypes: GenModelDtype[] = ["f32", "f16", "bf16", "q8_0", "q4_0"];
  it.each(dtypes)(
    "%s: shares of 2 + 1 + 2 samples are the batch of 5, bit for bit",
    async (dtype) => {
      const addon = loadAddon();
      const path = join(dir, `m-${dtype}.gguf`);
      const channels = 8;
      const tokens = 13;
      await genModel(path, { blocks: 2, hidden: 64, heads: 2, channels, dtype, seed: 3 });
      const model = await addon.openModel(path);
      const whole = new addon.CpuDevice({ capacityBytes: 64 << 20, threads: 2 });
      const part = new addon.CpuDevice({ capacityBytes: 64 << 20, threads: 1 });
      try {
        const n = model.info().baseSegments.length;
        const segments = Array.from({ length: n }, (_, i) => ({
          firstBase: i,
          lastBase: i,
          resident: i === 0,
        }));
        const request = { tokens, steps: 3, segments, slots: 2 };
        const seed = 2 ** 40 + 5;
        const all = await addon.startRun(whole, model, { ...request, batch: 5, seed }).done;
        const expected = Buffer.from(
          all.output.buffer,
          all.output.byteOffset,
          all.output.byteLength,
        );
        const pieces: Buffer[] = [];
        let first = 0;
        for (const samples of [2, 1, 2]) {
          const share = await addon.startRun(part, model, {
            ...request,
            batch: samples,
            seed,
            firstSample: first,
          }).done;
          expect(share.shape).toEqual([samples, tokens, channels]);
          pieces.push(
            Buffer.from(share.output.buffer, share.output.byteOffset, share.output.byteLength),
          );
          first += samples;
        }
        expect(Buffer.concat(pieces).equals(expected)).toBe(true);
      } finally {
        whole.dispose();
        part.dispose();
        model.dispose();
      }
    },
  );

  // FLUX.1's per-sample vector MLPs multiply [B, 256|768] inputs; with B = 1 ggml's f32 kernel
  // rounds differently, so its shares have 2 samples or more (scheduler.ts minShareSamples).
  it.each(["f32", "q8_0"] as GenModelDtype[])(
    "FLUX.1 %s: shares of 2 + 3 samples are the batch of 5, bit for bit, every input generated",
    async (dtype) => {
      const addon = loadAddon();
      const path = join(dir, `flux-${dtype}.gguf`);
      await genFluxModel(path, { hidden: 128, depth: 1, depthSingle: 1, guidance: true, dtype });
      const model = await addon.openModel(path);
      const whole = new addon.CpuDevice({ capacityBytes: 256 << 20, threads: 2 });
      const part = new addon.CpuDevice({ capacityBytes: 256 << 20, threads: 1 });
      try {
        const n = model.info().baseSegments.length;
        const segments = [{ firstBase: 0, lastBase: n - 1, resident: true }];
        const request = { tokens: 16, contextTokens: 8, steps: 2, segments, slots: 1, seed: 11 };
        const all = await addon.startRun(whole, model, { ...request, batch: 5 }).done;
        const expected = Buffer.from(
          all.output.buffer,
          all.output.byteOffset,
          all.output.byteLength,
        );
        const pieces: Buffer[] = [];
        for (const [first, samples] of [
          [0, 2],
          [2, 3],
        ]) {
          const share = await addon.startRun(part, model, {
            ...request,
            batch: samples,
            firstSample: first,
          }).done;
          pieces.push(
            Buffer.from(share.output.buffer, share.output.byteOffset, share.output.byteLength),
          );
        }
        expect(Buffer.concat(pieces).equals(expected)).toBe(true);
        // Without the offset the second share would start from the first's inputs.
        const unshifted = await addon.startRun(part, model, { ...request, batch: 3 }).done;
        expect(
          Buffer.from(
            unshifted.output.buffer,
            unshifted.output.byteOffset,
            unshifted.output.byteLength,
          ).equals(expected.subarray(pieces[0].length)),
        ).toBe(false);
      } finally {
        whole.dispose();
        part.dispose();
        model.dispose();
      }
    },
  );
});

// Three executor processes (different thread counts) on loopback: a job split across them gives
// the single-executor run's output bit for bit, and GetPlan / GetJob say how and why.
describe("batch split across executors", () => {
  let dir: string;
  let cluster: Cluster;

  const spec = (overrides: Partial<JobSpec> = {}): JobSpec =>
    JobSpec.fromPartial({
      modelPath: "split",
      steps: 3,
      batch: 5,
      tokens: 12,
      seed: 9,
      // 2 MiB: the model (3.2 MB) streams on every executor.
      maxVramGib: 2 / 1024,
      policy: "ferry",
      ...overrides,
    });

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-split-"));
    await genModel(join(dir, "split.safetensors"), {
      blocks: 4,
      hidden: 128,
      heads: 4,
      channels: 8,
      seed: 5,
    });
    await genFluxModel(join(dir, "flux.gguf"), { hidden: 128, depth: 1, depthSingle: 1 });
    cluster = await startCluster(
      [
        { id: "gpu0", vram: "1GiB", threads: 1 },
        { id: "gpu1", vram: "1GiB", threads: 2 },
        { id: "gpu2", vram: "1GiB", threads: 1 },
      ],
      { modelDirs: [dir] },
    );
  }, 60_000);

  afterAll(async () => {
    await cluster?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it("gives the single-executor output bit for bit, and GetJob lists the shares", async () => {
    const { client } = cluster;
    const single = await client.runJob(spec({ multiGpu: "single" }));
    expect(single.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    const singleInfo = await client.getJob(single.jobId);
    expect(singleInfo.multiGpu).toBeUndefined();
    expect(singleInfo.plan!.streamedBytesPerStep).toBeGreaterThan(0);

    const split = await client.runJob(spec({ multiGpu: "batch" }));
    expect(split.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    expect(split.outputShape).toEqual(single.outputShape);
    expect(Buffer.from(split.output).equals(Buffer.from(single.output))).toBe(true);
    expect(split.checksum).toBe(single.checksum);

    const info = await client.getJob(split.jobId);
    expect(info.multiGpu?.mode).toBe("batch");
    // Contiguous shares, larger first, on as many executors as the cost model found best.
    const shares = info.multiGpu!.shares;
    expect(shares.length).toBeGreaterThanOrEqual(2);
    expect(shares.reduce((sum, s) => sum + s.samples, 0)).toBe(5);
    let next = 0;
    for (const share of shares) {
      expect(share.firstSample).toBe(next);
      next += share.samples;
    }
    expect(new Set(shares.map((s) => s.executorId)).size).toBe(shares.length);
    for (const share of shares) expect(share.plan!.streamedBytesPerStep).toBeGreaterThan(0);
    // Shares are not jobs of their own to a client.
    const { jobs } = await client.listJobs();
    expect(jobs.map((job) => job.jobId).sort()).toEqual([single.jobId, split.jobId].sort());
  }, 120_000);

  it("splits a FLUX.1 job by sample, its own img input cut by sample too, with the same bits", async () => {
    const { client } = cluster;
    const [B, L, T] = [4, 16, 8];
    const img = Float32Array.from({ length: B * L * 64 }, (_, i) => Math.sin(i) / 2);
    const flux = JobSpec.fromPartial({
      modelPath: "flux",
      steps: 2,
      batch: B,
      tokens: L,
      contextTokens: T,
      seed: 3,
      policy: "ferry",
      inputs: [{ name: "img", shape: [B, L, 64], data: Buffer.from(img.buffer) }],
    });
    const single = await client.runJob({ ...flux, multiGpu: "single" });
    const split = await client.runJob({ ...flux, multiGpu: "batch" });
    expect(Buffer.from(split.output).equals(Buffer.from(single.output))).toBe(true);
    const info = await client.getJob(split.jobId);
    expect(info.multiGpu?.shares.map((s) => s.samples)).toEqual([2, 2]);
    // A share of one FLUX sample would not compute as the batch does: 3 samples stay together.
    const three = await client.getPlan({ ...flux, batch: 3, inputs: [], multiGpu: "batch" });
    expect(three.multiGpu?.mode).toBe("single");
    expect(three.multiGpu!.explanation.join("\n")).toMatch(/shares need 2 samples or more/);
  }, 120_000);

  it("explains in GetPlan what it would do and why", async () => {
    const { client } = cluster;
    const forced = await client.getPlan(spec({ multiGpu: "batch" }));
    expect(forced.multiGpu?.mode).toBe("batch");
    expect(forced.multiGpu!.shares.length).toBeGreaterThanOrEqual(2);
    const lines = forced.multiGpu!.explanation.join("\n");
    expect(lines).toMatch(/one executor: gpu\d finishes in/);
    expect(lines).toMatch(/batch split over 2 \(3 on gpu\d, 2 on gpu\d\)/);
    expect(lines).toMatch(/batch split over 3 \(2 on gpu\d, 2 on gpu\d, 1 on gpu\d\)/);
    expect(forced.multiGpu!.explanation.at(-1)).toMatch(/multi_gpu = batch/);
    expect(forced.executorId).toBe(forced.multiGpu!.shares[0].executorId);

    const auto = await client.getPlan(spec());
    expect(["single", "batch"]).toContain(auto.multiGpu?.mode);
    expect(auto.multiGpu!.explanation.at(-1)).toMatch(/^chose /);
    expect(auto.multiGpu!.singlePredictedS).toBeGreaterThan(0);
    expect(auto.multiGpu!.splitPredictedS).toBeGreaterThan(0);

    const one = await client.getPlan(spec({ batch: 1 }));
    expect(one.multiGpu?.mode).toBe("single");
    expect(one.multiGpu!.explanation.join("\n")).toMatch(
      /batch split: a batch of 1 cannot be split/,
    );
    expect(one.multiGpu!.explanation.at(-1)).toMatch(/^chose one executor: /);

    await expect(client.getPlan(spec({ multiGpu: "diagonal" }))).rejects.toMatchObject({
      code: "INVALID_ARGUMENT",
    });
  }, 60_000);

  it("cancels every share of a cancelled split job and frees the executors", async () => {
    const { client } = cluster;
    const submitted = await client.submitJob(spec({ multiGpu: "batch", steps: 400 }));
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      const info = await client.getJob(submitted.jobId);
      if (info.lastStep > 0) break;
      await new Promise((done) => setTimeout(done, 50));
    }
    await client.cancelJob(submitted.jobId);
    const result = await client.watchUntilDone(submitted.jobId);
    expect(result.state).toBe(JobState.JOB_STATE_CANCELLED);
    // Every executor is free again: a split job after it runs on all three.
    for (;;) {
      const { executors } = await client.listExecutors();
      if (executors.every((e) => e.runningJobId === "")) break;
      await new Promise((done) => setTimeout(done, 50));
    }
    const again = await client.runJob(spec({ multiGpu: "batch", seed: 10 }));
    expect(again.state).toBe(JobState.JOB_STATE_SUCCEEDED);
  }, 120_000);

  it("re-runs the share of an executor killed mid-job elsewhere, and the output keeps its bits", async () => {
    const { client } = cluster;
    const long = spec({ multiGpu: "batch", steps: 150, seed: 11 });
    const single = await client.runJob({ ...long, multiGpu: "single" });
    const submitted = await client.submitJob(long);
    const deadline = Date.now() + 30_000;
    let info = await client.getJob(submitted.jobId);
    while (Date.now() < deadline && info.lastStep === 0) {
      await new Promise((done) => setTimeout(done, 25));
      info = await client.getJob(submitted.jobId);
    }
    expect(info.multiGpu?.mode).toBe("batch");
    const victim = info.multiGpu!.shares.at(-1)!.executorId;
    cluster.executors[Number(victim.slice(3))].kill("SIGKILL");
    const result = await client.watchUntilDone(submitted.jobId, undefined, 120_000);
    expect(result.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    expect(Buffer.from(result.output).equals(Buffer.from(single.output))).toBe(true);
    expect(cluster.logs.join("")).toMatch(new RegExp(`job ${submitted.jobId}\\.\\d queued again`));
  }, 120_000);
});

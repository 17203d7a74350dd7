import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { credentials } from "@grpc/grpc-js";
import { channelCredentials } from "../lib/wire/credentials";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runFerry } from "./helpers/ferryProcesses";
import { makeTestCa, signTestCertificate } from "./helpers/testCertificates";
import { JobState, JobSpec } from "../gen/ferry/v1/scheduler";
import { genModel } from "../lib/model/genModel";
import { startCluster, type Cluster } from "../services/cluster/localCluster";
import {
  HANDOFF_CHUNK_BYTES,
  HandoffSender,
  PeerServer,
  PendingHandoffs,
  type HandoffTensors,
} from "../services/executor/peer";
import {
  balancedRanges,
  bestPipeline,
  chooseMultiGpu,
  HandoffCalibration,
  PEER_HANDOFF_LATENCY_S,
  type StageCandidate,
} from "../services/scheduler/multiGpu";

describe("pipeline split: the cost model's choice", () => {
  // An executor whose budget holds `fitBytes` of weights: a stage that fits keeps them resident
  // (compute only), one that does not streams what is over at `gbps`.
  const executor = (
    id: string,
    bytes: number[],
    fitBytes: number,
    computeSPerByte: number,
    gbps: number,
  ): StageCandidate<string> => ({
    id,
    price: (first, last) => {
      const stage = bytes.slice(first, last + 1).reduce((a, b) => a + b, 0);
      const streamed = Math.max(0, stage - fitBytes);
      return {
        plan: `${id}:${first}-${last}`,
        stepS: Math.max(stage * computeSPerByte, streamed / (gbps * 1e9)),
        coldLoadS: 0,
      };
    },
  });

  it("cuts the model into contiguous ranges of about equal bytes", () => {
    expect(balancedRanges([1, 1, 1, 1], 2)).toEqual([
      [0, 1],
      [2, 3],
    ]);
    expect(balancedRanges([5, 1, 1, 1, 1, 5], 3)).toEqual([
      [0, 0],
      [1, 4],
      [5, 5],
    ]);
    // Every part has at least one element; more parts than elements is no cut at all.
    expect(balancedRanges([1, 1, 1], 3)).toEqual([
      [0, 0],
      [1, 1],
      [2, 2],
    ]);
    expect(balancedRanges([1, 1], 3)).toEqual([]);
  });

  it("pipelines a model that streams on one executor but fits four, and says why", () => {
    const bytes = [10e6, 100e6, 100e6, 100e6, 100e6, 10e6];
    const total = bytes.reduce((a, b) => a + b, 0);
    // 130 MB of budget each: one executor streams 290 MB a step at 1 GB/s (0.29 s); cut in
    // four, every stage is resident and computes 0.1 s of 420 MB in all.
    const candidates = ["g0", "g1", "g2", "g3"].map((id) =>
      executor(id, bytes, 130e6, 0.1 / total, 1),
    );
    const single = candidates[0].price(0, bytes.length - 1)!;
    const steps = 10;
    const decision = chooseMultiGpu({
      mode: "auto",
      batch: 1,
      single: { id: "g0", finishS: steps * single.stepS, idle: true },
      idle: [],
      baseSegments: bytes.length,
      pipeline: { baseBytes: bytes, steps, handoffS: 0.002, candidates },
    });
    expect(decision.mode).toBe("pipeline");
    // Stages in model order cover every base segment once, each on its own executor.
    let next = 0;
    for (const stage of decision.shares) {
      expect(stage.firstBase).toBe(next);
      next = stage.lastBase + 1;
    }
    expect(next).toBe(bytes.length);
    expect(new Set(decision.shares.map((s) => s.executorId)).size).toBe(decision.shares.length);
    expect(decision.splitS).toBeLessThan(decision.singleS! / 2);
    const lines = decision.explanation.join("\n");
    expect(lines).toMatch(/batch split: a batch of 1 cannot be split/);
    expect(lines).toMatch(/pipeline over 2 \(0–2 on g\d, 3–5 on g\d\)/);
    expect(lines).toMatch(/pipeline over 4 .* finishes in/);
    expect(decision.explanation.at(-1)).toMatch(/^chose a pipeline over \d: predicted .*× faster/);
  });

  it("keeps a job on one executor where a pipeline would only add handoffs", () => {
    const bytes = [1e6, 1e6, 1e6, 1e6];
    const candidates = ["g0", "g1"].map((id) => executor(id, bytes, 1e9, 1e-8, 1));
    const single = candidates[0].price(0, 3)!;
    const decision = chooseMultiGpu({
      mode: "auto",
      batch: 1,
      single: { id: "g0", finishS: 5 * single.stepS, idle: true },
      idle: [],
      baseSegments: 4,
      pipeline: { baseBytes: bytes, steps: 5, handoffS: 0.01, candidates },
    });
    expect(decision.mode).toBe("single");
    expect(decision.explanation.at(-1)).toMatch(/only .*× faster/);

    // Asked for, a pipeline runs anyway (and the prediction is still reported).
    const forced = chooseMultiGpu({
      mode: "pipeline",
      batch: 1,
      single: { id: "g0", finishS: 5 * single.stepS, idle: true },
      idle: [],
      baseSegments: 4,
      pipeline: { baseBytes: bytes, steps: 5, handoffS: 0.01, candidates },
    });
    expect(forced.mode).toBe("pipeline");
    expect(forced.explanation.at(-1)).toMatch(/multi_gpu = pipeline/);

    const unavailable = chooseMultiGpu({
      mode: "auto",
      batch: 1,
      single: { id: "g0", finishS: 1, idle: true },
      idle: [],
      baseSegments: 4,
      pipeline: {
        baseBytes: bytes,
        steps: 5,
        handoffS: 0.01,
        candidates,
        unavailable: "the model fits one executor without streaming",
      },
    });
    expect(unavailable.mode).toBe("single");
    expect(unavailable.explanation.join("\n")).toMatch(/pipeline: the model fits one executor/);
  });

  it("learns a handoff's latency from the step period, with one clock and durations only", () => {
    const calibration = new HandoffCalibration();
    expect(calibration.latencyS).toBe(PEER_HANDOFF_LATENCY_S);
    // Two stages of 10 and 5 ms, 4 ms a handoff: the last stage starts a step every 23 ms by
    // its clock; the first stage's clock is 17 s off, and its times are never used.
    const period = 0.005 + 0.01 + 2 * 0.004;
    for (let step = 1; step <= 40; step++) {
      calibration.record("job#1", 2, 0, step, 0.01, 17e6 + step * 1e6, 0);
      calibration.record("job#1", 2, 1, step, 0.005, step * period * 1e6, 0);
    }
    expect(calibration.latencyS).toBeCloseTo(0.004, 4);
    // Bytes are priced apart: the same period with 1 MB handoffs leaves 1 ms less latency.
    const withBytes = new HandoffCalibration();
    for (let step = 1; step <= 40; step++) {
      withBytes.record("job#1", 2, 0, step, 0.01, 0, 1e6);
      withBytes.record("job#1", 2, 1, step, 0.005, step * period * 1e6, 1e6);
    }
    expect(withBytes.latencyS).toBeCloseTo(0.003, 4);
    // A period the durations more than explain is no negative latency.
    const fast = new HandoffCalibration();
    for (let step = 1; step <= 40; step++) {
      fast.record("job#1", 2, 0, step, 0.01, 0, 0);
      fast.record("job#1", 2, 1, step, 0.005, step * 0.01 * 1e6, 0);
    }
    expect(fast.latencyS).toBeCloseTo(0, 4);
  });

  it("skips a cut whose stage fits no idle executor, and prices handoffs every step", () => {
    const bytes = [100, 100, 100, 100];
    // Holds at most 200 bytes: two stages of two segments fit; one of three does not.
    const fitting = (id: string): StageCandidate<string> => ({
      id,
      price: (first, last) =>
        last - first + 1 > 2
          ? undefined
          : { plan: `${id}:${first}-${last}`, stepS: 0.01, coldLoadS: 0.5 },
    });
    const explanation: string[] = [];
    const best = bestPipeline(
      { baseBytes: bytes, steps: 4, handoffS: 0.1, candidates: [fitting("a"), fitting("b")] },
      explanation,
    );
    expect(best!.shares.map((s) => [s.firstBase, s.lastBase])).toEqual([
      [0, 1],
      [2, 3],
    ]);
    // Cold read 0.5 + 4 steps × 2 stages × 0.01 + (4 × 2 − 1) handoffs × 0.1.
    expect(best!.finishS).toBeCloseTo(0.5 + 0.08 + 0.7, 9);
    const none = bestPipeline(
      {
        baseBytes: [100, 100, 100, 100, 100],
        steps: 4,
        handoffS: 0.1,
        candidates: [fitting("a"), fitting("b")],
      },
      [],
    );
    expect(none).toBeUndefined();
  });
});

describe("pipeline handoffs between executors", () => {
  const tensors = (n: number, seed: number): HandoffTensors => ({
    z: Float32Array.from({ length: n }, (_, i) => i * 0.5 + seed),
    h: Float32Array.from({ length: 3 }, (_, i) => -i - seed),
    empty: new Float32Array(0),
  });

  it("carries each step's tensors whole, in order, across chunks", async () => {
    const got: { jobId: string; step: number; tensors: HandoffTensors }[] = [];
    const server = new PeerServer({
      sink: (jobId, step, t) => got.push({ jobId, step, tensors: t }),
      log: () => {},
    });
    const address = await server.listen("127.0.0.1:0");
    const errors: string[] = [];
    const sender = new HandoffSender(
      address,
      "job.s1",
      credentials.createInsecure(),
      undefined,
      (m) => errors.push(m),
    );
    try {
      // 2.5 chunks of floats: the tensor crosses three messages.
      const big = Math.floor((2.5 * HANDOFF_CHUNK_BYTES) / 4);
      sender.send(1, tensors(big, 1));
      sender.send(2, tensors(10, 2));
      sender.close();
      const deadline = Date.now() + 10_000;
      while (got.length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      expect(got.map((g) => [g.jobId, g.step])).toEqual([
        ["job.s1", 1],
        ["job.s1", 2],
      ]);
      expect(
        Buffer.from(got[0].tensors.z.buffer).equals(Buffer.from(tensors(big, 1).z.buffer)),
      ).toBe(true);
      expect([...got[1].tensors.h]).toEqual([-2, -3, -4]);
      expect(got[1].tensors.empty.length).toBe(0);
      expect(errors).toEqual([]);
    } finally {
      server.stop();
    }
  });

  it("refuses handoffs without the token, and the sender hears why", async () => {
    const got: number[] = [];
    const server = new PeerServer({
      sink: (_jobId, step) => got.push(step),
      token: "s3cret",
      log: () => {},
    });
    const address = await server.listen("127.0.0.1:0");
    try {
      const heard = new Promise<string>((resolveHeard) => {
        const sender = new HandoffSender(
          address,
          "job.s0",
          credentials.createInsecure(),
          "wrong",
          resolveHeard,
        );
        sender.send(1, tensors(4, 0));
      });
      expect(await heard).toMatch(/token|UNAUTHENTICATED|authori/i);
      expect(got).toEqual([]);
    } finally {
      server.stop();
    }
  });

  it("speaks TLS between executors, checking the name every executor's certificate carries", async () => {
    const tls = await mkdtemp(join(tmpdir(), "ferry-peer-tls-"));
    try {
      makeTestCa(tls);
      signTestCertificate(tls, "peer", "executor", [
        "subjectAltName=DNS:ferry-executor",
        "extendedKeyUsage=serverAuth,clientAuth",
      ]);
      const files = {
        caFile: join(tls, "ca.crt"),
        certFile: join(tls, "peer.crt"),
        keyFile: join(tls, "peer.key"),
      };
      const got: number[] = [];
      const server = new PeerServer({
        sink: (_jobId, step) => got.push(step),
        tls: { certFile: files.certFile, keyFile: files.keyFile, clientCaFile: files.caFile },
        log: () => {},
      });
      const address = await server.listen("127.0.0.1:0");
      try {
        const send = (tlsName: string | undefined) =>
          new Promise<string>((resolveSent) => {
            const sender = new HandoffSender(
              address,
              "job.s1",
              channelCredentials(files),
              undefined,
              (message) => resolveSent(`error: ${message}`),
              tlsName,
            );
            sender.send(1, tensors(8, 1));
            sender.close();
            const started = Date.now();
            const poll = setInterval(() => {
              if (got.length > 0 || Date.now() - started > 10_000) {
                clearInterval(poll);
                resolveSent(got.length > 0 ? "delivered" : "nothing");
              }
            }, 10);
          });
        // 127.0.0.1 is not a name the certificate carries; ferry-executor is.
        expect(await send(undefined)).toMatch(/^error: /);
        expect(got).toEqual([]);
        expect(await send("ferry-executor")).toBe("delivered");
      } finally {
        server.stop();
      }
    } finally {
      await rm(tls, { recursive: true, force: true });
    }
  });

  it("keeps handoffs for jobs not started yet, within bounds", () => {
    const pending = new PendingHandoffs(100, 1000);
    const four = { z: new Float32Array(10) }; // 40 bytes
    expect(pending.add("a", 1, four, 0)).toBe(true);
    expect(pending.add("a", 2, four, 0)).toBe(true);
    // A third would pass 100 bytes.
    expect(pending.add("b", 1, four, 0)).toBe(false);
    expect(pending.take("a").map((h) => h.step)).toEqual([1, 2]);
    expect(pending.heldBytes).toBe(0);
    expect(pending.add("c", 1, four, 0)).toBe(true);
    // Expired after its age: dropped when the next one comes.
    expect(pending.add("d", 1, four, 5000)).toBe(true);
    expect(pending.take("c")).toEqual([]);
  });
});

// Three executor processes on loopback, each with a budget too small for the model: cut in
// stages, every stage keeps its weights resident, and activations go executor to executor.
describe("pipeline split across executors", () => {
  let dir: string;
  let cluster: Cluster;

  const spec = (overrides: Partial<JobSpec> = {}): JobSpec =>
    JobSpec.fromPartial({
      modelPath: "pipe",
      steps: 4,
      batch: 2,
      tokens: 12,
      seed: 21,
      // 2 MiB: the model (3.2 MB) streams on one executor and fits two or three.
      maxVramGib: 2 / 1024,
      policy: "ferry",
      ...overrides,
    });

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-pipe-"));
    await genModel(join(dir, "pipe.safetensors"), {
      blocks: 4,
      hidden: 128,
      heads: 4,
      channels: 8,
      seed: 6,
    });
    cluster = await startCluster(
      [
        { id: "gpu0", vram: "1GiB", threads: 1, linkGbps: 0.5 },
        { id: "gpu1", vram: "1GiB", threads: 2, linkGbps: 0.5 },
        { id: "gpu2", vram: "1GiB", threads: 1, linkGbps: 0.5 },
      ],
      { modelDirs: [dir] },
    );
  }, 60_000);

  afterAll(async () => {
    await cluster?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it("gives the single-executor output bit for bit, and GetJob lists the stages", async () => {
    const { client } = cluster;
    const { executors } = await client.listExecutors();
    for (const e of executors) expect(e.peerAddress).toMatch(/^127\.0\.0\.1:\d+$/);

    const single = await client.runJob(spec({ multiGpu: "single" }));
    expect(single.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    expect((await client.getJob(single.jobId)).plan!.streamedBytesPerStep).toBeGreaterThan(0);

    const piped = await client.runJob(spec({ multiGpu: "pipeline" }));
    expect(piped.error?.message ?? "").toBe("");
    expect(piped.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    expect(piped.outputShape).toEqual(single.outputShape);
    expect(Buffer.from(piped.output).equals(Buffer.from(single.output))).toBe(true);
    expect(piped.checksum).toBe(single.checksum);

    const info = await client.getJob(piped.jobId);
    expect(info.multiGpu?.mode).toBe("pipeline");
    const stages = info.multiGpu!.shares;
    expect(stages.length).toBeGreaterThanOrEqual(2);
    let next = 0;
    for (const stage of stages) {
      expect(stage.firstBase).toBe(next);
      next = stage.lastBase + 1;
      // Each stage's plan covers its own base segments, and keeps them all resident.
      expect(stage.plan!.segments[0].firstBase).toBe(stage.firstBase);
      expect(stage.plan!.segments.at(-1)!.lastBase).toBe(stage.lastBase);
      expect(stage.plan!.streamedBytesPerStep).toBe(0);
    }
    expect(next).toBe(stages[0].plan!.baseSegmentNames.length);
    expect(new Set(stages.map((s) => s.executorId)).size).toBe(stages.length);
    // Stages are not jobs of their own to a client.
    const { jobs } = await client.listJobs();
    expect(jobs.map((job) => job.jobId).sort()).toEqual([single.jobId, piped.jobId].sort());
    // `ferry jobs get` says how the job ran.
    const shown = await runFerry([
      "jobs",
      "get",
      piped.jobId,
      "--scheduler",
      cluster.server.address,
    ]);
    expect(shown.code).toBe(0);
    expect(shown.stdout).toMatch(
      new RegExp(`pipeline over ${stages.length}: base segments 0–\\d+ on gpu\\d`),
    );
  }, 120_000);

  it("explains in GetPlan what it would do and why", async () => {
    const { client } = cluster;
    const auto = await client.getPlan(spec());
    const lines = auto.multiGpu!.explanation.join("\n");
    expect(lines).toMatch(/one executor: gpu\d finishes in/);
    expect(lines).toMatch(/pipeline over 2 \(0–\d on gpu\d, \d–\d on gpu\d\)/);
    expect(lines).toMatch(/pipeline over 3/);
    expect(auto.multiGpu!.explanation.at(-1)).toMatch(/^chose /);
    expect(auto.multiGpu!.singlePredictedS).toBeGreaterThan(0);

    // Where the model fits one executor, a pipeline is not worth it.
    const roomy = await client.getPlan(spec({ maxVramGib: 1, batch: 1 }));
    expect(roomy.multiGpu?.mode).toBe("single");
    expect(roomy.multiGpu!.explanation.join("\n")).toMatch(
      /pipeline: the model fits one executor without streaming/,
    );
  }, 60_000);

  it("runs the whole pipeline again when a stage's executor is killed, and the output keeps its bits", async () => {
    const { client } = cluster;
    const long = spec({ multiGpu: "pipeline", steps: 200, seed: 23 });
    const single = await client.runJob({ ...long, multiGpu: "single" });
    const submitted = await client.submitJob(long);
    const deadline = Date.now() + 30_000;
    let info = await client.getJob(submitted.jobId);
    while (Date.now() < deadline && info.lastStep === 0) {
      await new Promise((done) => setTimeout(done, 25));
      info = await client.getJob(submitted.jobId);
    }
    expect(info.multiGpu?.mode).toBe("pipeline");
    const victim = info.multiGpu!.shares.at(-1)!.executorId;
    cluster.executors[Number(victim.slice(3))].kill("SIGKILL");
    const result = await client.watchUntilDone(submitted.jobId, undefined, 120_000);
    expect(result.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    expect(Buffer.from(result.output).equals(Buffer.from(single.output))).toBe(true);
    expect(cluster.logs.join("")).toMatch(
      new RegExp(`job ${submitted.jobId} queued again: pipeline stage \\d`),
    );
  }, 180_000);
});

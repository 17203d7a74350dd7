import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { JobState, JobSpec, type StepStats } from "../gen/ferry/v1/scheduler";
import { FerryClientError, SchedulerClient } from "../lib/client/schedulerClient";
import { genModel } from "../lib/model/genModel";
import { RESULT_STEPS, PROGRESS_HISTORY } from "../lib/wire/limits";
import { startSchedulerServer, type SchedulerServer } from "../services/scheduler/server";
import { FakeExecutor } from "./helpers/fakeExecutor";

const codeOf = (error: unknown) => (error as FerryClientError).code;

// Jobs through the real API with scripted executors: queueing, priorities, idempotency, the job
// verbs, retention and bounds.
describe("jobs", () => {
  let dir: string;
  let modelPath: string;
  let server: SchedulerServer;
  let client: SchedulerClient;
  const fakes: FakeExecutor[] = [];

  const spec = (overrides: Partial<JobSpec> = {}): JobSpec =>
    JobSpec.fromPartial({
      modelPath,
      steps: 3,
      batch: 1,
      tokens: 8,
      seed: 0,
      policy: "sdcpp",
      ...overrides,
    });
  const executor = async (id: string) => {
    const fake = new FakeExecutor(server.address, id);
    fakes.push(fake);
    await fake.connect();
    return fake;
  };

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-jobs-"));
    modelPath = join(dir, "tiny.safetensors");
    await genModel(modelPath, { blocks: 2, hidden: 32, heads: 2, channels: 4 });
    server = await startSchedulerServer({
      listen: "127.0.0.1:0",
      modelDirs: [dir],
      heartbeatIntervalMs: 100,
      retentionMs: 1500,
      log: () => {},
    });
    client = new SchedulerClient(server.address);
  });

  afterEach(() => {
    for (const fake of fakes.splice(0)) fake.close();
  });

  afterAll(async () => {
    client?.close();
    await server?.close(100);
    await rm(dir, { recursive: true, force: true });
  });

  it("queues when every executor is busy, then starts by priority, FIFO within one", async () => {
    const gpu = await executor("prio-gpu");
    const blocker = await client.submitJob(spec());
    expect(blocker.executorId).toBe("prio-gpu");
    await gpu.nextRun();
    const low1 = await client.submitJob(spec({ seed: 1 }), { priority: -5 });
    const high1 = await client.submitJob(spec({ seed: 2 }), { priority: 10 });
    const mid = await client.submitJob(spec({ seed: 3 }));
    const high2 = await client.submitJob(spec({ seed: 4 }), { priority: 10 });
    const low2 = await client.submitJob(spec({ seed: 5 }), { priority: -5 });
    for (const queued of [low1, high1, mid, high2, low2]) {
      expect(queued.state).toBe(JobState.JOB_STATE_QUEUED);
      expect(queued.executorId).toBe("");
      // The plan it would get is there already.
      expect(queued.plan?.segments.length).toBeGreaterThan(0);
    }
    const order: string[] = [];
    gpu.succeed(blocker.jobId);
    for (let i = 0; i < 5; i++) {
      const run = await gpu.nextRun();
      order.push(run.jobId);
      gpu.succeed(run.jobId);
    }
    expect(order).toEqual([high1, high2, mid, low1, low2].map((s) => s.jobId));
    const { jobs } = await client.listJobs({ states: [JobState.JOB_STATE_SUCCEEDED] });
    expect(jobs.map((j) => j.jobId)).toEqual(
      expect.arrayContaining([blocker, ...order].map((j) => (typeof j === "string" ? j : j.jobId))),
    );
  });

  it("returns the same job for a retried submit with the same idempotency key", async () => {
    const gpu = await executor("idem-gpu");
    const first = await client.submitJob(spec({ seed: 9 }), { idempotencyKey: "order-42" });
    const retry = await client.submitJob(spec({ seed: 9 }), { idempotencyKey: "order-42" });
    expect(retry.jobId).toBe(first.jobId);
    expect(retry.existing).toBe(true);
    expect(first.existing).toBe(false);
    // The same key for another request is a mistake, not a new job.
    const other = await client
      .submitJob(spec({ seed: 10 }), { idempotencyKey: "order-42" })
      .catch((e: unknown) => e);
    expect(codeOf(other)).toBe("ALREADY_EXISTS");
    expect((other as Error).message).toContain(first.jobId);
    const run = await gpu.nextRun();
    expect(run.jobId).toBe(first.jobId);
    gpu.succeed(run.jobId);
    await client.watchJob(first.jobId);
    expect(gpu.runs).toHaveLength(1);
  });

  it("GetJob, ListJobs by state, and a late WatchJob that gets the final result", async () => {
    const gpu = await executor("verbs-gpu");
    const submitted = await client.submitJob(spec({ steps: 2 }));
    const queued = await client.submitJob(spec({ steps: 2, seed: 1 }));
    const run = await gpu.nextRun();
    gpu.started(run.jobId);
    gpu.progress(run.jobId, 1, 2);
    await gpu.waitFor(() => true);
    const running = await client.listJobs({ states: [JobState.JOB_STATE_RUNNING] });
    expect(running.jobs.map((j) => j.jobId)).toContain(submitted.jobId);
    const waiting = await client.listJobs({ states: [JobState.JOB_STATE_QUEUED] });
    expect(waiting.jobs.map((j) => j.jobId)).toEqual([queued.jobId]);
    expect(await client.cancelJob(queued.jobId)).toBe(JobState.JOB_STATE_CANCELLED);
    gpu.succeed(run.jobId);
    const final = await client.watchJob(submitted.jobId);
    // Watching after it finished: the final state and output, at once.
    const late = await client.watchJob(submitted.jobId);
    expect(late.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    expect(Buffer.compare(late.output, final.output)).toBe(0);
    const info = await client.getJob(submitted.jobId);
    expect(info.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    expect(info.executorId).toBe("verbs-gpu");
    expect(info.startedMs).toBeGreaterThanOrEqual(info.submittedMs);
    expect(info.finishedMs).toBeGreaterThanOrEqual(info.startedMs);
    expect(info.checksum).toBe("c0ffee");
    // Paging: one at a time, oldest first.
    const page1 = await client.listJobs({ pageSize: 1 });
    const page2 = await client.listJobs({ pageSize: 1, pageToken: page1.nextPageToken });
    expect(page1.jobs).toHaveLength(1);
    expect(page2.jobs[0].submittedMs).toBeGreaterThanOrEqual(page1.jobs[0].submittedMs);
  });

  it("drops finished jobs once their retention has passed", async () => {
    const gpu = await executor("retention-gpu");
    const submitted = await client.submitJob(spec({ seed: 77 }), {
      idempotencyKey: "kept-a-while",
    });
    gpu.succeed((await gpu.nextRun()).jobId);
    await client.watchJob(submitted.jobId);
    const deadline = Date.now() + 15_000;
    let error: unknown;
    while (Date.now() < deadline) {
      error = await client.getJob(submitted.jobId).then(
        () => undefined,
        (e: unknown) => e,
      );
      if (error) break;
      await new Promise((done) => setTimeout(done, 200));
    }
    expect(codeOf(error)).toBe("NOT_FOUND");
    expect((error as Error).message).toMatch(/kept for/);
    // The key is free again with its job.
    const again = await client.submitJob(spec({ seed: 77 }), { idempotencyKey: "kept-a-while" });
    expect(again.jobId).not.toBe(submitted.jobId);
    gpu.succeed((await gpu.nextRun()).jobId);
  });

  it("bounds a long job's history: recent progress for watchers, first and last steps in the result", async () => {
    const gpu = await executor("long-gpu");
    const submitted = await client.submitJob(spec({ steps: 5000 }));
    const run = await gpu.nextRun();
    for (let step = 1; step <= 300; step++) gpu.progress(run.jobId, step, 5000);
    while ((await client.getJob(submitted.jobId)).lastStep < 300) {
      await new Promise((done) => setTimeout(done, 50));
    }
    let replayed = 0;
    const watch = client.watchJob(submitted.jobId, () => replayed++);
    await new Promise((done) => setTimeout(done, 300));
    expect(replayed).toBe(PROGRESS_HISTORY);
    const stats = (step: number): StepStats => ({
      step,
      stepSeconds: 0,
      prepareSeconds: 0,
      h2dSeconds: 0,
      computeSeconds: 0,
      h2dBytes: 0,
      diskBytes: 0,
      arenaPeakBytes: 0,
      segments: [],
      stallSeconds: 0,
      startUs: 0,
      endUs: 0,
      events: [],
    });
    const steps = Array.from({ length: 5000 }, (_, i) => stats(i + 1));
    gpu.succeed(run.jobId, { steps });
    const result = await watch;
    expect(result.steps).toHaveLength(RESULT_STEPS);
    expect(result.stepsOmitted).toBe(5000 - RESULT_STEPS);
    expect(result.steps[0].step).toBe(1);
    expect(result.steps[result.steps.length - 1].step).toBe(5000);
  });

  it("range-checks every number and length, quoting at most a short prefix", async () => {
    await executor("range-gpu");
    const cases: [Partial<JobSpec>, RegExp][] = [
      [{ maxVramGib: 1e11 }, /max_vram_gib/],
      [{ maxVramGib: Number.NaN }, /max_vram_gib/],
      [{ steps: 0 }, /steps/],
      [{ steps: 2_000_000 }, /steps/],
      [{ batch: 100_000 }, /batch/],
      [{ tokens: 1 << 30 }, /tokens/],
      [{ policy: "p".repeat(100_000) }, /policy/],
      [{ executorId: "e".repeat(100_000) }, /executor_id/],
    ];
    for (const [overrides, pattern] of cases) {
      const error = await client.submitJob(spec(overrides)).catch((e: unknown) => e);
      expect(codeOf(error), JSON.stringify(overrides).slice(0, 80)).toBe("INVALID_ARGUMENT");
      expect((error as Error).message).toMatch(pattern);
      expect((error as Error).message.length).toBeLessThan(300);
    }
    const priority = await client.submitJob(spec(), { priority: 5000 }).catch((e: unknown) => e);
    expect(codeOf(priority)).toBe("INVALID_ARGUMENT");
    const key = await client
      .submitJob(spec(), { idempotencyKey: "k".repeat(10_000) })
      .catch((e: unknown) => e);
    expect(codeOf(key)).toBe("INVALID_ARGUMENT");
    const path = await client
      .submitJob(spec({ modelPath: `/${"a".repeat(10_000_000)}` }))
      .catch((e: unknown) => e);
    expect(codeOf(path)).toBe("INVALID_ARGUMENT");
    expect((path as Error).message.length).toBeLessThan(300);
    // An output bigger than a result may carry is refused up front.
    const huge = await client
      .submitJob(spec({ batch: 4096, tokens: 1 << 20 }))
      .catch((e: unknown) => e);
    expect(codeOf(huge)).toBe("INVALID_ARGUMENT");
    expect((huge as Error).message).toMatch(/output would be/);
    const page = await client.listJobs({ pageSize: 5000 }).catch((e: unknown) => e);
    expect(codeOf(page)).toBe("INVALID_ARGUMENT");
    // A uint64 past 2^53 cannot be decoded into a number: refused, not INTERNAL.
    const seed = await client.submitJob(spec({ seed: 2 ** 60 })).catch((e: unknown) => e);
    expect(codeOf(seed)).toBe("INVALID_ARGUMENT");
    expect((seed as Error).message).toMatch(/could not be decoded/);
  });

  it("refuses a job that fits no executor's budget with RESOURCE_EXHAUSTED", async () => {
    await executor("small-gpu");
    const error = await client
      .submitJob(spec({ maxVramGib: 0.001 / 1024, executorId: "small-gpu" }))
      .catch((e: unknown) => e);
    expect(codeOf(error)).toBe("RESOURCE_EXHAUSTED");
  });
});

import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { status } from "@grpc/grpc-js";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { ExecutorState, JobState, JobSpec } from "../gen/ferry/v1/scheduler";
import { SchedulerClient } from "../lib/client/schedulerClient";
import { genModel } from "../lib/model/genModel";
import { startSchedulerServer, type SchedulerServer } from "../services/scheduler/server";
import { FakeExecutor } from "./helpers/fakeExecutor";

// The executor registry over real gRPC streams, with scripted executors (no device needed).
describe("the executor registry", () => {
  let dir: string;
  let modelPath: string;
  let server: SchedulerServer;
  let client: SchedulerClient;
  const fakes: FakeExecutor[] = [];
  const logs: string[] = [];

  const fake = (
    ...args: ConstructorParameters<typeof FakeExecutor> extends [string, ...infer R] ? R : never
  ) => {
    const executor = new FakeExecutor(server.address, ...args);
    fakes.push(executor);
    return executor;
  };
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

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-registry-"));
    modelPath = join(dir, "tiny.safetensors");
    await genModel(modelPath, { blocks: 2, hidden: 32, heads: 2, channels: 4 });
    server = await startSchedulerServer({
      listen: "127.0.0.1:0",
      modelDirs: [dir],
      heartbeatIntervalMs: 100,
      heartbeatMissLimit: 5,
      log: (line) => logs.push(line),
    });
    client = new SchedulerClient(server.address);
  });

  afterEach(() => {
    for (const executor of fakes.splice(0)) executor.close();
  });

  afterAll(async () => {
    client?.close();
    await server?.close(100);
    await rm(dir, { recursive: true, force: true });
  });

  it("refuses another connection that claims a connected executor's id", async () => {
    const real = fake("gpu-a");
    await real.connect();
    const impostor = fake("gpu-a");
    const error = await impostor.connect().catch((e: unknown) => e);
    expect((error as { code: number }).code).toBe(status.ALREADY_EXISTS);
    expect((error as Error).message).toMatch(/held by a connected executor/);
    // The real one is untouched and still gets work.
    const submitted = await client.submitJob(spec());
    expect(submitted.executorId).toBe("gpu-a");
    expect((await real.nextRun()).jobId).toBe(submitted.jobId);
    expect(real.ended).toBe(false);
    real.succeed(submitted.jobId);
    expect((await client.watchJob(submitted.jobId)).state).toBe(JobState.JOB_STATE_SUCCEEDED);
  });

  it("ignores a result for a job from an executor it was not sent to", async () => {
    const a = fake("gpu-b");
    await a.connect();
    const submitted = await client.submitJob(spec({ executorId: "gpu-b" }));
    await a.nextRun();
    const rogue = fake("rogue");
    await rogue.connect();
    rogue.succeed(submitted.jobId, { checksum: "deadbeef" });
    await rogue.waitFor(() => rogue.received.some((m) => m.message?.$case === "resultReceived"));
    expect((await client.getJob(submitted.jobId)).state).toBe(JobState.JOB_STATE_RUNNING);
    expect(logs.join("\n")).toMatch(/ignored a result for job .* from executor rogue/);
    a.succeed(submitted.jobId);
    const result = await client.watchJob(submitted.jobId);
    expect(result.checksum).toBe("c0ffee");
    expect(result.executorId).toBe("gpu-b");
  });

  it("resumes an executor that reconnects with the same identity, its job still running", async () => {
    const a = fake("gpu-c");
    await a.connect();
    const submitted = await client.submitJob(spec({ executorId: "gpu-c" }));
    await a.nextRun();
    a.started(submitted.jobId);
    a.drop();
    await new Promise((done) => setTimeout(done, 150));
    const listed = (await client.listExecutors()).executors.find((e) => e.executorId === "gpu-c");
    expect(listed?.state).toBe(ExecutorState.EXECUTOR_STATE_DISCONNECTED);
    // The same process (same instance) comes back, still running the job.
    a.running = [submitted.jobId];
    await a.connect();
    a.progress(submitted.jobId, 3, 3);
    a.succeed(submitted.jobId);
    const result = await client.watchJob(submitted.jobId);
    expect(result.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    expect((await client.getJob(submitted.jobId)).attempts).toBe(1);
  });

  it("re-runs the job of an executor that comes back as a new process without it", async () => {
    const a = fake("gpu-d");
    await a.connect();
    const submitted = await client.submitJob(spec({ executorId: "gpu-d" }));
    await a.nextRun();
    a.drop();
    // A new instance with the same id (restarted by its supervisor): it runs nothing.
    const again = fake("gpu-d");
    await again.connect();
    const rerun = await again.nextRun();
    expect(rerun.jobId).toBe(submitted.jobId);
    again.succeed(submitted.jobId);
    expect((await client.watchJob(submitted.jobId)).state).toBe(JobState.JOB_STATE_SUCCEEDED);
    expect((await client.getJob(submitted.jobId)).attempts).toBe(2);
  });

  it("fails a job whose executor keeps dying, after its last attempt, saying so", async () => {
    let executor = fake("gpu-f");
    await executor.connect();
    const submitted = await client.submitJob(spec());
    for (let attempt = 1; attempt <= 3; attempt++) {
      expect((await executor.nextRun()).jobId).toBe(submitted.jobId);
      executor.drop();
      // Each time a new process with the id comes back without the job.
      executor = fake("gpu-f");
      await executor.connect();
    }
    const result = await client.watchJob(submitted.jobId);
    expect(result.state).toBe(JobState.JOB_STATE_FAILED);
    expect(result.error?.code).toBe("UNAVAILABLE");
    expect(result.error?.message).toMatch(/gpu-f came back without the job.*attempt 3 of 3/);
  });

  it("marks a silent executor lost and lists devices, memory and models", async () => {
    const a = fake("gpu-e", undefined, { name: "fake-e", totalBytes: 1 << 30 });
    a.models = [{ path: modelPath, hostCacheBytes: 1234, pinned: true }];
    await a.connect(50);
    const listed = (await client.listExecutors()).executors.find((e) => e.executorId === "gpu-e")!;
    expect(listed.device?.name).toBe("fake-e");
    expect(listed.state).toBe(ExecutorState.EXECUTOR_STATE_CONNECTED);
    expect(listed.freeBytes).toBe(1 << 30);
    expect(listed.warmModels).toEqual(["tiny"]);
    expect(listed.models[0].hostCacheBytes).toBe(1234);
    const pinned = await client.submitJob(spec({ executorId: "gpu-e" }));
    await a.nextRun();
    a.drop();
    // 5 missed 100 ms heartbeats.
    await new Promise((done) => setTimeout(done, 900));
    const lost = (await client.listExecutors()).executors.find((e) => e.executorId === "gpu-e")!;
    expect(lost.state).toBe(ExecutorState.EXECUTOR_STATE_LOST);
    expect(logs.join("\n")).toMatch(/executor gpu-e lost/);
    // Its job asked for it: it fails, naming the executor, rather than wait forever.
    const failed = await client.watchJob(pinned.jobId);
    expect(failed.state).toBe(JobState.JOB_STATE_FAILED);
    expect(failed.error?.code).toBe("UNAVAILABLE");
    expect(failed.error?.message).toMatch(/gpu-e/);
  });

  it("checks Register: a device is required and every number is range-checked", async () => {
    const noDevice = fake("bad-1", undefined, { totalBytes: 0 });
    const error = await noDevice.connect().catch((e: unknown) => e);
    expect((error as { code: number }).code).toBe(status.INVALID_ARGUMENT);
    expect((error as Error).message).toMatch(/device\.total_bytes/);
    const badRate = fake("bad-2", undefined, { h2dGbps: Number.NaN });
    expect(((await badRate.connect().catch((e: unknown) => e)) as { code: number }).code).toBe(
      status.INVALID_ARGUMENT,
    );
    const badId = fake("../../etc/passwd");
    const idError = await badId.connect().catch((e: unknown) => e);
    expect((idError as { code: number }).code).toBe(status.INVALID_ARGUMENT);
    const longId = fake("x".repeat(10_000));
    const longError = (await longId.connect().catch((e: unknown) => e)) as Error;
    expect(longError.message.length).toBeLessThan(300);
  });
});

import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ExecutorState, JobState, JobSpec } from "../gen/ferry/v1/scheduler";
import { FerryClientError, SchedulerClient } from "../lib/client/schedulerClient";
import { genModel } from "../lib/model/genModel";
import { startSchedulerServer } from "../services/scheduler/server";
import { startCluster, type Cluster } from "../services/cluster/localCluster";

const baseSpec = (modelPath: string, overrides: Partial<JobSpec> = {}): JobSpec =>
  JobSpec.fromPartial({
    modelPath,
    steps: 2,
    batch: 1,
    tokens: 8,
    seed: 0,
    policy: "sdcpp",
    ...overrides,
  });

const codeOf = (error: unknown) => (error as FerryClientError).code;

describe("bad input and failures get clear errors, and no job is lost", () => {
  let dir: string;
  let modelPath: string;
  let cluster: Cluster;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-failures-"));
    modelPath = join(dir, "tiny.safetensors");
    await genModel(modelPath, { blocks: 2, hidden: 32, heads: 2, channels: 4 });
    cluster = await startCluster(
      [
        { id: "a-gpu", vram: "2GiB" },
        { id: "b-gpu", vram: "2GiB" },
      ],
      {
        modelDirs: [dir],
        // One start per job, so a lost executor fails its job (re-runs: scheduler.durable.test),
        // and a lost executor is noticed within a few seconds.
        maxAttempts: 1,
        heartbeatMissLimit: 8,
      },
    );
  });

  afterAll(async () => {
    await cluster?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it("says no executor is connected", async () => {
    const server = await startSchedulerServer({
      listen: "127.0.0.1:0",
      modelDirs: [dir],
      log: () => {},
    });
    const client = new SchedulerClient(server.address);
    try {
      const error = await client.submitJob(baseSpec(modelPath)).catch((e: unknown) => e);
      expect(codeOf(error)).toBe("UNAVAILABLE");
      expect((error as Error).message).toMatch(/no executor/);
    } finally {
      client.close();
      await server.close(100);
    }
  });

  it("rejects a truncated model file, naming it", async () => {
    const truncated = join(dir, "truncated.safetensors");
    const bytes = await readFile(modelPath);
    await writeFile(truncated, bytes.subarray(0, Math.floor(bytes.length / 2)));
    const error = await cluster.client.submitJob(baseSpec(truncated)).catch((e: unknown) => e);
    expect(codeOf(error)).toBe("INVALID_ARGUMENT");
    expect((error as Error).message).toContain("truncated.safetensors");
  });

  it("rejects a file that is not a model", async () => {
    const junk = join(dir, "junk.safetensors");
    await writeFile(junk, "this is not a model file at all");
    const error = await cluster.client.submitJob(baseSpec(junk)).catch((e: unknown) => e);
    expect(codeOf(error)).toBe("INVALID_ARGUMENT");
  });

  it("rejects bad specs and unknown jobs and executors", async () => {
    const { client } = cluster;
    expect(codeOf(await client.submitJob(baseSpec(modelPath, { steps: 0 })).catch((e) => e))).toBe(
      "INVALID_ARGUMENT",
    );
    expect(
      codeOf(await client.submitJob(baseSpec(modelPath, { policy: "magic" })).catch((e) => e)),
    ).toBe("INVALID_ARGUMENT");
    expect(
      codeOf(await client.submitJob(baseSpec(modelPath, { executorId: "nope" })).catch((e) => e)),
    ).toBe("NOT_FOUND");
    expect(
      codeOf(await client.submitJob(baseSpec(modelPath, { load: "sometimes" })).catch((e) => e)),
    ).toBe("INVALID_ARGUMENT");
    expect(
      codeOf(
        await client.submitJob(baseSpec(modelPath, { paramsBackend: "tape" })).catch((e) => e),
      ),
    ).toBe("INVALID_ARGUMENT");
    expect(codeOf(await client.watchJob("job-missing").catch((e) => e))).toBe("NOT_FOUND");
    expect(codeOf(await client.cancelJob("job-missing").catch((e) => e))).toBe("NOT_FOUND");
  });

  it("fails the running job of an executor that dies, and runs the queued job elsewhere", async () => {
    const { client, executors } = cluster;
    const long = (executorId: string) => baseSpec(modelPath, { steps: 1_000_000, executorId });
    // Both executors busy with long jobs: the third job waits in the queue.
    const first = await client.submitJob(long("a-gpu"));
    const second = await client.submitJob(long("b-gpu"));
    const third = await client.submitJob(baseSpec(modelPath, { steps: 3 }));
    expect(first.executorId).toBe("a-gpu");
    expect(second.executorId).toBe("b-gpu");
    expect(third.executorId).toBe("");
    expect(third.state).toBe(JobState.JOB_STATE_QUEUED);
    const firstResult = client.watchJob(first.jobId);
    const thirdResult = client.watchJob(third.jobId);
    // Let a-gpu start computing, then kill it without a goodbye.
    await new Promise<void>((started) => {
      void client.watchJob(first.jobId, () => started());
    });
    executors[0].kill("SIGKILL");
    const failed = await firstResult;
    expect(failed.state).toBe(JobState.JOB_STATE_FAILED);
    expect(failed.error?.code).toBe("UNAVAILABLE");
    expect(failed.error?.message).toContain("a-gpu");
    expect(failed.error?.message).toMatch(/asked for executor a-gpu, which is gone/);
    // The queued job runs on b-gpu once b-gpu's long job is cancelled.
    await client.cancelJob(second.jobId);
    const moved = await thirdResult;
    expect(moved.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    expect(moved.executorId).toBe("b-gpu");
    const { executors: left } = await client.listExecutors();
    expect(left.map((e) => [e.executorId, ExecutorState[e.state]])).toEqual([
      ["a-gpu", "EXECUTOR_STATE_LOST"],
      ["b-gpu", "EXECUTOR_STATE_CONNECTED"],
    ]);
  });
});

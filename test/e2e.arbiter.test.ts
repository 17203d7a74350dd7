import { execFile } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { JobState, JobSpec } from "../gen/ferry/v1/scheduler";
import { FerryClientError } from "../lib/client/schedulerClient";
import { genModel } from "../lib/model/genModel";
import { packageRoot } from "../lib/packageInfo";
import { startCluster, type Cluster } from "../services/cluster/localCluster";

const run = promisify(execFile);
const ferry = (...args: string[]) =>
  run(process.execPath, [join(packageRoot(), "dist", "cli", "ferry.js"), ...args]);
const codeOf = (error: unknown) => (error as FerryClientError).code;
const MiB = 1 << 20;

// The memory arbiter with a real executor process: two models' jobs share one executor when
// their plans fit its budget together, and SetBudget re-plans a running job.
describe("the memory arbiter", () => {
  let dir: string;
  let cluster: Cluster;

  const spec = (modelPath: string, overrides: Partial<JobSpec> = {}): JobSpec =>
    JobSpec.fromPartial({
      modelPath,
      steps: 3,
      batch: 1,
      tokens: 8,
      seed: 0,
      policy: "ferry",
      ...overrides,
    });

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-arbiter-"));
    await genModel(join(dir, "a.safetensors"), { blocks: 2, hidden: 32, heads: 2, channels: 4 });
    await genModel(join(dir, "b.safetensors"), {
      blocks: 3,
      hidden: 64,
      heads: 2,
      channels: 8,
      seed: 9,
    });
    cluster = await startCluster([{ id: "gpu0", vram: "1GiB" }], { modelDirs: [dir] });
  }, 60_000);

  afterAll(async () => {
    await cluster?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it("runs a second model's job beside a running one, with the output it has alone", async () => {
    const { client } = cluster;
    const alone = await client.runJob(spec("b"));
    expect(alone.state).toBe(JobState.JOB_STATE_SUCCEEDED);

    const long = await client.submitJob(spec("a", { steps: 1_000_000 }));
    expect(long.executorId).toBe("gpu0");
    await new Promise<void>((started) => {
      void client.watchJob(long.jobId, () => started());
    });
    // The long job runs; the second starts beside it (nothing waits) and finishes first.
    const beside = await client.submitJob(spec("b"));
    expect(beside.executorId).toBe("gpu0");
    expect(beside.state).toBe(JobState.JOB_STATE_RUNNING);
    const { executors } = await client.listExecutors();
    expect(executors[0].runningJobIds).toEqual(expect.arrayContaining([long.jobId]));
    expect(executors[0].budgetBytes).toBe(1024 * MiB);
    const result = await client.watchJob(beside.jobId);
    expect(result.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    expect(result.checksum).toBe(alone.checksum);
    expect((await client.getJob(long.jobId)).state).toBe(JobState.JOB_STATE_RUNNING);

    // A lower budget: the running job gets a new plan against it, and keeps running.
    const before = (await client.getJob(long.jobId)).plan!;
    const set = await client.setBudget("gpu0", 256 * MiB);
    expect(set.replannedJobIds).toEqual([long.jobId]);
    expect(set.executor?.budgetBytes).toBe(256 * MiB);
    const after = (await client.getJob(long.jobId)).plan!;
    expect(after.budgetE).toBeLessThan(before.budgetE);
    let steps = 0;
    await new Promise<void>((progressed) => {
      void client.watchJob(long.jobId, () => {
        if (++steps === 2) progressed();
      });
    });
    expect((await client.getJob(long.jobId)).state).toBe(JobState.JOB_STATE_RUNNING);
    // The executor applies it and reports it back.
    await expect
      .poll(async () => (await client.listExecutors()).executors[0].budgetBytes)
      .toBe(256 * MiB);
    await client.cancelJob(long.jobId);
    expect((await client.watchJob(long.jobId)).state).toBe(JobState.JOB_STATE_CANCELLED);

    // Bad budgets and executors are refused; the CLI verb sets it back.
    expect(codeOf(await client.setBudget("gpu0", 0).catch((e) => e))).toBe("INVALID_ARGUMENT");
    expect(codeOf(await client.setBudget("gpu0", 2048 * MiB).catch((e) => e))).toBe(
      "INVALID_ARGUMENT",
    );
    expect(codeOf(await client.setBudget("nope", MiB).catch((e) => e))).toBe("NOT_FOUND");
    const { stdout } = await ferry("budget", "gpu0", "1GiB", "--scheduler", cluster.server.address);
    expect(stdout).toContain("gpu0: budget 1.0 GiB");
    const again = await client.runJob(spec("b"));
    expect(again.checksum).toBe(alone.checksum);
  }, 120_000);
});

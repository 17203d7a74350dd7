import type { ChildProcess } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { JobState, JobSpec } from "../gen/ferry/v1/scheduler";
import { SchedulerClient } from "../lib/client/schedulerClient";
import { genModel } from "../lib/model/genModel";
import {
  exited,
  freePort,
  spawnExecutorProcess,
  spawnSchedulerProcess as spawnScheduler,
  stopProcess as stopChild,
  waitForExecutors,
} from "../services/cluster/localCluster";

// A real `ferry serve` process with a database on disk, stopped (SIGTERM) and killed (SIGKILL)
// while it holds running and queued jobs, and real executor processes that outlive it.
describe("durable jobs across scheduler restarts", () => {
  let dir: string;
  let modelPath: string;
  let db: string;
  let address: string;
  let scheduler: ChildProcess | undefined;
  const executors: ChildProcess[] = [];
  const logs: string[] = [];
  let client: SchedulerClient;

  const startScheduler = () => {
    scheduler = spawnScheduler(
      [
        "--listen",
        address,
        "--db",
        db,
        "--model-dir",
        dir,
        "--heartbeat-ms",
        "200",
        "--heartbeat-misses",
        "15",
        "--drain-grace",
        "200ms",
      ],
      logs,
    );
  };
  // A few seconds of work on a slow emulated link: long enough to still run across a restart.
  const spec = (overrides: Partial<JobSpec> = {}): JobSpec =>
    JobSpec.fromPartial({
      modelPath: "tiny",
      steps: 400,
      batch: 1,
      tokens: 8,
      seed: 0,
      maxVramGib: 0.2 / 1024,
      policy: "sdcpp",
      ...overrides,
    });
  const startExecutor = () => {
    const child = spawnExecutorProcess(address, { id: "gpu0", vram: "1GiB", linkGbps: 0.02 }, logs);
    executors.push(child);
    return child;
  };

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-durable-"));
    modelPath = join(dir, "tiny.safetensors");
    db = join(dir, "state", "scheduler.db");
    await genModel(modelPath, { blocks: 2, hidden: 32, heads: 2, channels: 4 });
    address = `127.0.0.1:${await freePort()}`;
    startScheduler();
    client = new SchedulerClient(address);
    await client.ready(20_000);
  }, 60_000);

  afterAll(async () => {
    client?.close();
    for (const child of executors) await stopChild(child, "SIGKILL");
    if (scheduler) await stopChild(scheduler, "SIGKILL");
    await rm(dir, { recursive: true, force: true });
  });

  const waitRunning = async (jobId: string) => {
    for (;;) {
      const job = await client.getJob(jobId);
      if (job.state === JobState.JOB_STATE_RUNNING && job.lastStep > 0) return job;
      await new Promise((done) => setTimeout(done, 50));
    }
  };

  it("keeps queued jobs queued and running jobs running across a SIGTERM and a SIGKILL", async () => {
    const executor = startExecutor();
    await waitForExecutors(client, 1, logs);
    // A budget one such job fills (its 0.2 MiB plus sd.cpp's 512 MiB headroom, 0.1 MiB to
    // spare), so the second waits rather than running beside it. The executor keeps it across
    // the scheduler's restarts.
    await client.setBudget("gpu0", 512 * 1024 * 1024 + 300 * 1024);
    const running = await client.submitJob(spec(), { idempotencyKey: "first" });
    const queued = await client.submitJob(spec({ steps: 3, seed: 1 }), {
      idempotencyKey: "second",
    });
    expect(queued.state).toBe(JobState.JOB_STATE_QUEUED);
    await waitRunning(running.jobId);

    // 1. SIGTERM: drains (its grace is short), stops, and leaves both jobs in the database.
    expect(await stopChild(scheduler!, "SIGTERM")).toBe(0);
    startScheduler();
    await client.ready(20_000);
    expect((await client.getJob(queued.jobId)).state).toBe(JobState.JOB_STATE_QUEUED);
    // A retried submit after the restart finds the same job.
    const retried = await client
      .submitJob(spec({ steps: 3, seed: 1 }), {
        idempotencyKey: "second",
      })
      .catch(async () => {
        await waitForExecutors(client, 1, logs);
        return client.submitJob(spec({ steps: 3, seed: 1 }), { idempotencyKey: "second" });
      });
    expect(retried.jobId).toBe(queued.jobId);
    // The executor reconnects (with backoff), says it still runs the job, and finishes it.
    await waitForExecutors(client, 1, logs);

    // 2. SIGKILL: no goodbye; the database is all there is.
    await stopChild(scheduler!, "SIGKILL");
    startScheduler();
    await client.ready(20_000);
    const first = await client.watchUntilDone(running.jobId);
    const second = await client.watchUntilDone(queued.jobId);
    expect(first.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    expect(second.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    // It was not run again: the executor kept running it through both restarts.
    expect((await client.getJob(running.jobId)).attempts).toBe(1);
    expect(executor.exitCode).toBe(null);
    // The same job run alone gives the same bits.
    const alone = await client.runJob(spec({ steps: 3, seed: 1 }));
    expect(alone.checksum).toBe(second.checksum);
  }, 120_000);

  it("re-runs a job whose executor died while the scheduler was down", async () => {
    const running = await client.submitJob(spec({ seed: 5 }));
    await waitRunning(running.jobId);
    await stopChild(scheduler!, "SIGKILL");
    for (const child of executors) await stopChild(child, "SIGKILL");
    startScheduler();
    await client.ready(20_000);
    // A new executor process with the same id: it does not have the job, so it runs again.
    startExecutor();
    const result = await client.watchUntilDone(running.jobId);
    expect(result.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    const job = await client.getJob(running.jobId);
    expect(job.attempts).toBe(2);
    // Either the new process registered in time and said it had no such job, or it came too late.
    expect(logs.join("")).toMatch(
      /queued again: (executor gpu0 came back without the job|the scheduler restarted while the job ran on executor gpu0)/,
    );
  }, 120_000);

  it("runs a pipeline again whole after a scheduler SIGKILL while its stages run", async () => {
    const second = spawnExecutorProcess(address, { id: "gpu1", vram: "1GiB" }, logs);
    executors.push(second);
    await waitForExecutors(client, 2, logs);
    const piped = spec({ seed: 7, steps: 1500, policy: "ferry", multiGpu: "pipeline" });
    const submitted = await client.submitJob(piped);
    const running = await waitRunning(submitted.jobId);
    expect(running.multiGpu?.mode).toBe("pipeline");
    await stopChild(scheduler!, "SIGKILL");
    startScheduler();
    await client.ready(20_000);
    // The executors come back running stages the new process never started: they are
    // cancelled, and the job (stored as running on its first stage's executor) runs again.
    const result = await client.watchUntilDone(submitted.jobId, undefined, 120_000);
    expect(result.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    expect((await client.getJob(submitted.jobId)).attempts).toBe(2);
    const alone = await client.runJob({ ...piped, multiGpu: "single" });
    expect(result.checksum).toBe(alone.checksum);
  }, 180_000);

  it("refuses a second scheduler on the same database", async () => {
    const other = spawnScheduler(["--listen", "127.0.0.1:0", "--db", db], logs);
    expect(await exited(other)).toBe(1);
    expect(logs.join("")).toMatch(/in use by another scheduler/);
  });
});

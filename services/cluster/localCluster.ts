import { spawn, type ChildProcess } from "node:child_process";
import { join } from "node:path";
import { ExecutorState } from "../../gen/ferry/v1/scheduler";
import { SchedulerClient } from "../../lib/client/schedulerClient";
import { packageRoot } from "../../lib/packageInfo";
import {
  startSchedulerServer,
  type SchedulerServer,
  type SchedulerServerOptions,
} from "../scheduler/server";

/**
 * A scheduler on a loopback port and executor processes started from the built CLI, as an
 * operator would run them: what the demo, the tests and the benchmarks run jobs on.
 */
export interface Cluster {
  server: SchedulerServer;
  client: SchedulerClient;
  executors: ChildProcess[];
  logs: string[];
  stop(): Promise<void>;
}

export interface ExecutorSpec {
  id: string;
  vram: string;
  /** Emulated host→device link, GB/s. @default 0 (memory speed) */
  linkGbps?: number;
  /** Kernel threads. @default 0 (one per core) */
  threads?: number;
  env?: NodeJS.ProcessEnv;
  /** More `ferry executor` flags (e.g. --token-file). @default [] */
  args?: string[];
}

export function spawnExecutorProcess(
  address: string,
  spec: ExecutorSpec,
  logs: string[],
): ChildProcess {
  const cli = join(packageRoot(), "dist", "cli", "ferry.js");
  const child = spawn(
    process.execPath,
    [
      cli,
      "executor",
      "--scheduler",
      address,
      "--vram",
      spec.vram,
      "--id",
      spec.id,
      "--link-gbps",
      String(spec.linkGbps ?? 0),
      "--threads",
      String(spec.threads ?? 0),
      ...(spec.args ?? []),
    ],
    { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...spec.env } },
  );
  child.stdout?.on("data", (chunk: Buffer) => logs.push(chunk.toString()));
  child.stderr?.on("data", (chunk: Buffer) => logs.push(chunk.toString()));
  return child;
}

export async function waitForExecutors(
  client: SchedulerClient,
  count: number,
  logs: string[],
  timeoutMs = 30_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const { executors } = await client.listExecutors();
    if (executors.filter((e) => e.state === ExecutorState.EXECUTOR_STATE_CONNECTED).length >= count)
      return;
    await new Promise((done) => setTimeout(done, 50));
  }
  throw new Error(`executors did not register in time; their output:\n${logs.join("")}`);
}

/**
 * `options` go to the scheduler: at least `modelDirs`, the directories the jobs' models are in
 * (the scheduler refuses every other file). The job database is in memory unless `db` says.
 */
export async function startCluster(
  executorSpecs: ExecutorSpec[],
  options: SchedulerServerOptions = {},
): Promise<Cluster> {
  const logs: string[] = [];
  const server = await startSchedulerServer({
    listen: "127.0.0.1:0",
    // Generous: on a loaded 2-core machine an executor's event loop can stall for a second or
    // more, and declaring it dead then fails its job for nothing.
    heartbeatIntervalMs: 500,
    heartbeatMissLimit: 20,
    log: (line) => logs.push(`${line}\n`),
    ...options,
  });
  const client = new SchedulerClient(server.address, { token: options.token });
  const executors = executorSpecs.map((spec) => spawnExecutorProcess(server.address, spec, logs));
  await waitForExecutors(client, executorSpecs.length, logs);
  return {
    server,
    client,
    executors,
    logs,
    async stop() {
      client.close();
      await Promise.all(
        executors.map(async (child) => {
          if (child.exitCode !== null || child.signalCode !== null) return;
          const exited = new Promise((done) => child.once("exit", done));
          child.kill("SIGTERM");
          await exited;
        }),
      );
      await server.close(1000);
    },
  };
}

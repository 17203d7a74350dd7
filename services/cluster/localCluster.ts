import { spawn, type ChildProcess } from "node:child_process";
import { join } from "node:path";
import { SchedulerClient } from "../../lib/client/schedulerClient";
import { packageRoot } from "../../lib/packageInfo";
import { startSchedulerServer, type SchedulerServer } from "../scheduler/server";

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
    if (executors.length >= count) return;
    await new Promise((done) => setTimeout(done, 50));
  }
  throw new Error(`executors did not register in time; their output:\n${logs.join("")}`);
}

export async function startCluster(executorSpecs: ExecutorSpec[]): Promise<Cluster> {
  const logs: string[] = [];
  const server = await startSchedulerServer({
    listen: "127.0.0.1:0",
    // Generous: on a loaded 2-core machine an executor's event loop can stall for a second or
    // more, and declaring it dead then fails its job for nothing.
    heartbeatIntervalMs: 500,
    heartbeatMissLimit: 20,
    log: (line) => logs.push(`${line}\n`),
  });
  const client = new SchedulerClient(server.address);
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

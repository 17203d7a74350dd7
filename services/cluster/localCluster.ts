import { spawn, type ChildProcess } from "node:child_process";
import { createServer } from "node:net";
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

/** A free loopback port (bound, read, released): for a scheduler that restarts on one address. */
export async function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolvePort(port));
    });
  });
}

/** `ferry serve` as its own process, from the built CLI, as an operator would run it. */
export function spawnSchedulerProcess(
  args: string[],
  logs: string[],
  env: NodeJS.ProcessEnv = {},
): ChildProcess {
  const cli = join(packageRoot(), "dist", "cli", "ferry.js");
  const child = spawn(process.execPath, [cli, "serve", ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, ...env },
  });
  child.stdout?.on("data", (chunk: Buffer) => logs.push(chunk.toString()));
  child.stderr?.on("data", (chunk: Buffer) => logs.push(chunk.toString()));
  return child;
}

/** Waits for a child to exit; resolves with its exit code, or its signal's name. */
export function exited(child: ChildProcess): Promise<number | string> {
  if (child.exitCode !== null) return Promise.resolve(child.exitCode);
  if (child.signalCode !== null) return Promise.resolve(child.signalCode);
  return new Promise((resolveExit) =>
    child.once("exit", (code, signal) => resolveExit(code ?? signal ?? -1)),
  );
}

/** Sends a signal and waits for the exit. */
export async function stopProcess(
  child: ChildProcess,
  signal: NodeJS.Signals = "SIGTERM",
): Promise<number | string> {
  if (child.exitCode !== null || child.signalCode !== null) return exited(child);
  const done = exited(child);
  child.kill(signal);
  return done;
}

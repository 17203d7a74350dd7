import { spawn, type ChildProcess } from "node:child_process";
import { join } from "node:path";
import { packageRoot } from "../../lib/packageInfo";

const CLI = join(packageRoot(), "dist", "cli", "ferry.js");

/** A `ferry` process started from the built CLI, with its output kept for diagnostics. */
export interface FerryProcess {
  child: ChildProcess;
  output: () => string;
  /** Resolves with the first match of `pattern` in its output (waiting for it to appear). */
  waitFor(pattern: RegExp, timeoutMs?: number): Promise<RegExpMatchArray>;
  /** SIGTERM, then wait for it to exit (its telemetry flushes on the way out). */
  stop(): Promise<void>;
}

export function startFerry(args: string[], env: NodeJS.ProcessEnv = {}): FerryProcess {
  const child = spawn(process.execPath, [CLI, ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, ...env },
  });
  let text = "";
  const listeners = new Set<() => void>();
  const onData = (chunk: Buffer) => {
    text += chunk.toString();
    for (const listener of listeners) listener();
  };
  child.stdout?.on("data", onData);
  child.stderr?.on("data", onData);
  const exited = new Promise<void>((done) => child.once("exit", () => done()));
  return {
    child,
    output: () => text,
    waitFor(pattern, timeoutMs = 30_000) {
      return new Promise((resolveMatch, reject) => {
        const check = () => {
          const match = pattern.exec(text);
          if (match) {
            finish();
            resolveMatch(match);
          } else if (child.exitCode !== null) {
            finish();
            reject(
              new Error(`ferry ${args[0]} exited (${child.exitCode}) before ${pattern}:\n${text}`),
            );
          }
        };
        const timer = setTimeout(() => {
          finish();
          reject(
            new Error(`ferry ${args[0]} did not print ${pattern} in ${timeoutMs} ms:\n${text}`),
          );
        }, timeoutMs);
        const finish = () => {
          clearTimeout(timer);
          listeners.delete(check);
          child.off("exit", check);
        };
        listeners.add(check);
        child.on("exit", check);
        check();
      });
    },
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill("SIGTERM");
      await exited;
    },
  };
}

/** Runs the CLI to completion: its exit code, stdout and stderr. */
export function runFerry(
  args: string[],
  env: NodeJS.ProcessEnv = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolveRun, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], {
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, ...env },
    });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
    child.once("error", reject);
    child.once("close", (code) => resolveRun({ code: code ?? -1, stdout, stderr }));
  });
}

/** A scheduler process (`ferry serve`) on free ports, with what it printed about them. */
export async function startServe(
  extraArgs: string[] = [],
  env: NodeJS.ProcessEnv = {},
): Promise<{ process: FerryProcess; address: string; metricsUrl?: string; pageUrl?: string }> {
  // A database of its own (tests run side by side; a file is locked by one scheduler).
  const serve = startFerry(
    ["serve", "--listen", "127.0.0.1:0", "--heartbeat-ms", "500", "--db", ":memory:", ...extraArgs],
    env,
  );
  const [, address] = await serve.waitFor(/listening on (\S+)/);
  const metrics = extraArgs.includes("--metrics-port")
    ? (await serve.waitFor(/metrics on (\S+)/))[1]
    : undefined;
  const page = extraArgs.includes("--http-port")
    ? (await serve.waitFor(/status page on (\S+)/))[1]
    : undefined;
  return { process: serve, address, metricsUrl: metrics, pageUrl: page };
}

/** An executor process connected to `address`, registered before this resolves. */
export async function startExecutor(
  address: string,
  id: string,
  extraArgs: string[] = [],
  env: NodeJS.ProcessEnv = {},
): Promise<{ process: FerryProcess; metricsUrl?: string }> {
  // One kernel thread: these tests check behaviour, not speed, and the other test worker (on a
  // 2-core machine) keeps a core.
  const executor = startFerry(
    [
      "executor",
      "--scheduler",
      address,
      "--id",
      id,
      "--vram",
      "2GiB",
      "--threads",
      "1",
      ...extraArgs,
    ],
    env,
  );
  const metrics = extraArgs.includes("--metrics-port")
    ? (await executor.waitFor(/metrics on (\S+)/))[1]
    : undefined;
  await executor.waitFor(/registered with/);
  return { process: executor, metricsUrl: metrics };
}

import { spawn, type ChildProcess } from "node:child_process";
import { createServer } from "node:net";
import { join } from "node:path";
import { packageRoot } from "../../lib/packageInfo";

/** A free loopback port (bound, read, released). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

/** `ferry serve` as its own process, from the built CLI, as an operator would run it. */
export function spawnScheduler(
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

/** Waits for a child to exit; resolves with its code (or signal). */
export function exited(child: ChildProcess): Promise<number | string> {
  if (child.exitCode !== null) return Promise.resolve(child.exitCode);
  if (child.signalCode !== null) return Promise.resolve(child.signalCode);
  return new Promise((resolve) =>
    child.once("exit", (code, signal) => resolve(code ?? signal ?? -1)),
  );
}

/** Sends a signal and waits for the exit. */
export async function stopChild(child: ChildProcess, signal: NodeJS.Signals = "SIGTERM") {
  if (child.exitCode !== null || child.signalCode !== null)
    return child.exitCode ?? child.signalCode;
  const done = exited(child);
  child.kill(signal);
  return done;
}

/**
 * Wraps a command's action: a failure prints `ferry <command>: <message>` (no stack trace; the
 * message names the problem) and exits non-zero. Set FERRY_DEBUG=1 to see stacks.
 */
export function action<Args extends unknown[]>(
  command: string,
  body: (...args: Args) => Promise<void> | void,
): (...args: Args) => Promise<void> {
  return async (...args: Args) => {
    try {
      await body(...args);
    } catch (error) {
      const err = error as Error;
      process.stderr.write(`ferry ${command}: ${err?.message ?? String(error)}\n`);
      if (process.env.FERRY_DEBUG && err?.stack) process.stderr.write(`${err.stack}\n`);
      process.exitCode = 1;
    }
  };
}

/** Runs `stop` once on SIGINT/SIGTERM (a second signal exits at once). */
export function onShutdownSignal(stop: () => Promise<void>): void {
  let stopping = false;
  const handler = (signal: NodeJS.Signals) => {
    if (stopping) process.exit(130);
    stopping = true;
    process.stderr.write(`ferry: ${signal}, shutting down\n`);
    stop().then(
      () => process.exit(0),
      (error: unknown) => {
        process.stderr.write(`ferry: shutdown failed: ${String(error)}\n`);
        process.exit(1);
      },
    );
  };
  process.on("SIGINT", handler);
  process.on("SIGTERM", handler);
}

import type { Command } from "commander";
import { ferryDefaults, parseIntegerFlag } from "../../lib/config/config";
import { setupTracing, shutdownTracing } from "../../lib/telemetry/tracing";
import { startSchedulerServer } from "../../services/scheduler/server";
import { action, onShutdownSignal } from "../action";

export function register(program: Command): void {
  const defaults = ferryDefaults();
  program
    .command("serve")
    .description("run the scheduler: executors connect to it, clients submit jobs to it")
    .option("--listen <host:port>", "address to listen on (FERRY_LISTEN)", defaults.listen)
    .option(
      "--heartbeat-ms <ms>",
      "executor heartbeat interval (FERRY_HEARTBEAT_MS)",
      defaults.heartbeatMs,
    )
    .action(
      action("serve", async (options: { listen: string; heartbeatMs: string }) => {
        setupTracing("ferry-scheduler");
        const server = await startSchedulerServer({
          listen: options.listen,
          heartbeatIntervalMs: parseIntegerFlag("--heartbeat-ms", options.heartbeatMs, 50, 600_000),
        });
        process.stderr.write(`ferry scheduler listening on ${server.address}\n`);
        onShutdownSignal(async () => {
          await server.close();
          await shutdownTracing();
        });
      }),
    );
}

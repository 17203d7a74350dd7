import type { Command } from "commander";
import { ferryDefaults, parseIntegerFlag, parsePortFlag } from "../../lib/config/config";
import { setupTelemetry, shutdownTelemetry } from "../../lib/telemetry/tracing";
import { startStatusPage } from "../../services/scheduler/http/statusPage";
import { startSchedulerServer } from "../../services/scheduler/server";
import { action, onShutdownSignal } from "../action";

interface ServeFlags {
  listen: string;
  heartbeatMs: string;
  metricsPort?: string;
  metricsHost: string;
  httpPort?: string;
  httpHost: string;
}

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
    .option(
      "--metrics-port <port>",
      "serve Prometheus metrics at /metrics on this port; 0 = any free port (FERRY_METRICS_PORT)",
      defaults.metricsPort,
    )
    .option(
      "--metrics-host <host>",
      "address the metrics endpoint listens on (FERRY_METRICS_HOST)",
      defaults.metricsHost,
    )
    .option(
      "--http-port <port>",
      "serve the read-only status page on this port; 0 = any free port (FERRY_HTTP_PORT)",
      defaults.httpPort,
    )
    .option(
      "--http-host <host>",
      "address the status page listens on (FERRY_HTTP_HOST)",
      defaults.httpHost,
    )
    .action(
      action("serve", async (options: ServeFlags) => {
        const heartbeatIntervalMs = parseIntegerFlag(
          "--heartbeat-ms",
          options.heartbeatMs,
          50,
          600_000,
        );
        const metricsPort = parsePortFlag("--metrics-port", options.metricsPort);
        const httpPort = parsePortFlag("--http-port", options.httpPort);
        const telemetry = await setupTelemetry({
          serviceName: "ferry-scheduler",
          metricsPort,
          metricsHost: options.metricsHost,
        });
        const server = await startSchedulerServer({
          listen: options.listen,
          heartbeatIntervalMs,
        });
        process.stderr.write(`ferry scheduler listening on ${server.address}\n`);
        if (telemetry.metricsUrl) {
          process.stderr.write(`ferry scheduler metrics on ${telemetry.metricsUrl}\n`);
        }
        const page =
          httpPort === undefined
            ? undefined
            : await startStatusPage(server.scheduler, {
                host: options.httpHost,
                port: httpPort,
              }).catch(async (error: unknown) => {
                // Without its page the process would serve half of what was asked: stop.
                await server.close(0);
                await shutdownTelemetry();
                throw error;
              });
        if (page) process.stderr.write(`ferry scheduler status page on ${page.url}\n`);
        onShutdownSignal(async () => {
          await page?.close();
          await server.close();
          await shutdownTelemetry();
        });
      }),
    );
}

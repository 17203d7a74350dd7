import type { Command } from "commander";
import { ferryDefaults, resolveServeConfig, type ServeFlags } from "../../lib/config/config";
import { setupTelemetry, shutdownTelemetry } from "../../lib/telemetry/tracing";
import { loadToken } from "../../lib/wire/credentials";
import { startStatusPage } from "../../services/scheduler/http/statusPage";
import { startSchedulerServer } from "../../services/scheduler/server";
import { action, onShutdownSignal } from "../action";

const collect = (value: string, previous: string[]) => [...previous, value];

/** Adds `serve` to a `ferry` program (its flags: lib/config/config.ts). */
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
      "--heartbeat-misses <n>",
      "an executor silent this many intervals is lost (FERRY_HEARTBEAT_MISSES)",
      defaults.heartbeatMisses,
    )
    .option("--db <path>", "job database file, or :memory: (FERRY_DB)", defaults.db)
    .option(
      "--model-dir <dir>",
      "a model repository directory; repeatable (FERRY_MODEL_DIRS, ':'-separated)",
      collect,
      defaults.modelDirs,
    )
    .option(
      "--retention <duration>",
      "keep finished jobs this long (FERRY_RETENTION)",
      defaults.retention,
    )
    .option(
      "--max-attempts <n>",
      "times a job is started before a lost executor fails it (FERRY_MAX_ATTEMPTS)",
      defaults.maxAttempts,
    )
    .option("--max-queued <n>", "jobs that may wait at once (FERRY_MAX_QUEUED)", defaults.maxQueued)
    .option(
      "--drain-grace <duration>",
      "on SIGTERM, how long running jobs get to finish (FERRY_DRAIN_GRACE)",
      defaults.drainGrace,
    )
    .option(
      "--token-file <path>",
      "require this bearer token (FERRY_TOKEN holds one directly)",
      defaults.tokenFile,
    )
    .option(
      "--tls-cert <pem>",
      "serve TLS with this certificate (FERRY_TLS_CERT)",
      defaults.tlsCert,
    )
    .option("--tls-key <pem>", "and this key (FERRY_TLS_KEY)", defaults.tlsKey)
    .option(
      "--tls-client-ca <pem>",
      "require executors to present a client certificate signed by this CA (FERRY_TLS_CLIENT_CA)",
      defaults.tlsClientCa,
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
      action("serve", async (flags: ServeFlags) => {
        const config = resolveServeConfig(flags);
        const token = loadToken(config.tokenFile);
        const telemetry = await setupTelemetry({
          serviceName: "ferry-scheduler",
          metricsPort: config.metricsPort,
          metricsHost: config.metricsHost,
        });
        const server = await startSchedulerServer({
          listen: config.listen,
          heartbeatIntervalMs: config.heartbeatMs,
          heartbeatMissLimit: config.heartbeatMisses,
          db: config.db,
          modelDirs: config.modelDirs,
          retentionMs: config.retentionMs,
          maxAttempts: config.maxAttempts,
          maxQueuedJobs: config.maxQueued,
          token,
          tls: config.tls,
        });
        process.stderr.write(
          `ferry scheduler listening on ${server.address} (${config.tls ? "TLS" : "plaintext"}, ${token ? "token required" : "no token"}); ` +
            `jobs in ${config.db}; models from ${config.modelDirs.length ? config.modelDirs.join(", ") : "nowhere (no --model-dir: every job is refused)"}\n`,
        );
        const host = config.listen.slice(0, config.listen.lastIndexOf(":"));
        if (!/^(127\.|localhost$|\[?::1\]?$)/.test(host) && (!config.tls || !token)) {
          process.stderr.write(
            `ferry scheduler: warning: listening beyond loopback without ${config.tls ? "" : "TLS"}${!config.tls && !token ? " and " : ""}${token ? "" : "a token"}\n`,
          );
        }
        if (telemetry.metricsUrl) {
          process.stderr.write(`ferry scheduler metrics on ${telemetry.metricsUrl}\n`);
        }
        const page =
          config.httpPort === undefined
            ? undefined
            : await startStatusPage(server.scheduler, {
                host: config.httpHost,
                port: config.httpPort,
              }).catch(async (error: unknown) => {
                // Without its page the process would serve half of what was asked: stop.
                await server.close(0);
                await shutdownTelemetry();
                throw error;
              });
        if (page) process.stderr.write(`ferry scheduler status page on ${page.url}\n`);
        onShutdownSignal(async () => {
          await page?.close();
          await server.close(config.drainGraceMs);
          await shutdownTelemetry();
        });
      }),
    );
}

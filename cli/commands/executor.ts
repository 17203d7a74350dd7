import type { Command } from "commander";
import { ferryDefaults, resolveExecutorConfig, type ExecutorFlags } from "../../lib/config/config";
import { setupTelemetry, shutdownTelemetry } from "../../lib/telemetry/tracing";
import { loadToken } from "../../lib/wire/credentials";
import { Executor } from "../../services/executor/executor";
import { action, onShutdownSignal } from "../action";
import { addConnectionOptions } from "./connection";

/** Adds `executor` to a `ferry` program (its flags: lib/config/config.ts). */
export function register(program: Command): void {
  const defaults = ferryDefaults();
  const command = program
    .command("executor")
    .description("run an executor: owns one device, connects to the scheduler, runs its plans")
    .option("--device <kind>", "device kind: cpu or cuda (FERRY_DEVICE)", defaults.device)
    .option("--vram <size>", "device memory, e.g. 2GiB, 768MiB (FERRY_VRAM)", defaults.vram)
    .option(
      "--link-gbps <rate>",
      "emulate a host→device link of this many GB/s; 0 = memory speed (FERRY_LINK_GBPS)",
      defaults.linkGbps,
    )
    .option("--threads <n>", "kernel threads; 0 = one per core (FERRY_THREADS)", defaults.threads)
    .option(
      "--commit-memory",
      "cpu device: commit all its memory at start-up, so the first job copies at link speed",
    )
    .option("--id <id>", "executor id (FERRY_EXECUTOR_ID)", defaults.executorId)
    .option(
      "--params-backend <backend>",
      "default for jobs: cpu (weights kept in host memory) or disk (read when needed, released after use)",
      "cpu",
    )
    .option("--load <mode>", "default for jobs: lazy, eager or background", "background")
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
      "--peer-listen <host:port>",
      'take pipeline handoffs from other executors here; port 0 = any free port, "" = none (FERRY_PEER_LISTEN)',
      defaults.peerListen,
    )
    .option(
      "--peer-advertise <host:port>",
      "the address other executors reach --peer-listen at (FERRY_PEER_ADVERTISE)",
      defaults.peerAdvertise,
    )
    .option(
      "--peer-tls-name <name>",
      "with TLS: the DNS name other executors' certificates carry for their peer address (FERRY_PEER_TLS_NAME)",
      defaults.peerTlsName,
    );
  addConnectionOptions(command).action(
    action("executor", async (flags: ExecutorFlags) => {
      const config = resolveExecutorConfig(flags);
      const token = loadToken(config.tokenFile);
      const executor = new Executor({
        scheduler: config.scheduler,
        device: config.device,
        paramsBackend: config.paramsBackend,
        load: config.load,
        vramBytes: config.vramBytes,
        linkGbps: config.linkGbps,
        threads: config.threads,
        commitMemory: config.commitMemory,
        id: config.id,
        token,
        tls: config.tls,
        peerListen: config.peerListen,
        peerAdvertise: config.peerAdvertise,
        peerTls: config.peerTls,
        peerTlsName: config.peerTlsName,
        stepSpans: defaults.stepSpans,
      });
      // After the device exists (its name is a resource attribute), before any job runs.
      const device = executor.deviceInfo();
      const telemetry = await setupTelemetry({
        serviceName: "ferry-executor",
        attributes: {
          "service.instance.id": executor.id,
          "ferry.executor.id": executor.id,
          "ferry.device.name": device.name,
          "ferry.device.kind": device.kind,
        },
        metricsPort: config.metricsPort,
        metricsHost: config.metricsHost,
      });
      if (telemetry.metricsUrl) {
        process.stderr.write(`ferry executor ${executor.id}: metrics on ${telemetry.metricsUrl}\n`);
      }
      await executor.start();
      process.stderr.write(
        `ferry executor ${executor.id}: ${executor.deviceInfo().name}, connecting to ${config.scheduler}\n`,
      );
      onShutdownSignal(async () => {
        await executor.stop();
        await shutdownTelemetry();
      });
    }),
  );
}

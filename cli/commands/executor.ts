import type { Command } from "commander";
import {
  ferryDefaults,
  parseIntegerFlag,
  parseNumberFlag,
  parsePortFlag,
} from "../../lib/config/config";
import { parseBytes } from "../../lib/config/units";
import { setupTelemetry, shutdownTelemetry } from "../../lib/telemetry/tracing";
import {
  Executor,
  LOAD_MODES,
  PARAMS_BACKENDS,
  type LoadMode,
  type ParamsBackend,
} from "../../services/executor/executor";
import { action, onShutdownSignal } from "../action";

interface ExecutorFlags {
  scheduler: string;
  device: string;
  vram: string;
  linkGbps: string;
  threads: string;
  id?: string;
  paramsBackend: string;
  load: string;
  metricsPort?: string;
  metricsHost: string;
}

export function register(program: Command): void {
  const defaults = ferryDefaults();
  program
    .command("executor")
    .description("run an executor: owns one device, connects to the scheduler, runs its plans")
    .option("--scheduler <host:port>", "scheduler address (FERRY_SCHEDULER)", defaults.scheduler)
    .option("--device <kind>", "device kind: cpu or cuda (FERRY_DEVICE)", defaults.device)
    .option("--vram <size>", "device memory, e.g. 2GiB, 768MiB (FERRY_VRAM)", defaults.vram)
    .option(
      "--link-gbps <rate>",
      "emulate a host→device link of this many GB/s; 0 = memory speed (FERRY_LINK_GBPS)",
      defaults.linkGbps,
    )
    .option("--threads <n>", "kernel threads; 0 = one per core (FERRY_THREADS)", defaults.threads)
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
    .action(
      action("executor", async (options: ExecutorFlags) => {
        if (options.device !== "cpu" && options.device !== "cuda") {
          throw new Error(`--device must be cpu or cuda (got '${options.device}')`);
        }
        if (!PARAMS_BACKENDS.includes(options.paramsBackend as ParamsBackend)) {
          throw new Error(`--params-backend must be one of ${PARAMS_BACKENDS.join(", ")}`);
        }
        if (!LOAD_MODES.includes(options.load as LoadMode)) {
          throw new Error(`--load must be one of ${LOAD_MODES.join(", ")}`);
        }
        const metricsPort = parsePortFlag("--metrics-port", options.metricsPort);
        const executor = new Executor({
          scheduler: options.scheduler,
          device: options.device,
          paramsBackend: options.paramsBackend as ParamsBackend,
          load: options.load as LoadMode,
          vramBytes: parseBytes(options.vram),
          linkGbps: parseNumberFlag("--link-gbps", options.linkGbps, 0, 10_000),
          threads: parseIntegerFlag("--threads", options.threads, 0, 1024),
          id: options.id,
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
          metricsPort,
          metricsHost: options.metricsHost,
        });
        if (telemetry.metricsUrl) {
          process.stderr.write(
            `ferry executor ${executor.id}: metrics on ${telemetry.metricsUrl}\n`,
          );
        }
        await executor.start();
        process.stderr.write(
          `ferry executor ${executor.id}: ${executor.deviceInfo().name}, connecting to ${options.scheduler}\n`,
        );
        onShutdownSignal(async () => {
          await executor.stop();
          await shutdownTelemetry();
        });
      }),
    );
}

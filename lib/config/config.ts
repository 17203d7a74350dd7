/**
 * Every setting a Ferry process reads, with its flag, its `FERRY_*` environment variable and
 * its default, in one place. Flags win over the environment, the environment over the default.
 *
 * | setting            | flag            | environment          | default          |
 * |--------------------|-----------------|----------------------|------------------|
 * | scheduler address  | --scheduler     | FERRY_SCHEDULER      | 127.0.0.1:7400   |
 * | listen address     | --listen        | FERRY_LISTEN         | 127.0.0.1:7400   |
 * | device kind        | --device        | FERRY_DEVICE         | cpu              |
 * | device memory      | --vram          | FERRY_VRAM           | 2GiB             |
 * | emulated link GB/s | --link-gbps     | FERRY_LINK_GBPS      | 0 (memory speed) |
 * | kernel threads     | --threads       | FERRY_THREADS        | 0 (one per core) |
 * | executor id        | --id            | FERRY_EXECUTOR_ID    | host-random      |
 * | heartbeat interval | --heartbeat-ms  | FERRY_HEARTBEAT_MS   | 1000             |
 * | trace file         | (none)          | FERRY_TRACE_FILE     | unset (no file)  |
 * | metrics port       | --metrics-port  | FERRY_METRICS_PORT   | unset (none)     |
 * | metrics address    | --metrics-host  | FERRY_METRICS_HOST   | 127.0.0.1        |
 * | status page port   | --http-port     | FERRY_HTTP_PORT      | unset (none)     |
 * | status page address| --http-host     | FERRY_HTTP_HOST      | 127.0.0.1        |
 * | step spans         | (none)          | FERRY_STEP_SPANS     | 1 (0: bench only)|
 *
 * `--metrics-port` (serve, executor) serves Prometheus metrics at /metrics; `--http-port`
 * (serve) the read-only status page. Port 0 picks a free port (the process prints it). Both
 * listen on loopback unless told otherwise. The standard `OTEL_*` variables (exporter, OTLP
 * endpoint and protocol, service name, resource attributes, sampler) are read by
 * lib/telemetry/tracing.ts.
 */
export interface FerryDefaults {
  scheduler: string;
  listen: string;
  device: string;
  vram: string;
  linkGbps: string;
  threads: string;
  executorId: string | undefined;
  heartbeatMs: string;
  metricsPort: string | undefined;
  metricsHost: string;
  httpPort: string | undefined;
  httpHost: string;
  /** Whether executors build spans from step events (`ferry bench tracing` turns it off). */
  stepSpans: boolean;
}

export function ferryDefaults(env: NodeJS.ProcessEnv = process.env): FerryDefaults {
  return {
    scheduler: env.FERRY_SCHEDULER || "127.0.0.1:7400",
    listen: env.FERRY_LISTEN || "127.0.0.1:7400",
    device: env.FERRY_DEVICE || "cpu",
    vram: env.FERRY_VRAM || "2GiB",
    linkGbps: env.FERRY_LINK_GBPS || "0",
    threads: env.FERRY_THREADS || "0",
    executorId: env.FERRY_EXECUTOR_ID || undefined,
    heartbeatMs: env.FERRY_HEARTBEAT_MS || "1000",
    metricsPort: env.FERRY_METRICS_PORT || undefined,
    metricsHost: env.FERRY_METRICS_HOST || "127.0.0.1",
    httpPort: env.FERRY_HTTP_PORT || undefined,
    httpHost: env.FERRY_HTTP_HOST || "127.0.0.1",
    stepSpans: env.FERRY_STEP_SPANS !== "0",
  };
}

/** Parses a flag that must be a number in [min, max]; the error names the flag. */
export function parseNumberFlag(flag: string, text: string, min: number, max: number): number {
  const value = Number(text);
  if (text.trim() === "" || !Number.isFinite(value) || value < min || value > max) {
    throw new Error(`${flag} must be a number between ${min} and ${max} (got '${text}')`);
  }
  return value;
}

/** Parses a flag that must be an integer in [min, max]. */
export function parseIntegerFlag(flag: string, text: string, min: number, max: number): number {
  const value = parseNumberFlag(flag, text, min, max);
  if (!Number.isInteger(value)) throw new Error(`${flag} must be a whole number (got '${text}')`);
  return value;
}

/** Parses an optional port flag (0 = any free port); unset stays unset. */
export function parsePortFlag(flag: string, text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  return parseIntegerFlag(flag, text, 0, 65_535);
}

/**
 * Every setting a Ferry process reads, with its flag, its `FERRY_*` environment variable and
 * its default, in one place. Flags win over the environment, the environment over the default.
 *
 * | setting                 | flag              | environment            | default                         |
 * |-------------------------|-------------------|------------------------|---------------------------------|
 * | scheduler address       | --scheduler       | FERRY_SCHEDULER        | 127.0.0.1:7400                  |
 * | listen address          | --listen          | FERRY_LISTEN           | 127.0.0.1:7400 (loopback)       |
 * | device kind             | --device          | FERRY_DEVICE           | cpu                             |
 * | device memory           | --vram            | FERRY_VRAM             | 2GiB                            |
 * | emulated link GB/s      | --link-gbps       | FERRY_LINK_GBPS        | 0 (memory speed)                |
 * | kernel threads          | --threads         | FERRY_THREADS          | 0 (one per core)                |
 * | executor id             | --id              | FERRY_EXECUTOR_ID      | host-random                     |
 * | heartbeat interval      | --heartbeat-ms    | FERRY_HEARTBEAT_MS     | 1000                            |
 * | heartbeats missed→lost  | --heartbeat-misses| FERRY_HEARTBEAT_MISSES | 5                               |
 * | job database            | --db              | FERRY_DB               | $XDG_STATE_HOME/ferry/scheduler.db (~/.local/state/…) |
 * | model directories       | --model-dir (rep.)| FERRY_MODEL_DIRS (a:b) | none: jobs are refused          |
 * | finished-job retention  | --retention       | FERRY_RETENTION        | 1h                              |
 * | starts per job          | --max-attempts    | FERRY_MAX_ATTEMPTS     | 3                               |
 * | queued jobs at most     | --max-queued      | FERRY_MAX_QUEUED       | 10000                           |
 * | SIGTERM drain grace     | --drain-grace     | FERRY_DRAIN_GRACE      | 20s                             |
 * | bearer token            | --token-file      | FERRY_TOKEN (the value)| none: no token                  |
 * | TLS certificate, key    | --tls-cert/-key   | FERRY_TLS_CERT/_KEY    | none: plaintext                 |
 * | executors' client CA    | --tls-client-ca   | FERRY_TLS_CLIENT_CA    | none: no client certificates    |
 * | scheduler's CA (client) | --tls-ca          | FERRY_TLS_CA           | system roots (with --tls-*)     |
 * | trace file              | (none)            | FERRY_TRACE_FILE       | unset (no file)                 |
 * | metrics port            | --metrics-port    | FERRY_METRICS_PORT     | unset (none)                    |
 * | metrics address         | --metrics-host    | FERRY_METRICS_HOST     | 127.0.0.1                       |
 * | executor peer address   | --peer-listen     | FERRY_PEER_LISTEN      | 127.0.0.1:0 ("" = no pipelines) |
 * | peer address advertised | --peer-advertise  | FERRY_PEER_ADVERTISE   | the address it listens on       |
 * | peers' certificate name | --peer-tls-name   | FERRY_PEER_TLS_NAME    | the peer address's host         |
 * | status page port        | --http-port       | FERRY_HTTP_PORT        | unset (none)                    |
 * | status page address     | --http-host       | FERRY_HTTP_HOST        | 127.0.0.1                       |
 * | step spans              | (none)            | FERRY_STEP_SPANS       | 1 (0: bench only)               |
 *
 * Each command's `resolve…Config` turns its flags (as commander parsed them, strings) into a
 * typed, validated config without touching files, so a manifest's command line can be checked
 * anywhere (test/deploy.manifests.test.ts).
 *
 * `--metrics-port` (serve, executor) serves Prometheus metrics at /metrics; `--http-port`
 * (serve) the read-only status page. Port 0 picks a free port (the process prints it). Both
 * listen on loopback unless told otherwise. The standard `OTEL_*` variables (exporter, OTLP
 * endpoint and protocol, service name, resource attributes, sampler) are read by
 * lib/telemetry/tracing.ts.
 */
import { homedir } from "node:os";
import { join } from "node:path";
import type { ClientTlsFiles, ServerTlsFiles } from "../wire/credentials";
import { MAX_ID_LENGTH, MAX_PRIORITY } from "../wire/limits";
import { parseBytes } from "./units";

export interface FerryDefaults {
  scheduler: string;
  listen: string;
  device: string;
  vram: string;
  linkGbps: string;
  threads: string;
  executorId: string | undefined;
  heartbeatMs: string;
  heartbeatMisses: string;
  db: string;
  modelDirs: string[];
  retention: string;
  maxAttempts: string;
  maxQueued: string;
  drainGrace: string;
  tokenFile: string | undefined;
  tlsCert: string | undefined;
  tlsKey: string | undefined;
  tlsClientCa: string | undefined;
  tlsCa: string | undefined;
  metricsPort: string | undefined;
  metricsHost: string;
  peerListen: string;
  peerAdvertise: string | undefined;
  peerTlsName: string | undefined;
  httpPort: string | undefined;
  httpHost: string;
  /** Whether executors build spans from step events (`ferry bench tracing` turns it off). */
  stepSpans: boolean;
}

/** Where `ferry serve` keeps its job database when no --db or FERRY_DB says otherwise. */
export function defaultDbPath(env: NodeJS.ProcessEnv = process.env): string {
  const stateHome = env.XDG_STATE_HOME || join(env.HOME || homedir(), ".local", "state");
  return join(stateHome, "ferry", "scheduler.db");
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
    heartbeatMisses: env.FERRY_HEARTBEAT_MISSES || "5",
    db: env.FERRY_DB || defaultDbPath(env),
    modelDirs: (env.FERRY_MODEL_DIRS || "").split(":").filter(Boolean),
    retention: env.FERRY_RETENTION || "1h",
    maxAttempts: env.FERRY_MAX_ATTEMPTS || "3",
    maxQueued: env.FERRY_MAX_QUEUED || "10000",
    drainGrace: env.FERRY_DRAIN_GRACE || "20s",
    tokenFile: env.FERRY_TOKEN_FILE || undefined,
    tlsCert: env.FERRY_TLS_CERT || undefined,
    tlsKey: env.FERRY_TLS_KEY || undefined,
    tlsClientCa: env.FERRY_TLS_CLIENT_CA || undefined,
    tlsCa: env.FERRY_TLS_CA || undefined,
    metricsPort: env.FERRY_METRICS_PORT || undefined,
    metricsHost: env.FERRY_METRICS_HOST || "127.0.0.1",
    peerListen: env.FERRY_PEER_LISTEN ?? "127.0.0.1:0",
    peerAdvertise: env.FERRY_PEER_ADVERTISE || undefined,
    peerTlsName: env.FERRY_PEER_TLS_NAME || undefined,
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

const DURATION_UNITS: Record<string, number> = {
  ms: 1,
  s: 1000,
  m: 60_000,
  h: 3_600_000,
  d: 86_400_000,
};

/** Parses a duration with a unit ("500ms", "30s", "5m", "1h", "7d") into milliseconds. */
export function parseDurationFlag(
  flag: string,
  text: string,
  minMs: number,
  maxMs: number,
): number {
  const match = /^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)\s*$/.exec(text);
  const ms = match ? Number(match[1]) * DURATION_UNITS[match[2]] : NaN;
  if (!Number.isFinite(ms) || ms < minMs || ms > maxMs) {
    throw new Error(
      `${flag} must be a duration with a unit (ms, s, m, h, d) between ${minMs} ms and ${maxMs} ms (got '${text}')`,
    );
  }
  return Math.round(ms);
}

/** HOST:PORT, the port a number. */
export function parseAddressFlag(flag: string, text: string): string {
  const colon = text.lastIndexOf(":");
  const port = Number(text.slice(colon + 1));
  if (colon <= 0 || !Number.isInteger(port) || port < 0 || port > 65_535) {
    throw new Error(`${flag} must be HOST:PORT (got '${text}')`);
  }
  return text;
}

function tlsPair(cert: string | undefined, key: string | undefined): void {
  if ((cert === undefined) !== (key === undefined)) {
    throw new Error("--tls-cert and --tls-key go together");
  }
}

/** `ferry serve`'s flags as commander gives them. */
export interface ServeFlags {
  listen: string;
  heartbeatMs: string;
  heartbeatMisses: string;
  db: string;
  modelDir: string[];
  retention: string;
  maxAttempts: string;
  maxQueued: string;
  drainGrace: string;
  tokenFile?: string;
  tlsCert?: string;
  tlsKey?: string;
  tlsClientCa?: string;
  metricsPort?: string;
  metricsHost: string;
  httpPort?: string;
  httpHost: string;
}

export interface ServeConfig {
  listen: string;
  heartbeatMs: number;
  heartbeatMisses: number;
  db: string;
  modelDirs: string[];
  retentionMs: number;
  maxAttempts: number;
  maxQueued: number;
  drainGraceMs: number;
  tokenFile: string | undefined;
  tls: ServerTlsFiles | undefined;
  /** Prometheus metrics port (0 = any free one); undefined = no endpoint. */
  metricsPort: number | undefined;
  metricsHost: string;
  /** Status page port (0 = any free one); undefined = no page. */
  httpPort: number | undefined;
  httpHost: string;
}

export function resolveServeConfig(flags: ServeFlags): ServeConfig {
  tlsPair(flags.tlsCert, flags.tlsKey);
  if (flags.tlsClientCa && !flags.tlsCert) {
    throw new Error(
      "--tls-client-ca needs --tls-cert and --tls-key (client certificates need TLS)",
    );
  }
  if (!flags.db) throw new Error("--db must name a file (or :memory:)");
  return {
    listen: parseAddressFlag("--listen", flags.listen),
    heartbeatMs: parseIntegerFlag("--heartbeat-ms", flags.heartbeatMs, 50, 600_000),
    heartbeatMisses: parseIntegerFlag("--heartbeat-misses", flags.heartbeatMisses, 2, 1000),
    db: flags.db,
    modelDirs: flags.modelDir,
    retentionMs: parseDurationFlag("--retention", flags.retention, 1000, 365 * 86_400_000),
    maxAttempts: parseIntegerFlag("--max-attempts", flags.maxAttempts, 1, 100),
    maxQueued: parseIntegerFlag("--max-queued", flags.maxQueued, 1, 1_000_000),
    drainGraceMs: parseDurationFlag("--drain-grace", flags.drainGrace, 0, 86_400_000),
    tokenFile: flags.tokenFile,
    tls: flags.tlsCert
      ? { certFile: flags.tlsCert, keyFile: flags.tlsKey!, clientCaFile: flags.tlsClientCa }
      : undefined,
    metricsPort: parsePortFlag("--metrics-port", flags.metricsPort),
    metricsHost: flags.metricsHost,
    httpPort: parsePortFlag("--http-port", flags.httpPort),
    httpHost: flags.httpHost,
  };
}

/** The connection flags `ferry executor`, `ferry run` and the other clients share. */
export interface ClientFlags {
  scheduler: string;
  tokenFile?: string;
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
}

export interface ClientConfig {
  scheduler: string;
  tokenFile: string | undefined;
  tls: ClientTlsFiles | undefined;
}

export function resolveClientConfig(flags: ClientFlags): ClientConfig {
  tlsPair(flags.tlsCert, flags.tlsKey);
  const tls =
    flags.tlsCa || flags.tlsCert
      ? { caFile: flags.tlsCa, certFile: flags.tlsCert, keyFile: flags.tlsKey }
      : undefined;
  return {
    scheduler: parseAddressFlag("--scheduler", flags.scheduler),
    tokenFile: flags.tokenFile,
    tls,
  };
}

export interface ExecutorFlags extends ClientFlags {
  device: string;
  vram: string;
  linkGbps: string;
  threads: string;
  commitMemory?: boolean;
  id?: string;
  paramsBackend: string;
  load: string;
  metricsPort?: string;
  metricsHost: string;
  peerListen: string;
  peerAdvertise?: string;
  peerTlsName?: string;
}

export interface ExecutorConfig extends ClientConfig {
  device: "cpu" | "cuda";
  vramBytes: number;
  linkGbps: number;
  threads: number;
  commitMemory: boolean;
  id: string | undefined;
  paramsBackend: "cpu" | "disk";
  load: "lazy" | "eager" | "background";
  metricsPort: number | undefined;
  metricsHost: string;
  /** Where it takes pipeline handoffs ("" = nowhere), and the address peers are told. */
  peerListen: string;
  peerAdvertise: string | undefined;
  /**
   * TLS for the peer address: the executor's own certificate (--tls-cert/--tls-key, which must
   * then be good for serving too), other executors' certificates checked against --tls-ca.
   */
  peerTls: ServerTlsFiles | undefined;
  peerTlsName: string | undefined;
}

export function resolveExecutorConfig(flags: ExecutorFlags): ExecutorConfig {
  if (flags.device !== "cpu" && flags.device !== "cuda") {
    throw new Error(`--device must be cpu or cuda (got '${flags.device}')`);
  }
  if (!["cpu", "disk"].includes(flags.paramsBackend)) {
    throw new Error("--params-backend must be one of cpu, disk");
  }
  if (!["lazy", "eager", "background"].includes(flags.load)) {
    throw new Error("--load must be one of lazy, eager, background");
  }
  if (
    flags.id !== undefined &&
    (flags.id.length > MAX_ID_LENGTH || !/^[A-Za-z0-9._:-]+$/.test(flags.id))
  ) {
    throw new Error(
      `--id must be 1 to ${MAX_ID_LENGTH} letters, digits, '.', '_', ':' or '-' (got '${flags.id.slice(0, 80)}')`,
    );
  }
  const client = resolveClientConfig(flags);
  return {
    ...client,
    device: flags.device,
    vramBytes: parseBytes(flags.vram),
    linkGbps: parseNumberFlag("--link-gbps", flags.linkGbps, 0, 10_000),
    threads: parseIntegerFlag("--threads", flags.threads, 0, 1024),
    commitMemory: flags.commitMemory === true,
    id: flags.id,
    paramsBackend: flags.paramsBackend as "cpu" | "disk",
    load: flags.load as "lazy" | "eager" | "background",
    metricsPort: parsePortFlag("--metrics-port", flags.metricsPort),
    metricsHost: flags.metricsHost,
    peerListen: flags.peerListen === "" ? "" : parseAddressFlag("--peer-listen", flags.peerListen),
    peerAdvertise:
      flags.peerAdvertise === undefined
        ? undefined
        : parseAddressFlag("--peer-advertise", flags.peerAdvertise),
    peerTls:
      client.tls?.certFile && client.tls.keyFile
        ? {
            certFile: client.tls.certFile,
            keyFile: client.tls.keyFile,
            clientCaFile: client.tls.caFile,
          }
        : undefined,
    peerTlsName: flags.peerTlsName,
  };
}

/** Job priority and idempotency key flags of `ferry run`. */
export function parsePriorityFlag(text: string): number {
  return parseIntegerFlag("--priority", text, -MAX_PRIORITY, MAX_PRIORITY);
}

/** Parses an optional port flag (0 = any free port); unset stays unset. */
export function parsePortFlag(flag: string, text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  return parseIntegerFlag(flag, text, 0, 65_535);
}

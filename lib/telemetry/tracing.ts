import { createServer, type Server } from "node:http";
import { context, metrics, propagation, trace, type Attributes } from "@opentelemetry/api";
import type { NodeSDK } from "@opentelemetry/sdk-node";
import type { SpanExporter, SpanProcessor } from "@opentelemetry/sdk-trace-base";
import type { MetricReader } from "@opentelemetry/sdk-metrics";
import { ferryVersion } from "../packageInfo";

// The one place that sets up the OpenTelemetry SDK (@opentelemetry/sdk-node) for a process.
// Library code uses only @opentelemetry/api (see ./api.ts, re-exported here for old callers).
export { contextFromTraceparent, ferryMeter, ferryTracer, traceparentOf } from "./api";

export interface TelemetryOptions {
  /** `service.name` of this process; `OTEL_SERVICE_NAME` wins over it. */
  serviceName: string;
  /**
   * Resource attributes of this process (executor id, device, …); `OTEL_RESOURCE_ATTRIBUTES`
   * wins over them.
   */
  attributes?: Attributes;
  /** Serve Prometheus metrics at http://metricsHost:metricsPort/metrics; 0 = any free port. */
  metricsPort?: number;
  /** Where the metrics endpoint listens. @default "127.0.0.1" */
  metricsHost?: string;
}

export interface Telemetry {
  /** The span exporters in use ("file", "otlp/grpc", "otlp/http/protobuf", "console"). */
  traceExporters: string[];
  /** The Prometheus endpoint's URL, when one is served. */
  metricsUrl?: string;
}

interface Running {
  sdk?: NodeSDK;
  metricsServer?: Server;
}

let running: Running | undefined;

const OTLP_PROTOCOLS = ["grpc", "http/protobuf", "http/json"] as const;

/** A comma-separated OTEL_* list, trimmed, empty entries dropped. */
function envList(name: string): string[] {
  return (process.env[name] ?? "")
    .split(",")
    .map((item) => item.trim())
    .filter(Boolean);
}

/**
 * The span exporters `OTEL_TRACES_EXPORTER` asks for: `otlp` (over
 * `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL`: grpc, http/protobuf or
 * http/json; default http/protobuf), `console`, `none`. Unset means none unless an OTLP endpoint
 * is configured — unlike the SDK's own default of `otlp`, so that a machine without a collector
 * does not retry sends to localhost forever.
 */
function spanExportersFromEnv(): { name: string; exporter: SpanExporter }[] {
  let names = envList("OTEL_TRACES_EXPORTER");
  if (names.length === 0) {
    const endpoint =
      process.env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT || process.env.OTEL_EXPORTER_OTLP_ENDPOINT;
    names = endpoint ? ["otlp"] : [];
  }
  if (names.includes("none")) return [];
  return names.map((name) => {
    if (name === "console") {
      const { ConsoleSpanExporter } =
        require("@opentelemetry/sdk-trace-base") as typeof import("@opentelemetry/sdk-trace-base");
      return { name, exporter: new ConsoleSpanExporter() };
    }
    if (name !== "otlp") {
      throw new Error(
        `OTEL_TRACES_EXPORTER: unknown exporter '${name}' (known: otlp, console, none)`,
      );
    }
    const protocol = (
      process.env.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL ||
      process.env.OTEL_EXPORTER_OTLP_PROTOCOL ||
      "http/protobuf"
    ).trim();
    switch (protocol) {
      case "grpc": {
        const { OTLPTraceExporter } =
          require("@opentelemetry/exporter-trace-otlp-grpc") as typeof import("@opentelemetry/exporter-trace-otlp-grpc");
        return { name: `otlp/${protocol}`, exporter: new OTLPTraceExporter() };
      }
      case "http/protobuf": {
        const { OTLPTraceExporter } =
          require("@opentelemetry/exporter-trace-otlp-proto") as typeof import("@opentelemetry/exporter-trace-otlp-proto");
        return { name: `otlp/${protocol}`, exporter: new OTLPTraceExporter() };
      }
      case "http/json": {
        const { OTLPTraceExporter } =
          require("@opentelemetry/exporter-trace-otlp-http") as typeof import("@opentelemetry/exporter-trace-otlp-http");
        return { name: `otlp/${protocol}`, exporter: new OTLPTraceExporter() };
      }
      default:
        throw new Error(
          `OTEL_EXPORTER_OTLP_PROTOCOL: unknown protocol '${protocol}' (known: ${OTLP_PROTOCOLS.join(", ")})`,
        );
    }
  });
}

/** `OTEL_BSP_*` as the specification defines them (the SDK reads them only for its own exporters). */
function batchConfigFromEnv() {
  const number = (name: string) => {
    const text = process.env[name];
    if (text === undefined || text.trim() === "") return undefined;
    const value = Number(text);
    if (!Number.isFinite(value) || value < 0) {
      throw new Error(`${name} must be a non-negative number (got '${text}')`);
    }
    return value;
  };
  return {
    maxQueueSize: number("OTEL_BSP_MAX_QUEUE_SIZE"),
    scheduledDelayMillis: number("OTEL_BSP_SCHEDULE_DELAY"),
    exportTimeoutMillis: number("OTEL_BSP_EXPORT_TIMEOUT"),
    maxExportBatchSize: number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE"),
  };
}

async function startMetricsServer(
  reader: { getMetricsRequestHandler(req: unknown, res: unknown): void },
  host: string,
  port: number,
): Promise<{ server: Server; url: string }> {
  const server = createServer((request, response) => {
    const path = (request.url ?? "/").split("?")[0];
    if (request.method === "GET" && path === "/metrics") {
      reader.getMetricsRequestHandler(request, response);
      return;
    }
    response.statusCode = 404;
    response.setHeader("content-type", "text/plain; charset=utf-8");
    response.end("not found: metrics are at /metrics\n");
  });
  await new Promise<void>((resolveListen, reject) => {
    server.once("error", (error) =>
      reject(new Error(`cannot serve metrics on ${host}:${port}: ${error.message}`)),
    );
    server.listen(port, host, () => resolveListen());
  });
  const address = server.address();
  const boundPort = typeof address === "object" && address ? address.port : port;
  const shownHost = host.includes(":") ? `[${host}]` : host;
  return { server, url: `http://${shownHost}:${boundPort}/metrics` };
}

/**
 * Sets up tracing and metrics for one process; the only place that touches the SDK.
 *
 * Traces: `FERRY_TRACE_FILE=path` appends OTLP-JSON lines to that file (no collector needed);
 * `OTEL_TRACES_EXPORTER` (otlp, console, none) with the standard `OTEL_EXPORTER_OTLP_*`
 * variables adds the standard exporters; sampling follows `OTEL_TRACES_SAMPLER(_ARG)`, the
 * resource `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`, propagation `OTEL_PROPAGATORS`,
 * and `OTEL_SDK_DISABLED=true` turns it all off. With no exporter, spans are not recorded.
 * Metrics: a Prometheus endpoint when `metricsPort` is given, else `OTEL_METRICS_EXPORTER` if set.
 *
 * The SDK is loaded only when something is exported (it takes most of a second to load); the
 * W3C propagator is registered either way, so a process that records nothing still passes its
 * callers' trace context on.
 */
export async function setupTelemetry(options: TelemetryOptions): Promise<Telemetry> {
  if (running) throw new Error("telemetry is already set up in this process");
  const traceFile = process.env.FERRY_TRACE_FILE;
  const fromEnv = spanExportersFromEnv();
  const metricsFromEnv = envList("OTEL_METRICS_EXPORTER").filter((name) => name !== "none");
  const disabled = (process.env.OTEL_SDK_DISABLED ?? "").trim().toLowerCase() === "true";
  const wanted =
    !!traceFile ||
    fromEnv.length > 0 ||
    options.metricsPort !== undefined ||
    metricsFromEnv.length > 0;
  if (!wanted || disabled) {
    const { AsyncLocalStorageContextManager } =
      require("@opentelemetry/context-async-hooks") as typeof import("@opentelemetry/context-async-hooks");
    const { W3CTraceContextPropagator } =
      require("@opentelemetry/core") as typeof import("@opentelemetry/core");
    context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
    propagation.setGlobalPropagator(new W3CTraceContextPropagator());
    running = {};
    return { traceExporters: [] };
  }

  const { NodeSDK } =
    require("@opentelemetry/sdk-node") as typeof import("@opentelemetry/sdk-node");
  const { BatchSpanProcessor, SimpleSpanProcessor } =
    require("@opentelemetry/sdk-trace-base") as typeof import("@opentelemetry/sdk-trace-base");
  const { defaultResource, resourceFromAttributes } =
    require("@opentelemetry/resources") as typeof import("@opentelemetry/resources");
  const { FileSpanExporter } = require("./fileSpanExporter") as typeof import("./fileSpanExporter");

  const processors: SpanProcessor[] = [];
  const traceExporters: string[] = [];
  const batch = batchConfigFromEnv();
  if (traceFile) {
    // Batched like the network exporters: a span per append cost a step on the executor's
    // main thread ~8% more time on 2 cores (`ferry bench tracing`), a batch per half second
    // next to nothing. Shutdown flushes; a crash loses at most the last half second.
    processors.push(
      new BatchSpanProcessor(new FileSpanExporter(traceFile), {
        ...batch,
        scheduledDelayMillis: batch.scheduledDelayMillis ?? 500,
      }),
    );
    traceExporters.push("file");
  }
  for (const { name, exporter } of fromEnv) {
    processors.push(
      name === "console"
        ? new SimpleSpanProcessor(exporter)
        : new BatchSpanProcessor(exporter, batch),
    );
    traceExporters.push(name);
  }

  let metricReaders: MetricReader[] | undefined = [];
  let prometheus: { getMetricsRequestHandler(req: unknown, res: unknown): void } | undefined;
  if (options.metricsPort !== undefined) {
    const { PrometheusExporter } =
      require("@opentelemetry/exporter-prometheus") as typeof import("@opentelemetry/exporter-prometheus");
    // Ferry serves the endpoint itself so that port 0 works and the bound port can be printed.
    const exporter = new PrometheusExporter({ preventServerStart: true });
    prometheus = exporter;
    metricReaders = [exporter];
  } else if (metricsFromEnv.length > 0) {
    metricReaders = undefined; // the SDK builds the readers OTEL_METRICS_EXPORTER names
  }

  const sdk = new NodeSDK({
    // Env detection (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES) is merged over this.
    resource: defaultResource().merge(
      resourceFromAttributes({
        "service.name": options.serviceName,
        "service.version": ferryVersion(),
        ...options.attributes,
      }),
    ),
    spanProcessors: processors,
    metricReaders,
    // Ferry emits no OpenTelemetry logs; without this the SDK would set up an OTLP log exporter.
    logRecordProcessors: [],
  });
  sdk.start();
  running = { sdk };
  const telemetry: Telemetry = { traceExporters };
  if (prometheus) {
    const { server, url } = await startMetricsServer(
      prometheus,
      options.metricsHost ?? "127.0.0.1",
      options.metricsPort ?? 0,
    );
    running.metricsServer = server;
    telemetry.metricsUrl = url;
  }
  return telemetry;
}

/**
 * Tracing only, set up synchronously (no metrics endpoint): what entry points called before
 * metrics existed.
 * @deprecated use setupTelemetry
 */
export function setupTracing(serviceName: string): void {
  void setupTelemetry({ serviceName }).catch((error: unknown) => {
    process.stderr.write(`ferry: telemetry: ${(error as Error).message}\n`);
  });
}

/**
 * Flushes and stops the exporters and the metrics endpoint, then unregisters the globals so
 * telemetry can be set up again (`ferry bench tracing` measures each exporter in turn); call
 * last on shutdown.
 */
export async function shutdownTelemetry(): Promise<void> {
  const current = running;
  running = undefined;
  if (!current) return;
  await new Promise<void>((done) => {
    if (!current.metricsServer) return done();
    current.metricsServer.close(() => done());
    current.metricsServer.closeAllConnections();
  });
  await current.sdk?.shutdown();
  trace.disable();
  metrics.disable();
  propagation.disable();
  context.disable();
}

/** @deprecated use shutdownTelemetry */
export const shutdownTracing = shutdownTelemetry;

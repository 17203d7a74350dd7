import { context, propagation, trace, type Context, type Tracer } from "@opentelemetry/api";
import { AsyncLocalStorageContextManager } from "@opentelemetry/context-async-hooks";
import { W3CTraceContextPropagator } from "@opentelemetry/core";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { resourceFromAttributes } from "@opentelemetry/resources";
import {
  BasicTracerProvider,
  BatchSpanProcessor,
  ConsoleSpanExporter,
  SimpleSpanProcessor,
  type SpanProcessor,
} from "@opentelemetry/sdk-trace-base";
import { ferryVersion } from "../packageInfo";
import { FileSpanExporter } from "./fileSpanExporter";

/** The tracer library code uses; a no-op until a process entry point calls setupTracing. */
export function ferryTracer(): Tracer {
  return trace.getTracer("ferry", ferryVersion());
}

let provider: BasicTracerProvider | undefined;

/**
 * Sets up the OpenTelemetry SDK for one process; the only place that does. Exporters:
 * - `FERRY_TRACE_FILE=path`: append OTLP-JSON lines to that file (no collector needed);
 * - `OTEL_TRACES_EXPORTER=otlp` (or `OTEL_EXPORTER_OTLP_ENDPOINT` set): OTLP over HTTP, configured
 *   by the standard `OTEL_EXPORTER_OTLP_*` variables;
 * - `OTEL_TRACES_EXPORTER=console`: print spans.
 * With none of these, spans are not recorded at all.
 */
export function setupTracing(serviceName: string, env: NodeJS.ProcessEnv = process.env): void {
  if (provider) return;
  const processors: SpanProcessor[] = [];
  const traceFile = env.FERRY_TRACE_FILE;
  // The file exporter is synchronous and cheap; exporting each span as it ends means a crash
  // loses nothing already finished.
  if (traceFile) processors.push(new SimpleSpanProcessor(new FileSpanExporter(traceFile)));
  const exporters = (env.OTEL_TRACES_EXPORTER ?? "").split(",").map((name) => name.trim());
  if (
    exporters.includes("otlp") ||
    (env.OTEL_EXPORTER_OTLP_ENDPOINT && !exporters.includes("none"))
  ) {
    processors.push(new BatchSpanProcessor(new OTLPTraceExporter()));
  }
  if (exporters.includes("console")) {
    processors.push(new SimpleSpanProcessor(new ConsoleSpanExporter()));
  }
  context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
  propagation.setGlobalPropagator(new W3CTraceContextPropagator());
  if (processors.length === 0) return;
  provider = new BasicTracerProvider({
    resource: resourceFromAttributes({
      "service.name": serviceName,
      "service.version": ferryVersion(),
    }),
    spanProcessors: processors,
  });
  trace.setGlobalTracerProvider(provider);
}

/** Flushes and stops the exporters; call last on shutdown. */
export async function shutdownTracing(): Promise<void> {
  const current = provider;
  provider = undefined;
  if (current) await current.shutdown();
}

/** The W3C `traceparent` of a context, for carrying it inside a message. */
export function traceparentOf(ctx: Context): string {
  const carrier: Record<string, string> = {};
  propagation.inject(ctx, carrier);
  return carrier.traceparent ?? "";
}

/** A context whose parent is the span named by a W3C `traceparent` string. */
export function contextFromTraceparent(traceparent: string): Context {
  if (!traceparent) return context.active();
  return propagation.extract(context.active(), { traceparent });
}

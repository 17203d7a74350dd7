import {
  context,
  metrics,
  propagation,
  trace,
  type Context,
  type Meter,
  type Tracer,
} from "@opentelemetry/api";
import { ferryVersion } from "../packageInfo";

// What library code uses for telemetry: only @opentelemetry/api. The SDK behind it is set up
// once per process by its entry point (lib/telemetry/tracing.ts); until then these are no-ops.

/** The tracer library code uses. */
export function ferryTracer(): Tracer {
  return trace.getTracer("ferry", ferryVersion());
}

/**
 * The meter library code uses. Unlike tracers, the metrics API has no proxy: a meter taken
 * before the SDK is set up stays a no-op, so take it when the service object is built.
 */
export function ferryMeter(): Meter {
  return metrics.getMeter("ferry", ferryVersion());
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

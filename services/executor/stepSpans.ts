import { trace, type Context } from "@opentelemetry/api";
import { ferryTracer } from "../../lib/telemetry/tracing";
import type { NativeStepReport } from "../../lib/native/AddonTypes";

const usToMs = (us: number) => us / 1000;

/**
 * Turns one step's native timestamps into spans with their real start and end times:
 * ferry.step → ferry.segment (one per merged segment) → ferry.prepare_params / ferry.h2d /
 * ferry.compute. Built after the step ends, so the hot loop never waits on JavaScript.
 */
export function recordStepSpans(parent: Context, jobId: string, report: NativeStepReport): void {
  const tracer = ferryTracer();
  const step = tracer.startSpan(
    "ferry.step",
    {
      startTime: usToMs(report.stepStartUs),
      attributes: {
        "ferry.job.id": jobId,
        "ferry.step": report.step,
        "ferry.h2d_bytes": report.h2dBytes,
        "ferry.disk_bytes": report.diskBytes,
        "ferry.arena_peak_bytes": report.arenaPeakBytes,
      },
    },
    parent,
  );
  const stepContext = trace.setSpan(parent, step);
  const segments = report.events.filter((event) => event.kind === "segment");
  for (const segmentEvent of segments) {
    const segment = tracer.startSpan(
      "ferry.segment",
      {
        startTime: usToMs(segmentEvent.startUs),
        attributes: {
          "ferry.segment.index": segmentEvent.segment,
          "ferry.source": segmentEvent.source ?? "host",
          "ferry.bytes": segmentEvent.bytes,
        },
      },
      stepContext,
    );
    const segmentContext = trace.setSpan(stepContext, segment);
    for (const event of report.events) {
      if (event.kind === "segment" || event.segment !== segmentEvent.segment) continue;
      const seconds = (event.endUs - event.startUs) / 1e6;
      const attributes: Record<string, string | number | boolean> = {
        "ferry.segment.index": event.segment,
        "ferry.bytes": event.bytes,
      };
      if (event.source) attributes["ferry.source"] = event.source;
      if (event.cold !== undefined) attributes["ferry.cold"] = event.cold;
      if (event.kind === "h2d" && seconds > 0)
        attributes["ferry.gbps"] = event.bytes / seconds / 1e9;
      tracer
        .startSpan(
          `ferry.${event.kind}`,
          { startTime: usToMs(event.startUs), attributes },
          segmentContext,
        )
        .end(usToMs(event.endUs));
    }
    segment.end(usToMs(segmentEvent.endUs));
  }
  step.end(usToMs(report.stepEndUs));
}

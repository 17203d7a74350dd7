import { trace, type Attributes, type Context } from "@opentelemetry/api";
import { ferryTracer } from "../../lib/telemetry/api";
import type { NativeRunEvent, NativeStepReport } from "../../lib/native/AddonTypes";

const usToMs = (us: number) => us / 1000;

/** What every span of a job's steps says about the job. */
export interface StepSpanContext {
  jobId: string;
  /** The plan's policy ("sdcpp", "ferry", …). */
  policy: string;
  /** The device's name, as the executor reports it. */
  device: string;
}

interface Interval {
  startUs: number;
  endUs: number;
}

/** Microseconds of `interval` covered by any of `cover` (overlapping covers counted once). */
export function coveredUs(interval: Interval, cover: readonly Interval[]): number {
  const pieces = cover
    .map((c) => [Math.max(c.startUs, interval.startUs), Math.min(c.endUs, interval.endUs)])
    .filter(([start, end]) => end > start)
    .sort((a, b) => a[0] - b[0]);
  let total = 0;
  let reach = interval.startUs;
  for (const [start, end] of pieces) {
    const from = Math.max(start, reach);
    if (end > from) total += end - from;
    reach = Math.max(reach, end);
  }
  return total;
}

/** A "read" event: weights read from disk ahead of use (`--load eager|background`). */
function isRead(event: NativeRunEvent): boolean {
  return event.kind === "read";
}

/**
 * Turns a job's per-step native timestamps into spans with their real start and end times:
 * ferry.step → ferry.segment (one per merged segment) → ferry.prepare_params / ferry.h2d /
 * ferry.compute, and ferry.read (reads ahead of use) under the step; a pipeline stage's waits
 * for its activations as ferry.handoff_wait. Built after each step
 * ends, so the hot loop never waits on JavaScript.
 *
 * One recorder per job: a copy prefetched during step t−1 for step t overlaps step t−1's
 * computes, so `ferry.hidden_fraction` needs the previous step's compute intervals.
 */
export class StepSpanRecorder {
  private previousComputes: Interval[] = [];

  constructor(
    private readonly parent: Context,
    private readonly job: StepSpanContext,
  ) {}

  record(report: NativeStepReport): void {
    const tracer = ferryTracer();
    const computes = report.events.filter((event) => event.kind === "compute");
    const overlapping = [...this.previousComputes, ...computes];
    this.previousComputes = computes;
    const copies = report.events.filter((event) => event.kind === "h2d");
    const copyUs = copies.reduce((sum, event) => sum + (event.endUs - event.startUs), 0);
    const hiddenUs = copies.reduce((sum, event) => sum + coveredUs(event, overlapping), 0);
    const step = tracer.startSpan(
      "ferry.step",
      {
        startTime: usToMs(report.stepStartUs),
        attributes: {
          "ferry.job.id": this.job.jobId,
          "ferry.policy": this.job.policy,
          "ferry.device": this.job.device,
          "ferry.step": report.step,
          "ferry.h2d_bytes": report.h2dBytes,
          "ferry.disk_bytes": report.diskBytes,
          "ferry.arena_peak_bytes": report.arenaPeakBytes,
          "ferry.stall_s": report.stallUs / 1e6,
          "ferry.hidden_fraction": copyUs > 0 ? hiddenUs / copyUs : 0,
        },
      },
      this.parent,
    );
    // Sampled out or tracing off: the children would not be recorded either.
    if (!step.isRecording()) {
      step.end(usToMs(report.stepEndUs));
      return;
    }
    const stepContext = trace.setSpan(this.parent, step);
    this.recordReads(
      report.events.filter((event) => isRead(event)),
      stepContext,
    );
    for (const segmentEvent of report.events.filter((event) => event.kind === "segment")) {
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
        if (event.kind === "segment" || isRead(event) || event.segment !== segmentEvent.segment)
          continue;
        const attributes = this.eventAttributes(event);
        if (event.kind === "h2d" && event.endUs > event.startUs) {
          attributes["ferry.hidden_fraction"] =
            coveredUs(event, overlapping) / (event.endUs - event.startUs);
        }
        if (event.kind === "compute") attributes["ferry.stall_s"] = (event.stallUs ?? 0) / 1e6;
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

  /**
   * `ferry.read` spans for weights read ahead of use, under `parent` (a step's context, or the
   * job's when reads are reported outside any step).
   */
  recordReads(events: readonly NativeRunEvent[], parent: Context = this.parent): void {
    const tracer = ferryTracer();
    for (const event of events) {
      const attributes = this.eventAttributes(event);
      attributes["ferry.source"] = event.source ?? "disk";
      attributes["ferry.job.id"] = this.job.jobId;
      tracer
        .startSpan("ferry.read", { startTime: usToMs(event.startUs), attributes }, parent)
        .end(usToMs(event.endUs));
    }
  }

  /**
   * A pipeline stage's wait for the previous stage's activations before `step` (a stage's step
   * spans start once they have arrived): `ferry.handoff_wait`, under the job.
   */
  recordHandoffWait(step: number, startUs: number, endUs: number, stage: number): void {
    if (endUs <= startUs) return;
    ferryTracer()
      .startSpan(
        "ferry.handoff_wait",
        {
          startTime: usToMs(startUs),
          attributes: {
            "ferry.job.id": this.job.jobId,
            "ferry.step": step,
            "ferry.stage.index": stage,
          },
        },
        this.parent,
      )
      .end(usToMs(endUs));
  }

  private eventAttributes(event: NativeRunEvent): Attributes {
    const seconds = (event.endUs - event.startUs) / 1e6;
    const attributes: Attributes = {
      "ferry.segment.index": event.segment,
      "ferry.bytes": event.bytes,
    };
    if (event.source) attributes["ferry.source"] = event.source;
    if (event.cold !== undefined) attributes["ferry.cold"] = event.cold;
    if (event.kind !== "compute" && seconds > 0)
      attributes["ferry.gbps"] = event.bytes / seconds / 1e9;
    return attributes;
  }
}

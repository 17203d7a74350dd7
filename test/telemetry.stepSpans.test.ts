import { context, trace } from "@opentelemetry/api";
import {
  BasicTracerProvider,
  InMemorySpanExporter,
  SimpleSpanProcessor,
} from "@opentelemetry/sdk-trace-base";
import { afterAll, describe, expect, it } from "vitest";
import type { NativeRunEvent, NativeStepReport } from "../lib/native/AddonTypes";
import { StepSpanRecorder } from "../services/executor/stepSpans";

// The recorder against a real SDK pipeline (in memory), fed step reports shaped as the addon
// delivers them: what the executor turns native timestamps into.
const exporter = new InMemorySpanExporter();
const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
trace.setGlobalTracerProvider(provider);
afterAll(() => provider.shutdown());

const T = 1_800_000_000_000_000; // µs since the epoch
const event = (
  kind: string,
  segment: number,
  startMs: number,
  endMs: number,
  extra: Partial<NativeRunEvent> = {},
): NativeRunEvent => ({
  kind: kind as NativeRunEvent["kind"],
  segment,
  startUs: T + startMs * 1000,
  endUs: T + endMs * 1000,
  bytes: 1_000_000,
  ...extra,
});

function report(
  step: number,
  fromMs: number,
  toMs: number,
  events: NativeRunEvent[],
): NativeStepReport {
  return {
    step,
    stepStartUs: T + fromMs * 1000,
    stepEndUs: T + toMs * 1000,
    h2dBytes: 1_000_000,
    diskBytes: 0,
    arenaPeakBytes: 0,
    stallUs: 2000,
    residentHitBytes: 0,
    allocations: 0,
    hostPeakBytes: 0,
    events,
  };
}

describe("step spans", () => {
  it("say how much of each copy compute hid, also across the step boundary, and how long compute waited", () => {
    exporter.reset();
    const recorder = new StepSpanRecorder(context.active(), {
      jobId: "job-1",
      policy: "ferry",
      device: "cpu",
    });
    // Step 1 computes segment 0 over 0–10 ms; segment 1's copy for step 2 runs 5–15 ms, so half
    // of it hides behind step 1's compute although it is reported with step 2.
    recorder.record(
      report(1, 0, 10, [
        event("segment", 0, 0, 10, { source: "host" }),
        event("compute", 0, 0, 10, { stallUs: 0 }),
      ]),
    );
    recorder.record(
      report(2, 10, 30, [
        event("segment", 1, 5, 30, { source: "host" }),
        event("prepare_params", 1, 5, 5, { source: "host", cold: false }),
        event("h2d", 1, 5, 15),
        event("compute", 1, 17, 30, { stallUs: 2000 }),
        // Weights of a later segment read ahead of use (the loader's future "read" events).
        event("read", 2, 12, 16, { source: "disk" }),
      ]),
    );
    const spans = exporter.getFinishedSpans();
    const named = (name: string) => spans.filter((s) => s.name === name);
    const h2d = named("ferry.h2d")[0];
    expect(h2d.attributes["ferry.hidden_fraction"]).toBeCloseTo(0.5, 9);
    expect(h2d.attributes["ferry.gbps"]).toBeCloseTo(1_000_000 / 0.01 / 1e9, 9);
    const steps = named("ferry.step");
    expect(steps.map((s) => s.attributes["ferry.step"])).toEqual([1, 2]);
    expect(steps[1].attributes).toMatchObject({
      "ferry.job.id": "job-1",
      "ferry.policy": "ferry",
      "ferry.device": "cpu",
      "ferry.stall_s": 0.002,
    });
    expect(steps[1].attributes["ferry.hidden_fraction"]).toBeCloseTo(0.5, 9);
    const compute = named("ferry.compute").find((s) => s.attributes["ferry.segment.index"] === 1)!;
    expect(compute.attributes["ferry.stall_s"]).toBeCloseTo(0.002, 9);
    // The read is a span of its own under the step, with its rate.
    const read = named("ferry.read");
    expect(read).toHaveLength(1);
    expect(read[0].parentSpanContext?.spanId).toBe(steps[1].spanContext().spanId);
    expect(read[0].attributes).toMatchObject({
      "ferry.segment.index": 2,
      "ferry.source": "disk",
      "ferry.job.id": "job-1",
    });
    expect(read[0].attributes["ferry.gbps"]).toBeCloseTo(0.25, 9);
    // Leaves sit under their segment, segments under their step.
    const segment1 = named("ferry.segment").find((s) => s.attributes["ferry.segment.index"] === 1)!;
    expect(h2d.parentSpanContext?.spanId).toBe(segment1.spanContext().spanId);
    expect(segment1.parentSpanContext?.spanId).toBe(steps[1].spanContext().spanId);
  });

  it("show a pipeline stage's wait for its activations, and nothing when there was none", () => {
    exporter.reset();
    const recorder = new StepSpanRecorder(context.active(), {
      jobId: "job-2.a1.s1",
      policy: "ferry",
      device: "cpu",
    });
    recorder.recordHandoffWait(2, T + 10_000, T + 13_000, 1);
    recorder.recordHandoffWait(3, T + 20_000, T + 20_000, 1);
    const waits = exporter.getFinishedSpans().filter((s) => s.name === "ferry.handoff_wait");
    expect(waits).toHaveLength(1);
    expect(waits[0].attributes).toMatchObject({
      "ferry.job.id": "job-2.a1.s1",
      "ferry.step": 2,
      "ferry.stage.index": 1,
    });
    const ms = (t: [number, number]) => t[0] * 1000 + t[1] / 1e6;
    expect(ms(waits[0].endTime) - ms(waits[0].startTime)).toBeCloseTo(3, 3);
  });
});

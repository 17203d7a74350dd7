import type { Counter, Gauge, Histogram } from "@opentelemetry/api";
import { ferryMeter } from "../../lib/telemetry/api";
import type { NativeStepReport } from "../../lib/native/AddonTypes";

/** Seconds: from a fast step on a small model to a slow one on a big model. */
const SECONDS_BUCKETS = [
  0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
];

/** What the executor's observable gauges read when Prometheus scrapes. */
export interface ExecutorMetricsSource {
  executorId: string;
  /** Device memory: total and what a new job could have. */
  memory(): { totalBytes: number; freeBytes: number };
  /** Models opened and kept warm (their host params caches), by path. */
  warmModels(): string[];
}

/**
 * The executor's OpenTelemetry metrics (Prometheus names; deploy/grafana/ferry.json uses them):
 * - `ferry_moved_bytes_total{tier}`: bytes moved per tier — `disk` (read from the model file),
 *   `host` (served from the host params cache), `h2d` (copied host→device);
 * - `ferry_step_duration_seconds`, `ferry_stall_duration_seconds`: per step, histograms;
 * - `ferry_slot_occupancy_ratio`: share of the last step during which the staging slots held a
 *   segment (copying into it or computing from it); `ferry_staging_slots`: the plan's slots;
 * - `ferry_resident_bytes{model}`: bytes the model's last plan kept resident on the device;
 * - `ferry_device_memory_bytes{state}`: `total` and `free` device memory.
 * Every series carries `executor`; step series carry `policy`.
 */
export class ExecutorMetrics {
  private readonly movedBytes: Counter;
  private readonly stepSeconds: Histogram;
  private readonly stallSeconds: Histogram;
  private readonly slotOccupancy: Gauge;
  private readonly stagingSlots: Gauge;
  private readonly residentByModel = new Map<string, number>();

  constructor(private readonly source: ExecutorMetricsSource) {
    const meter = ferryMeter();
    this.movedBytes = meter.createCounter("ferry_moved_bytes", {
      description: "Weight bytes moved, by tier: disk (file → host), host (host cache), h2d",
      unit: "By",
    });
    const histogram = { unit: "s", advice: { explicitBucketBoundaries: SECONDS_BUCKETS } };
    this.stepSeconds = meter.createHistogram("ferry_step_duration_seconds", {
      ...histogram,
      description: "Wall time of one step, from the executor's native timestamps",
    });
    this.stallSeconds = meter.createHistogram("ferry_stall_duration_seconds", {
      ...histogram,
      description: "Time compute waited for weights in one step",
    });
    this.slotOccupancy = meter.createGauge("ferry_slot_occupancy_ratio", {
      description: "Share of the last step the staging slots held a segment (0..1)",
    });
    this.stagingSlots = meter.createGauge("ferry_staging_slots", {
      description: "Staging slots of the running plan (0 = a fresh buffer per segment)",
    });
    const executor = source.executorId;
    meter
      .createObservableGauge("ferry_resident_bytes", {
        description: "Device bytes of weights the model's last plan kept resident",
        unit: "By",
      })
      .addCallback((result) => {
        const warm = new Set(this.source.warmModels());
        for (const [model, bytes] of this.residentByModel) {
          // A model closed on this executor has no resident weights here any more.
          if (!warm.has(model)) this.residentByModel.delete(model);
          else result.observe(bytes, { executor, model });
        }
      });
    meter
      .createObservableGauge("ferry_device_memory_bytes", {
        description: "Device memory: total, and free for a new job",
        unit: "By",
      })
      .addCallback((result) => {
        let memory;
        try {
          memory = this.source.memory();
        } catch {
          return; // the device is gone (the executor is stopping): nothing to report
        }
        result.observe(memory.totalBytes, { executor, state: "total" });
        result.observe(memory.freeBytes, { executor, state: "free" });
      });
  }

  /** A job starts with this plan. */
  jobStarted(model: string, residentBytes: number, slots: number): void {
    this.residentByModel.set(model, residentBytes);
    this.stagingSlots.record(slots, { executor: this.source.executorId });
  }

  recordStep(report: NativeStepReport, policy: string, slots: number): void {
    const executor = this.source.executorId;
    let hostBytes = 0;
    for (const event of report.events) {
      if (event.kind === "prepare_params" && !event.cold) hostBytes += event.bytes;
    }
    this.movedBytes.add(report.diskBytes, { executor, tier: "disk" });
    this.movedBytes.add(hostBytes, { executor, tier: "host" });
    this.movedBytes.add(report.h2dBytes, { executor, tier: "h2d" });
    const stepUs = report.stepEndUs - report.stepStartUs;
    this.stepSeconds.record(stepUs / 1e6, { executor, policy });
    this.stallSeconds.record(report.stallUs / 1e6, { executor, policy });
    this.slotOccupancy.record(slotOccupancy(report, slots), { executor });
  }
}

/**
 * Share of a step during which its staging slots (or, with none, the one fresh buffer a segment
 * gets) held a streamed segment: from the start of its copy to the end of its compute, clipped
 * to the step, over slots × step time.
 */
export function slotOccupancy(report: NativeStepReport, slots: number): number {
  const stepUs = report.stepEndUs - report.stepStartUs;
  if (stepUs <= 0) return 0;
  let heldUs = 0;
  for (const copy of report.events.filter((event) => event.kind === "h2d")) {
    const compute = report.events.find(
      (event) => event.kind === "compute" && event.segment === copy.segment,
    );
    const start = Math.max(copy.startUs, report.stepStartUs);
    const end = Math.min(compute?.endUs ?? copy.endUs, report.stepEndUs);
    if (end > start) heldUs += end - start;
  }
  return Math.min(1, heldUs / (Math.max(1, slots) * stepUs));
}

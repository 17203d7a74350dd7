import type { StepStats } from "../../gen/ferry/v1/scheduler";
import type { TraceSpan } from "./traceReport";

/**
 * What the report table, the Chrome trace and the timeline picture are all drawn from: one job's
 * steps on one executor, with the executor's native timestamps (µs since the Unix epoch). Built
 * either from trace spans (a FERRY_TRACE_FILE, an OTLP receiver) or from the step events the
 * executor streams to the scheduler (the status page).
 */
export type SliceKind = "read" | "prepare_params" | "h2d" | "compute";

export const SLICE_KINDS: readonly SliceKind[] = ["read", "prepare_params", "h2d", "compute"];

export interface TimelineSlice {
  kind: SliceKind;
  /** Merged segment index in the plan. */
  segment: number;
  startUs: number;
  endUs: number;
  bytes: number;
  /** Where the weights came from: "disk", "host" or "resident" ("" when not said). */
  source: string;
  /** prepare_params: it read from disk. */
  cold: boolean;
  /** compute: how long it waited for its weights just before it started, µs. */
  stallUs: number;
  /** The step it belongs to (1-based); 0 = outside any step (a read before step 1). */
  step: number;
}

export interface TimelineStep {
  step: number;
  startUs: number;
  endUs: number;
  /** How long compute waited for weights in this step, µs. */
  stallUs: number;
}

export interface TimelineJob {
  jobId: string;
  /** The plan's policy ("sdcpp", "ferry", …); "" when the trace does not say. */
  policy: string;
  /** The executor (one process per executor in a Chrome trace). */
  executor: string;
  device: string;
  /** Where it was read from (a trace file's name), to tell stacked traces apart. */
  origin: string;
  /** In step order. */
  steps: TimelineStep[];
  /** In start order. */
  slices: TimelineSlice[];
}

const SPAN_KINDS: Record<string, SliceKind> = {
  "ferry.read": "read",
  "ferry.prepare_params": "prepare_params",
  "ferry.h2d": "h2d",
  "ferry.compute": "compute",
};

const toUs = (ns: bigint) => Number(ns / 1000n);
const num = (value: unknown, fallback = 0) =>
  typeof value === "number" && Number.isFinite(value) ? value : fallback;
const str = (value: unknown) => (typeof value === "string" ? value : "");

function sortJob(job: TimelineJob): TimelineJob {
  job.steps.sort((a, b) => a.step - b.step || a.startUs - b.startUs);
  job.slices.sort((a, b) => a.startUs - b.startUs || a.endUs - b.endUs);
  return job;
}

/** When a job began: its first step or slice. */
export function jobStartUs(job: TimelineJob): number {
  let start = Infinity;
  for (const step of job.steps) start = Math.min(start, step.startUs);
  for (const slice of job.slices) start = Math.min(start, slice.startUs);
  return Number.isFinite(start) ? start : 0;
}

/** When a job ended: its last step or slice. */
export function jobEndUs(job: TimelineJob): number {
  let end = -Infinity;
  for (const step of job.steps) end = Math.max(end, step.endUs);
  for (const slice of job.slices) end = Math.max(end, slice.endUs);
  return Number.isFinite(end) ? end : 0;
}

/**
 * The jobs in a set of spans, in the order they started: each `ferry.step` span and the
 * prepare/h2d/compute/read spans below it (through `ferry.segment`), plus `ferry.read` spans
 * outside any step that name their job (`ferry.job.id`). Spans of other services (the
 * scheduler's `ferry.job`) only lend the job its policy.
 */
export function jobsFromSpans(spans: readonly TraceSpan[], origin = ""): TimelineJob[] {
  const byId = new Map<string, TraceSpan>();
  for (const span of spans) byId.set(`${span.traceId}/${span.spanId}`, span);
  const parentOf = (span: TraceSpan) =>
    span.parentSpanId ? byId.get(`${span.traceId}/${span.parentSpanId}`) : undefined;
  const policyOfJob = new Map<string, string>();
  for (const span of spans) {
    if (span.name === "ferry.job") {
      policyOfJob.set(str(span.attributes["ferry.job.id"]), str(span.attributes["ferry.policy"]));
    }
  }
  const jobs = new Map<string, TimelineJob>();
  const jobOf = (id: string, span: TraceSpan): TimelineJob => {
    let job = jobs.get(id);
    if (!job) {
      const executor =
        str(span.resource["service.instance.id"]) ||
        str(span.resource["ferry.executor.id"]) ||
        str(span.resource["service.name"]) ||
        "executor";
      job = {
        jobId: id,
        policy: str(span.attributes["ferry.policy"]) || policyOfJob.get(id) || "",
        executor,
        device: str(span.attributes["ferry.device"]) || str(span.resource["ferry.device.name"]),
        origin,
        steps: [],
        slices: [],
      };
      jobs.set(id, job);
    }
    return job;
  };
  const jobIdOfStep = (step: TraceSpan) =>
    str(step.attributes["ferry.job.id"]) || `trace-${step.traceId.slice(0, 8)}`;

  for (const span of spans) {
    if (span.name !== "ferry.step") continue;
    const job = jobOf(jobIdOfStep(span), span);
    const stallS = span.attributes["ferry.stall_s"];
    job.steps.push({
      step: num(span.attributes["ferry.step"]),
      startUs: toUs(span.startNs),
      endUs: toUs(span.endNs),
      // Older traces carry no step stall; the compute spans' stalls are summed below then.
      stallUs: typeof stallS === "number" ? stallS * 1e6 : -1,
    });
  }
  for (const span of spans) {
    const kind = SPAN_KINDS[span.name];
    if (!kind) continue;
    let step: TraceSpan | undefined;
    for (let up = parentOf(span), depth = 0; up && depth < 8; up = parentOf(up), depth++) {
      if (up.name === "ferry.step") {
        step = up;
        break;
      }
    }
    const ownJob = str(span.attributes["ferry.job.id"]);
    if (!step && !ownJob) continue;
    const job = step ? jobOf(jobIdOfStep(step), step) : jobOf(ownJob, span);
    const stallS = num(span.attributes["ferry.stall_s"]);
    job.slices.push({
      kind,
      segment: num(span.attributes["ferry.segment.index"], -1),
      startUs: toUs(span.startNs),
      endUs: toUs(span.endNs),
      bytes: num(span.attributes["ferry.bytes"]),
      source: str(span.attributes["ferry.source"]),
      cold: span.attributes["ferry.cold"] === true,
      stallUs: stallS * 1e6,
      step: step ? num(step.attributes["ferry.step"]) : 0,
    });
  }
  for (const job of jobs.values()) {
    for (const step of job.steps) {
      if (step.stallUs >= 0) continue;
      step.stallUs = job.slices
        .filter((slice) => slice.step === step.step && slice.kind === "compute")
        .reduce((sum, slice) => sum + slice.stallUs, 0);
    }
    sortJob(job);
  }
  return [...jobs.values()].sort((a, b) => jobStartUs(a) - jobStartUs(b));
}

/** A job as the scheduler saw it: the step events its executor streamed with each step. */
export function jobFromStepStats(
  meta: Omit<TimelineJob, "steps" | "slices">,
  stats: readonly StepStats[],
): TimelineJob {
  const job: TimelineJob = { ...meta, steps: [], slices: [] };
  for (const step of stats) {
    job.steps.push({
      step: step.step,
      startUs: step.startUs,
      endUs: step.endUs,
      stallUs: step.stallSeconds * 1e6,
    });
    for (const event of step.events) {
      const kind = SLICE_KINDS.find((name) => name === event.kind);
      if (!kind) continue;
      job.slices.push({
        kind,
        segment: event.segment,
        startUs: event.startUs,
        endUs: event.endUs,
        bytes: event.bytes,
        source: event.source,
        cold: event.cold,
        stallUs: event.stallUs,
        step: step.step,
      });
    }
  }
  return sortJob(job);
}

/** The job with only its first `steps` steps (and what came before step 1). */
export function firstSteps(job: TimelineJob, steps: number): TimelineJob {
  if (!(steps > 0) || job.steps.length <= steps) return job;
  const last = job.steps[steps - 1].step;
  return {
    ...job,
    steps: job.steps.filter((step) => step.step <= last),
    slices: job.slices.filter((slice) => slice.step <= last),
  };
}

// ---- lanes: what the Chrome trace and the picture lay out ----

export type LaneName = "read" | "copy" | "compute";

/** One drawn thing: a slice, or the wait before a compute ("stall"). */
export interface LaneItem {
  kind: SliceKind | "stall";
  slice: TimelineSlice;
  startUs: number;
  endUs: number;
}

export interface Lane {
  name: LaneName;
  /** Rows of items that do not overlap; overlapping work gets another row. */
  rows: LaneItem[][];
}

const LANE_OF: Record<SliceKind, LaneName> = {
  read: "read",
  prepare_params: "copy",
  h2d: "copy",
  compute: "compute",
};

/**
 * A job's lanes: reads ahead of use (only when there are any), the copy engine
 * (prepare_params and h2d) and compute, with each compute's wait for its weights drawn just
 * before it. Items that overlap in one lane (a reader thread running beside the copy thread)
 * go on extra rows rather than hiding each other.
 */
export function laneLayout(job: TimelineJob): Lane[] {
  const items = new Map<LaneName, LaneItem[]>([
    ["read", []],
    ["copy", []],
    ["compute", []],
  ]);
  for (const slice of job.slices) {
    items
      .get(LANE_OF[slice.kind])!
      .push({ kind: slice.kind, slice, startUs: slice.startUs, endUs: slice.endUs });
  }
  const lanes: Lane[] = [];
  for (const [name, laneItems] of items) {
    if (name === "read" && laneItems.length === 0) continue;
    laneItems.sort((a, b) => a.startUs - b.startUs || a.endUs - b.endUs);
    const rows: LaneItem[][] = [];
    const rowEnds: number[] = [];
    for (const item of laneItems) {
      let row = rowEnds.findIndex((end) => end <= item.startUs);
      if (row < 0) {
        row = rows.length;
        rows.push([]);
        rowEnds.push(-Infinity);
      }
      // A compute's wait sits just before it in its row, never over the work before it (the
      // native stall and the previous compute's end can disagree by a rounding).
      if (item.kind === "compute" && item.slice.stallUs > 0) {
        const from = Math.max(item.startUs - item.slice.stallUs, rowEnds[row]);
        if (item.startUs > from) {
          rows[row].push({ kind: "stall", slice: item.slice, startUs: from, endUs: item.startUs });
        }
      }
      rows[row].push(item);
      rowEnds[row] = Math.max(rowEnds[row], item.endUs);
    }
    lanes.push({ name, rows: rows.length > 0 ? rows : [[]] });
  }
  return lanes;
}

/** A slice's rate, GB/s, when it moved bytes; undefined for compute. */
export function sliceGbps(slice: TimelineSlice): number | undefined {
  const seconds = (slice.endUs - slice.startUs) / 1e6;
  if (slice.kind === "compute" || seconds <= 0 || slice.bytes <= 0) return undefined;
  return slice.bytes / seconds / 1e9;
}

/** What a slice is, in a few words: "h2d seg 3", "prepare seg 2 (disk)". */
export function sliceName(item: LaneItem): string {
  const segment = `seg ${item.slice.segment}`;
  switch (item.kind) {
    case "stall":
      return `stall before ${segment}`;
    case "prepare_params":
      return `prepare ${segment} (${item.slice.cold ? "disk" : item.slice.source || "host"})`;
    default:
      return `${item.kind} ${segment}`;
  }
}

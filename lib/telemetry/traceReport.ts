import { readFile } from "node:fs/promises";
import { formatBytes } from "../config/units";
import { jobStartUs, type SliceKind, type TimelineJob } from "./timeline";

/** One span as read back from an OTLP-JSON trace file or an OTLP receiver. */
export interface TraceSpan {
  traceId: string;
  spanId: string;
  parentSpanId: string;
  name: string;
  startNs: bigint;
  endNs: bigint;
  attributes: Record<string, string | number | boolean>;
  /** Its process's resource attributes (service.name, ferry.executor.id, …). */
  resource: Record<string, string | number | boolean>;
}

interface OtlpValue {
  stringValue?: string;
  intValue?: string | number;
  doubleValue?: number;
  boolValue?: boolean;
}

interface OtlpAttribute {
  key: string;
  value: OtlpValue;
}

interface OtlpJsonRequest {
  resourceSpans?: {
    resource?: { attributes?: OtlpAttribute[] };
    scopeSpans?: {
      spans?: {
        traceId: string;
        spanId: string;
        parentSpanId?: string;
        name: string;
        startTimeUnixNano: string | number;
        endTimeUnixNano: string | number;
        attributes?: OtlpAttribute[];
      }[];
    }[];
  }[];
}

function attributeValue(value: OtlpValue): string | number | boolean {
  if (value.stringValue !== undefined) return value.stringValue;
  if (value.intValue !== undefined) return Number(value.intValue);
  if (value.doubleValue !== undefined) return value.doubleValue;
  if (value.boolValue !== undefined) return value.boolValue;
  return "";
}

const attributeMap = (attributes: OtlpAttribute[] | undefined) =>
  Object.fromEntries((attributes ?? []).map((a) => [a.key, attributeValue(a.value ?? {})]));

/** The spans of one OTLP-JSON `ExportTraceServiceRequest` (one line of a trace file). */
export function spansFromOtlpJson(request: OtlpJsonRequest): TraceSpan[] {
  const spans: TraceSpan[] = [];
  for (const resourceSpans of request.resourceSpans ?? []) {
    const resource = attributeMap(resourceSpans.resource?.attributes);
    for (const scope of resourceSpans.scopeSpans ?? []) {
      for (const span of scope.spans ?? []) {
        spans.push({
          traceId: span.traceId,
          spanId: span.spanId,
          parentSpanId: span.parentSpanId ?? "",
          name: span.name,
          startNs: BigInt(span.startTimeUnixNano),
          endNs: BigInt(span.endTimeUnixNano),
          attributes: attributeMap(span.attributes),
          resource,
        });
      }
    }
  }
  return spans;
}

/**
 * Reads a FERRY_TRACE_FILE (OTLP-JSON lines, the collector file exporter's format). A line that
 * is not an OTLP-JSON object is reported with its number rather than aborting the whole read;
 * a file where no line is one fails with an error naming the file.
 */
export async function readTraceFile(
  path: string,
): Promise<{ spans: TraceSpan[]; badLines: number[] }> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw new Error(
      code === "ENOENT"
        ? `trace file ${path} does not exist`
        : `cannot read trace file ${path}: ${(error as Error).message}`,
      { cause: error },
    );
  }
  const spans: TraceSpan[] = [];
  const badLines: number[] = [];
  let goodLines = 0;
  text.split("\n").forEach((line, index) => {
    if (!line.trim()) return;
    try {
      const parsed = JSON.parse(line) as OtlpJsonRequest;
      if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
        throw new Error("not an object");
      }
      spans.push(...spansFromOtlpJson(parsed));
      goodLines++;
    } catch {
      badLines.push(index + 1);
    }
  });
  if (goodLines === 0 && badLines.length > 0) {
    throw new Error(
      `${path} is not an OTLP-JSON trace file (no line of it parses; line ${badLines[0]} is the first)`,
    );
  }
  return { spans, badLines };
}

export interface SegmentReport {
  index: number;
  source: string;
  bytes: number;
  prepareS: number;
  h2dS: number;
  computeS: number;
}

export interface StepReport {
  jobId: string;
  step: number;
  stepS: number;
  prepareS: number;
  h2dS: number;
  computeS: number;
  h2dBytes: number;
  /** Share of copy time that ran while a compute was running (overlap hides transfers). */
  hiddenFraction: number;
  segments: SegmentReport[];
}

const seconds = (span: TraceSpan) => Number(span.endNs - span.startNs) / 1e9;

/** Total length of the parts of `intervals` that overlap any of `cover`. */
function overlapNs(intervals: TraceSpan[], cover: TraceSpan[]): bigint {
  let total = 0n;
  for (const a of intervals) {
    // Merge the cover pieces that touch `a`, so overlapping covers are not counted twice.
    const pieces = cover
      .map((c) => [
        c.startNs > a.startNs ? c.startNs : a.startNs,
        c.endNs < a.endNs ? c.endNs : a.endNs,
      ])
      .filter(([start, end]) => end > start)
      .sort((x, y) => (x[0] < y[0] ? -1 : x[0] > y[0] ? 1 : 0));
    let reach = a.startNs;
    for (const [start, end] of pieces) {
      const from = start > reach ? start : reach;
      if (end > from) total += end - from;
      if (end > reach) reach = end;
    }
  }
  return total;
}

/** Per-step breakdown of every `ferry.step` span in the file, in time order. */
export function stepReports(spans: TraceSpan[]): StepReport[] {
  const children = new Map<string, TraceSpan[]>();
  for (const span of spans) {
    const list = children.get(span.parentSpanId) ?? [];
    list.push(span);
    children.set(span.parentSpanId, list);
  }
  const steps = spans
    .filter((span) => span.name === "ferry.step")
    .sort((a, b) => (a.startNs < b.startNs ? -1 : 1));
  return steps.map((step) => {
    const segmentSpans = (children.get(step.spanId) ?? []).filter(
      (s) => s.name === "ferry.segment",
    );
    const leaves = segmentSpans.flatMap((segment) => children.get(segment.spanId) ?? []);
    const sum = (name: string) =>
      leaves.filter((s) => s.name === name).reduce((total, s) => total + seconds(s), 0);
    const copies = leaves.filter((s) => s.name === "ferry.h2d");
    const computes = leaves.filter((s) => s.name === "ferry.compute");
    const copyNs = copies.reduce((total, s) => total + (s.endNs - s.startNs), 0n);
    const segments = segmentSpans
      .map((segment) => {
        const own = children.get(segment.spanId) ?? [];
        const part = (name: string) =>
          own.filter((s) => s.name === name).reduce((total, s) => total + seconds(s), 0);
        return {
          index: Number(segment.attributes["ferry.segment.index"] ?? -1),
          source: String(segment.attributes["ferry.source"] ?? ""),
          bytes: Number(segment.attributes["ferry.bytes"] ?? 0),
          prepareS: part("ferry.prepare_params"),
          h2dS: part("ferry.h2d"),
          computeS: part("ferry.compute"),
        };
      })
      .sort((a, b) => a.index - b.index);
    return {
      jobId: String(step.attributes["ferry.job.id"] ?? ""),
      step: Number(step.attributes["ferry.step"] ?? 0),
      stepS: seconds(step),
      prepareS: sum("ferry.prepare_params"),
      h2dS: sum("ferry.h2d"),
      computeS: sum("ferry.compute"),
      h2dBytes: copies.reduce((total, s) => total + Number(s.attributes["ferry.bytes"] ?? 0), 0),
      hiddenFraction: copyNs > 0n ? Number(overlapNs(copies, computes)) / Number(copyNs) : 0,
      segments,
    };
  });
}

// ---- the per-stage table ----

/**
 * The stages of the table sd.cpp's contributors built by hand to find the cold first step:
 * prepare_params split by where the weights came from, the copy, the compute, the waits, and
 * reads done ahead of use (when the trace has them).
 */
export type StageKey =
  "prepare_params_disk" | "prepare_params_host" | "read" | "h2d" | "compute" | "stall";

// hasBytes: the stage moves bytes; hasRate: and a bytes / time rate means something (a host-cache
// prepare holds bytes already in memory, so its rate would be bytes / ~0).
const STAGES: { key: StageKey; label: string; hasBytes: boolean; hasRate: boolean }[] = [
  { key: "prepare_params_disk", label: "prepare_params (disk)", hasBytes: true, hasRate: true },
  {
    key: "prepare_params_host",
    label: "prepare_params (host cache)",
    hasBytes: true,
    hasRate: false,
  },
  { key: "read", label: "read ahead (disk)", hasBytes: true, hasRate: true },
  { key: "h2d", label: "h2d", hasBytes: true, hasRate: true },
  { key: "compute", label: "compute", hasBytes: false, hasRate: false },
  { key: "stall", label: "stall (waiting for a copy)", hasBytes: false, hasRate: false },
];

/**
 * Waits shorter than this are a thread handing over, not compute waiting for a copy; the stall
 * row and the top stalls leave them out (step totals keep every microsecond).
 */
export const MIN_STALL_US = 10;

export interface StageRow {
  stage: StageKey;
  label: string;
  calls: number;
  /** Time per call, seconds (null without calls). */
  min_s: number | null;
  median_s: number | null;
  max_s: number | null;
  total_s: number;
  /** Weight bytes the calls moved (0 for compute and stall, which move none). */
  bytes: number;
  /** bytes / total time, GB/s (10^9 B/s); null where no bytes move or under 0.1 ms passed. */
  gbps: number | null;
}

export type GroupKey = "first_job_cold_step" | "first_job_later_steps" | "later_jobs";

export interface ReportGroup {
  group: GroupKey;
  label: string;
  job_ids: string[];
  steps: number;
  /** Step wall time, seconds (null without steps). */
  step_min_s: number | null;
  step_median_s: number | null;
  step_max_s: number | null;
  stages: StageRow[];
}

export interface JobSummary {
  job_id: string;
  policy: string;
  executor: string;
  device: string;
  origin: string;
  steps: number;
  first_step_s: number | null;
  later_step_median_s: number | null;
  stall_s: number;
}

export interface SegmentStall {
  job_id: string;
  segment: number;
  /** Where its weights came from in the stalled steps ("disk", "host", …). */
  sources: string[];
  bytes: number;
  stalled_steps: number;
  total_stall_s: number;
  max_stall_s: number;
}

export interface TraceReport {
  jobs: JobSummary[];
  groups: ReportGroup[];
  top_stalls: SegmentStall[];
}

function median(sorted: readonly number[]): number | null {
  if (sorted.length === 0) return null;
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

function stageOf(kind: SliceKind, cold: boolean, source: string): StageKey {
  if (kind === "prepare_params")
    return cold || source === "disk" ? "prepare_params_disk" : "prepare_params_host";
  return kind;
}

interface Part {
  jobs: TimelineJob[];
  /** Which steps of those jobs count: all, only step 1 (and reads before it), or steps 2+. */
  steps: "all" | "first" | "later";
}

function groupReport(group: GroupKey, label: string, part: Part): ReportGroup {
  const inPart = (step: number) =>
    part.steps === "all" || (part.steps === "first" ? step <= 1 : step >= 2);
  const samples = new Map<StageKey, { seconds: number[]; bytes: number }>(
    STAGES.map((stage) => [stage.key, { seconds: [], bytes: 0 }]),
  );
  const stepSeconds: number[] = [];
  for (const job of part.jobs) {
    for (const step of job.steps) {
      if (inPart(step.step)) stepSeconds.push((step.endUs - step.startUs) / 1e6);
    }
    for (const slice of job.slices) {
      if (!inPart(slice.step)) continue;
      const sample = samples.get(stageOf(slice.kind, slice.cold, slice.source))!;
      sample.seconds.push((slice.endUs - slice.startUs) / 1e6);
      if (slice.kind !== "compute") sample.bytes += slice.bytes;
      if (slice.kind === "compute" && slice.stallUs >= MIN_STALL_US) {
        samples.get("stall")!.seconds.push(slice.stallUs / 1e6);
      }
    }
  }
  stepSeconds.sort((a, b) => a - b);
  return {
    group,
    label,
    job_ids: part.jobs.map((job) => job.jobId),
    steps: stepSeconds.length,
    step_min_s: stepSeconds[0] ?? null,
    step_median_s: median(stepSeconds),
    step_max_s: stepSeconds.at(-1) ?? null,
    stages: STAGES.map(({ key, label: stageLabel, hasBytes, hasRate }) => {
      const { seconds, bytes } = samples.get(key)!;
      seconds.sort((a, b) => a - b);
      const total = seconds.reduce((sum, value) => sum + value, 0);
      return {
        stage: key,
        label: stageLabel,
        calls: seconds.length,
        min_s: seconds[0] ?? null,
        median_s: median(seconds),
        max_s: seconds.at(-1) ?? null,
        total_s: total,
        bytes: hasBytes ? bytes : 0,
        // Under 0.1 ms in all is too short to time (a host-cache hit hands a pointer over).
        gbps: hasRate && bytes > 0 && total >= 1e-4 ? bytes / total / 1e9 : null,
      };
    }),
  };
}

/**
 * The per-stage table for the first job's cold step (step 1, and reads before it), its later
 * steps, and every later job; a line per job; the segments compute waited for longest.
 * The first job is the one that started first.
 */
export function traceReport(jobs: readonly TimelineJob[], top = 5): TraceReport {
  const ordered = [...jobs].sort((a, b) => jobStartUs(a) - jobStartUs(b));
  const [first, ...later] = ordered;
  const groups: ReportGroup[] = first
    ? [
        groupReport("first_job_cold_step", "job 1, step 1 (cold)", {
          jobs: [first],
          steps: "first",
        }),
        groupReport("first_job_later_steps", "job 1, steps 2+", { jobs: [first], steps: "later" }),
        groupReport(
          "later_jobs",
          later.length === 0
            ? "later jobs"
            : later.length === 1
              ? "job 2"
              : `jobs 2–${later.length + 1}`,
          {
            jobs: later,
            steps: "all",
          },
        ),
      ]
    : [];
  const summaries = ordered.map((job): JobSummary => {
    const seconds = (step: { startUs: number; endUs: number }) => (step.endUs - step.startUs) / 1e6;
    const laterSteps = job.steps.filter((step) => step.step >= 2).map(seconds);
    laterSteps.sort((a, b) => a - b);
    const firstStep = job.steps.find((step) => step.step === 1);
    return {
      job_id: job.jobId,
      policy: job.policy,
      executor: job.executor,
      device: job.device,
      origin: job.origin,
      steps: job.steps.length,
      first_step_s: firstStep ? seconds(firstStep) : null,
      later_step_median_s: median(laterSteps),
      stall_s: job.steps.reduce((sum, step) => sum + step.stallUs, 0) / 1e6,
    };
  });
  const stalls = new Map<string, SegmentStall>();
  for (const job of ordered) {
    const sources = new Map<string, Set<string>>();
    const bytes = new Map<string, number>();
    for (const slice of job.slices) {
      const key = `${slice.step}/${slice.segment}`;
      if (slice.kind === "prepare_params" || slice.kind === "read") {
        const set = sources.get(key) ?? new Set<string>();
        set.add(slice.cold ? "disk" : slice.source || "host");
        sources.set(key, set);
      }
      if (slice.kind === "compute") bytes.set(key, slice.bytes);
    }
    for (const slice of job.slices) {
      if (slice.kind !== "compute" || slice.stallUs < MIN_STALL_US) continue;
      const id = `${job.jobId}/${slice.segment}`;
      const entry = stalls.get(id) ?? {
        job_id: job.jobId,
        segment: slice.segment,
        sources: [],
        bytes: bytes.get(`${slice.step}/${slice.segment}`) ?? 0,
        stalled_steps: 0,
        total_stall_s: 0,
        max_stall_s: 0,
      };
      entry.stalled_steps++;
      entry.total_stall_s += slice.stallUs / 1e6;
      entry.max_stall_s = Math.max(entry.max_stall_s, slice.stallUs / 1e6);
      for (const source of sources.get(`${slice.step}/${slice.segment}`) ?? []) {
        if (!entry.sources.includes(source)) entry.sources.push(source);
      }
      stalls.set(id, entry);
    }
  }
  const topStalls = [...stalls.values()]
    .sort((a, b) => b.total_stall_s - a.total_stall_s)
    .slice(0, Math.max(0, top));
  return { jobs: summaries, groups, top_stalls: topStalls };
}

/** Seconds as a person reads them: "0.42 ms", "12.3 ms", "1.234 s"; "—" for nothing. */
export function formatSeconds(seconds: number | null): string {
  if (seconds === null) return "—";
  if (seconds >= 1) return `${seconds.toFixed(3)} s`;
  const ms = seconds * 1e3;
  return `${ms.toFixed(ms < 10 ? 2 : 1)} ms`;
}

function table(header: string[], rows: string[][], leftColumns = 1): string[] {
  const widths = header.map((title, column) =>
    Math.max(title.length, ...rows.map((row) => row[column].length)),
  );
  const line = (cells: string[]) =>
    cells
      .map((cell, column) =>
        column < leftColumns ? cell.padEnd(widths[column]) : cell.padStart(widths[column]),
      )
      .join("  ")
      .trimEnd();
  return [line(header), line(widths.map((width) => "-".repeat(width))), ...rows.map(line)];
}

/** The report as text: the jobs, then one table per group, then the top stalls. */
export function formatTraceReport(report: TraceReport): string {
  const lines: string[] = [];
  lines.push("jobs");
  report.jobs.forEach((job, index) => {
    lines.push(
      `  ${index + 1}. ${job.job_id}` +
        (job.policy ? ` (${job.policy})` : "") +
        ` on ${job.executor}` +
        (job.origin ? ` [${job.origin}]` : "") +
        `: ${job.steps} steps, step 1 ${formatSeconds(job.first_step_s)}, ` +
        `later steps ${formatSeconds(job.later_step_median_s)} (median), ` +
        `stalled ${formatSeconds(job.stall_s)}`,
    );
  });
  for (const group of report.groups) {
    lines.push("");
    if (group.steps === 0) {
      lines.push(`${group.label}: none`);
      continue;
    }
    lines.push(
      `${group.label} — ${group.steps} step${group.steps === 1 ? "" : "s"}, ` +
        `${formatSeconds(group.step_median_s)} per step (median)` +
        (group.job_ids.length > 1 ? `, ${group.job_ids.length} jobs` : `, ${group.job_ids[0]}`),
    );
    const rows = group.stages
      .filter((stage) => stage.calls > 0 || stage.stage !== "read")
      .map((stage) => [
        stage.label,
        String(stage.calls),
        formatSeconds(stage.min_s),
        formatSeconds(stage.median_s),
        formatSeconds(stage.max_s),
        formatSeconds(stage.calls > 0 ? stage.total_s : null),
        stage.bytes > 0 ? formatBytes(stage.bytes) : "—",
        stage.gbps === null ? "—" : stage.gbps.toFixed(2),
      ]);
    for (const line of table(
      ["stage", "calls", "min/call", "median/call", "max/call", "total", "bytes", "GB/s"],
      rows,
    )) {
      lines.push(`  ${line}`);
    }
  }
  if (report.top_stalls.length > 0) {
    lines.push("", "segments compute waited for longest");
    const rows = report.top_stalls.map((stall) => [
      stall.job_id,
      String(stall.segment),
      stall.sources.join(", ") || "—",
      stall.bytes > 0 ? formatBytes(stall.bytes) : "—",
      String(stall.stalled_steps),
      formatSeconds(stall.total_stall_s),
      formatSeconds(stall.max_stall_s),
    ]);
    for (const line of table(
      ["job", "segment", "weights from", "bytes", "stalled steps", "total stall", "max stall"],
      rows,
      1,
    )) {
      lines.push(`  ${line}`);
    }
  }
  return lines.join("\n");
}

import { readFile } from "node:fs/promises";

/** One span as read back from an OTLP-JSON trace file. */
export interface TraceSpan {
  traceId: string;
  spanId: string;
  parentSpanId: string;
  name: string;
  startNs: bigint;
  endNs: bigint;
  attributes: Record<string, string | number | boolean>;
}

interface OtlpValue {
  stringValue?: string;
  intValue?: string | number;
  doubleValue?: number;
  boolValue?: boolean;
}

function attributeValue(value: OtlpValue): string | number | boolean {
  if (value.stringValue !== undefined) return value.stringValue;
  if (value.intValue !== undefined) return Number(value.intValue);
  if (value.doubleValue !== undefined) return value.doubleValue;
  if (value.boolValue !== undefined) return value.boolValue;
  return "";
}

/**
 * Reads a FERRY_TRACE_FILE (OTLP-JSON lines, the collector file exporter's format). A line that
 * is not valid JSON is reported with its number rather than aborting the whole report.
 */
export async function readTraceFile(
  path: string,
): Promise<{ spans: TraceSpan[]; badLines: number[] }> {
  const text = await readFile(path, "utf8");
  const spans: TraceSpan[] = [];
  const badLines: number[] = [];
  text.split("\n").forEach((line, index) => {
    if (!line.trim()) return;
    let parsed: {
      resourceSpans?: {
        scopeSpans?: {
          spans?: {
            traceId: string;
            spanId: string;
            parentSpanId?: string;
            name: string;
            startTimeUnixNano: string | number;
            endTimeUnixNano: string | number;
            attributes?: { key: string; value: OtlpValue }[];
          }[];
        }[];
      }[];
    };
    try {
      parsed = JSON.parse(line);
    } catch {
      badLines.push(index + 1);
      return;
    }
    for (const resource of parsed.resourceSpans ?? []) {
      for (const scope of resource.scopeSpans ?? []) {
        for (const span of scope.spans ?? []) {
          spans.push({
            traceId: span.traceId,
            spanId: span.spanId,
            parentSpanId: span.parentSpanId ?? "",
            name: span.name,
            startNs: BigInt(span.startTimeUnixNano),
            endNs: BigInt(span.endTimeUnixNano),
            attributes: Object.fromEntries(
              (span.attributes ?? []).map((a) => [a.key, attributeValue(a.value)]),
            ),
          });
        }
      }
    }
  });
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

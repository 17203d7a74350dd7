/**
 * The `sdcpp` policy: stable-diffusion.cpp's streaming planner (June 2026, `--offload-to-cpu
 * --stream-layers --max-vram N`), reproduced rule for rule so that every Ferry improvement is
 * measured against it. Its constants (512 MiB margin, the 0.75 threshold, E/4) are sd.cpp's and
 * deliberately not tunable here; the `ferry` policy replaces them with a cost model.
 *
 * Steps, after the budget step (budget.ts) has resolved B and E:
 * 1. Planner budget P: E/4 when streaming and the model's parameters exceed 0.75·E (PR #1612),
 *    else E.
 * 2. Merge base segments greedily, left to right, into runs whose VRAM need fits in P.
 * 3. Residency (chunk-K): reserve 512 MiB plus the largest merged footprint W for the streamed
 *    segment in flight, then keep the longest prefix of merged segments whose parameters fit in
 *    the rest of E resident; stream the others every step.
 */
import { formatBytes, bestUnit } from "../config/units";
import type { BaseSegment, DeviceProfile, ModelProfile } from "../model/profile";
import { resolveBudget, STREAM_MARGIN_BYTES } from "./budget";
import { PlanError, type Plan, type PlanOptions, type PlannedSegment } from "./types";

/** PR #1612: the cap applies when Σparam > CAP_THRESHOLD_NUM/CAP_THRESHOLD_DEN · E. */
export const SDCPP_CAP_THRESHOLD_NUM = 3;
export const SDCPP_CAP_THRESHOLD_DEN = 4;
/** PR #1612: the capped planner budget is E / SDCPP_CAP_DIVISOR ("T/4 is the empirical optimum"). */
export const SDCPP_CAP_DIVISOR = 4;

/** The memory figures of a base segment or of a merged run of them. */
export type SegmentFigures = Pick<
  BaseSegment,
  "param_bytes" | "compute_buffer_bytes" | "output_bytes" | "prev_cut_bytes" | "external_bytes"
>;

/** A merged run of base segments `first..last` (inclusive) with its combined figures. */
export interface MergedRun extends SegmentFigures {
  first: number;
  last: number;
}

/**
 * VRAM a segment needs while it runs, as sd.cpp's merge test counts it:
 * compute buffer + parameters + inputs from earlier segments + output. External inputs are not
 * counted here (they are in {@link segmentFootprint}).
 */
export function segmentVram(figures: SegmentFigures): number {
  return (
    figures.compute_buffer_bytes +
    figures.param_bytes +
    figures.prev_cut_bytes +
    figures.output_bytes
  );
}

/** sd.cpp's `worst_merged_segment_footprint` term for one merged segment: its VRAM need plus
 * its external inputs. */
export function segmentFootprint(figures: SegmentFigures): number {
  return segmentVram(figures) + figures.external_bytes;
}

/** The result of the planner-budget step. */
export interface PlannerBudget {
  P: number;
  /** Whether the T/4 cap of PR #1612 applied. */
  capped: boolean;
}

/**
 * PR #1612: when streaming and the model dwarfs the budget (4·Σparam > 3·E), plan with
 * P = floor(E/4) so the merged segments are small, the reservation for the largest one shrinks,
 * and chunk-K residency gets room. Gated on streaming (leejet's review): without streaming small
 * segments only add dispatch overhead, so P = E.
 */
export function sdcppPlannerBudget(
  E: number,
  totalParamBytes: number,
  stream: boolean,
): PlannerBudget {
  // Integer comparison, exact for any byte count below 2^51; no 0.75·E rounding.
  const capped = stream && SDCPP_CAP_THRESHOLD_DEN * totalParamBytes > SDCPP_CAP_THRESHOLD_NUM * E;
  return { P: capped ? Math.floor(E / SDCPP_CAP_DIVISOR) : E, capped };
}

function runOf(segment: BaseSegment, index: number): MergedRun {
  return {
    first: index,
    last: index,
    param_bytes: segment.param_bytes,
    compute_buffer_bytes: segment.compute_buffer_bytes,
    output_bytes: segment.output_bytes,
    prev_cut_bytes: segment.prev_cut_bytes,
    external_bytes: segment.external_bytes,
  };
}

/**
 * A run extended by the next base segment. Parameters add up; the compute buffer is reused
 * segment after segment, so the largest counts; the run reads what its first member reads from
 * earlier runs and hands on what its last member outputs; external inputs are shared, so the
 * largest counts.
 */
function extendRun(run: MergedRun, segment: BaseSegment, index: number): MergedRun {
  return {
    first: run.first,
    last: index,
    param_bytes: run.param_bytes + segment.param_bytes,
    compute_buffer_bytes: Math.max(run.compute_buffer_bytes, segment.compute_buffer_bytes),
    output_bytes: segment.output_bytes,
    prev_cut_bytes: run.prev_cut_bytes,
    external_bytes: Math.max(run.external_bytes, segment.external_bytes),
  };
}

/**
 * Greedy left-to-right merge: extend the current run with the next base segment while the
 * extended run's VRAM need ({@link segmentVram}) is ≤ P; otherwise close it and start a new run
 * with that segment. A base segment whose own need is over P stays alone: it is neither extended
 * nor merged into the run before it, even where the first/last rules for prev_cut and output would
 * make the combined figure fit.
 */
export function mergeBaseSegments(segments: readonly BaseSegment[], P: number): MergedRun[] {
  const runs: MergedRun[] = [];
  let current: MergedRun | undefined;
  segments.forEach((segment, index) => {
    if (current === undefined) {
      current = runOf(segment, index);
      return;
    }
    const currentOversized = current.first === current.last && segmentVram(current) > P;
    const segmentOversized = segmentVram(segment) > P;
    const candidate = extendRun(current, segment, index);
    if (!currentOversized && !segmentOversized && segmentVram(candidate) <= P) {
      current = candidate;
    } else {
      runs.push(current);
      current = runOf(segment, index);
    }
  });
  if (current !== undefined) runs.push(current);
  return runs;
}

/** W: the largest footprint among merged segments — what sd.cpp reserves for the one in flight. */
export function worstFootprint(runs: readonly SegmentFigures[]): number {
  return runs.reduce((worst, run) => Math.max(worst, segmentFootprint(run)), 0);
}

/** What chunk-K residency may use: E − (512 MiB + W). Negative when nothing fits. */
export function residencyLimit(E: number, W: number): number {
  return E - (STREAM_MARGIN_BYTES + W);
}

/**
 * Chunk-K: the number of leading merged segments kept resident — the longest prefix whose
 * cumulative parameters are ≤ `limit`. The walk stops at the first segment that does not fit; a
 * later, smaller one is not considered (sd.cpp keeps a prefix, not the best subset).
 */
export function residentPrefixLength(runs: readonly SegmentFigures[], limit: number): number {
  let cumulative = 0;
  for (let k = 0; k < runs.length; k++) {
    cumulative += runs[k].param_bytes;
    if (cumulative > limit) return k;
  }
  return runs.length;
}

function describeNeed(segment: BaseSegment, E: number): string {
  const need = segmentVram(segment);
  const unit = bestUnit(Math.max(need, E));
  const b = (bytes: number) => formatBytes(bytes, { unit });
  return (
    `segment ${segment.name} needs ${b(need)} (params ${b(segment.param_bytes)} + compute ` +
    `${b(segment.compute_buffer_bytes)} + activations in ${b(segment.prev_cut_bytes)} + out ` +
    `${b(segment.output_bytes)}) but the effective budget E is ${b(E)}`
  );
}

/** The base segment with the largest need over E, if any, and how many are over. */
function largestOverBudget(
  segments: readonly BaseSegment[],
  E: number,
): { segment: BaseSegment; count: number } | undefined {
  let worst: BaseSegment | undefined;
  let count = 0;
  for (const segment of segments) {
    if (segmentVram(segment) <= E) continue;
    count++;
    if (worst === undefined || segmentVram(segment) > segmentVram(worst)) worst = segment;
  }
  return worst && { segment: worst, count };
}

function toPlannedSegments(runs: readonly MergedRun[], residentCount: number): PlannedSegment[] {
  return runs.map((run, index) => ({
    index,
    base: [run.first, run.last],
    param_bytes: run.param_bytes,
    compute_buffer_bytes: run.compute_buffer_bytes,
    output_bytes: run.output_bytes,
    prev_cut_bytes: run.prev_cut_bytes,
    external_bytes: run.external_bytes,
    resident: index < residentCount,
  }));
}

function sumParams(figures: readonly SegmentFigures[]): number {
  return figures.reduce((sum, figure) => sum + figure.param_bytes, 0);
}

/**
 * Plans a model on a device with sd.cpp's rules. Inputs are assumed validated (planJob does it).
 * @throws PlanError when there are no base segments, the budget leaves no memory, a base segment
 *   alone needs more than E, or (without streaming / with no split) the model does not fit.
 */
export function planSdcpp(model: ModelProfile, device: DeviceProfile, options: PlanOptions): Plan {
  const segments = model.segments;
  if (segments.length === 0) {
    throw new PlanError(`model ${model.name} has no base segments`);
  }
  const { stream } = options;
  const { B, E, mode } = resolveBudget({
    freeBytes: device.free_bytes,
    maxVramGiB: options.maxVramGiB,
    stream,
  });
  const totalParams = sumParams(segments);
  const names = segments.map((segment) => segment.name);

  if (mode === "no-split") {
    // `--max-vram 0`: sd.cpp runs the whole network as one graph, kept resident.
    const whole = segments
      .slice(1)
      .reduce((run, segment, i) => extendRun(run, segment, i + 1), runOf(segments[0], 0));
    const W = segmentFootprint(whole);
    if (totalParams + W > E) {
      throw new PlanError(
        `model ${model.name} does not fit without splitting (--max-vram 0): ` +
          fitMessage(totalParams, W, E),
      );
    }
    return {
      policy: "sdcpp",
      stream,
      budget: { B, E, P: E },
      segments: toPlannedSegments([whole], 1),
      resident_bytes: totalParams,
      streamed_bytes_per_step: 0,
      base_segment_names: names,
    };
  }

  const over = largestOverBudget(segments, E);
  if (over) {
    const others = over.count > 1 ? ` (${over.count - 1} other segment(s) are over E too)` : "";
    throw new PlanError(`${describeNeed(over.segment, E)}${others}`);
  }

  const { P } = sdcppPlannerBudget(E, totalParams, stream);
  const runs = mergeBaseSegments(segments, P);
  const W = worstFootprint(runs);

  let residentCount: number;
  if (stream) {
    residentCount = residentPrefixLength(runs, residencyLimit(E, W));
  } else {
    if (totalParams + W > E) {
      // Raising --max-vram only helps while it, not the device, is what limits E.
      const hint =
        E < device.free_bytes ? "enable streaming or raise --max-vram" : "enable streaming";
      throw new PlanError(
        `model ${model.name} does not fit without streaming: ${fitMessage(totalParams, W, E)}; ` +
          hint,
      );
    }
    residentCount = runs.length;
  }

  const residentBytes = sumParams(runs.slice(0, residentCount));
  return {
    policy: "sdcpp",
    stream,
    budget: { B, E, P },
    segments: toPlannedSegments(runs, residentCount),
    resident_bytes: residentBytes,
    streamed_bytes_per_step: sumParams(runs.slice(residentCount)),
    base_segment_names: names,
  };
}

function fitMessage(totalParams: number, W: number, E: number): string {
  const unit = bestUnit(Math.max(totalParams + W, E));
  const b = (bytes: number) => formatBytes(bytes, { unit });
  return (
    `params ${b(totalParams)} + largest working set W ${b(W)} = ${b(totalParams + W)} ` +
    `is more than the effective budget E ${b(E)}`
  );
}

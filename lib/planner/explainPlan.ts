/**
 * Why an `sdcpp` plan looks the way it does, recomputed from the plan alone — so the same
 * explanation works for a plan made here and for one received from the scheduler.
 */
import { formatBytes, formatGiBValue, GiB } from "../config/units";
import { STREAM_MARGIN_BYTES } from "./budget";
import {
  residencyLimit,
  SDCPP_CAP_DIVISOR,
  SDCPP_CAP_THRESHOLD_DEN,
  SDCPP_CAP_THRESHOLD_NUM,
  worstFootprint,
} from "./sdcpp";
import type { Plan } from "./types";

/** Facts behind a plan, in bytes, with one-line reasons for people. */
export interface PlanFacts {
  totalParamBytes: number;
  /** `--max-vram 0`: the model runs as one resident unit (B = 0). */
  noSplit: boolean;
  cap: {
    /** Whether the T/4 cap of sd.cpp PR #1612 applied (P = floor(E/4)). */
    applied: boolean;
    /** 0.75·E: the model size above which the cap applies when streaming. */
    thresholdBytes: number;
    reason: string;
  };
  /** Largest merged footprint (params + compute + output + prev_cut + external). */
  W: number;
  /** 512 MiB + W: what chunk-K residency leaves free for the segment in flight. */
  reservedBytes: number;
  /** E − reserved: the most the resident prefix may hold (streaming only; may be negative). */
  residencyLimitBytes: number;
  residentCount: number;
  streamedCount: number;
  /** Why the resident set is what it is. */
  residencyReason: string;
}

export function explainPlan(plan: Plan): PlanFacts {
  const { E } = plan.budget;
  const totalParamBytes = plan.resident_bytes + plan.streamed_bytes_per_step;
  const noSplit = plan.budget.B === 0;
  const thresholdBytes = (E * SDCPP_CAP_THRESHOLD_NUM) / SDCPP_CAP_THRESHOLD_DEN;
  const applied =
    !noSplit &&
    plan.stream &&
    SDCPP_CAP_THRESHOLD_DEN * totalParamBytes > SDCPP_CAP_THRESHOLD_NUM * E;
  const params = formatBytes(totalParamBytes);
  const threshold = formatBytes(thresholdBytes);

  let reason: string;
  if (noSplit) {
    reason = "no cap: no split (--max-vram 0), one segment, P = E";
  } else if (applied) {
    reason =
      `T/4 cap applied: streaming and params ${params} > 0.75·E = ${threshold}, so ` +
      `P = E/${SDCPP_CAP_DIVISOR} for smaller merged segments and room for residency (sd.cpp PR #1612)`;
  } else if (!plan.stream) {
    reason =
      "no cap: streaming is off, and sd.cpp applies the T/4 cap only when streaming (PR #1612)";
  } else {
    reason = `no cap: params ${params} ≤ 0.75·E = ${threshold}, P = E`;
  }

  const W = worstFootprint(plan.segments);
  const reservedBytes = STREAM_MARGIN_BYTES + W;
  const residencyLimitBytes = residencyLimit(E, W);
  const residentCount = plan.segments.filter((segment) => segment.resident).length;
  const streamedCount = plan.segments.length - residentCount;

  let residencyReason: string;
  if (noSplit) {
    residencyReason = "no split: the whole model is one resident segment";
  } else if (!plan.stream) {
    residencyReason = "streaming is off: every segment is resident";
  } else if (streamedCount === 0) {
    residencyReason = `all parameters fit in E − reserved = ${formatBytes(residencyLimitBytes)}`;
  } else if (residencyLimitBytes < 0) {
    residencyReason =
      `nothing is resident: reserved = 512 MiB + W = ${formatBytes(reservedBytes)} ` +
      `is more than E = ${formatBytes(E)}`;
  } else {
    const next = plan.segments[residentCount];
    residencyReason =
      `resident prefix stops at segment ${next.index}: ` +
      `${formatBytes(plan.resident_bytes)} + ${formatBytes(next.param_bytes)} would exceed ` +
      `E − reserved = ${formatBytes(residencyLimitBytes)}`;
  }

  return {
    totalParamBytes,
    noSplit,
    cap: { applied, thresholdBytes, reason },
    W,
    reservedBytes,
    residencyLimitBytes,
    residentCount,
    streamedCount,
    residencyReason,
  };
}

/** How B was obtained from `--max-vram` and free memory, e.g. "--max-vram -1: free 11.5 GiB − 1.0 GiB". */
export function describeBudgetSource(maxVramGiB: number | undefined, freeBytes: number): string {
  if (maxVramGiB === undefined) return `no --max-vram: the device's free memory`;
  const flag = `--max-vram ${formatGiBValue(maxVramGiB)}`;
  if (maxVramGiB === 0) return `${flag}: no split`;
  if (maxVramGiB > 0) return flag;
  const taken = Math.floor(-maxVramGiB * GiB);
  return `${flag}: free ${formatBytes(freeBytes, { unit: "GiB" })} − ${formatBytes(taken, { unit: "GiB" })}`;
}

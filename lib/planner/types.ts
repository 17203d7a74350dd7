import type { BaseSegment, DeviceProfile, ModelProfile } from "../model/profile";
import type { CostModelOptions } from "./costModel";

export type { BaseSegment, DeviceProfile, ModelProfile };

/**
 * `sdcpp`: stable-diffusion.cpp's constants and serial execution, reproduced as the baseline
 * (sdcpp.ts). `sdcpp-prefetch`: the same plan run as sd.cpp runs it since PR #1905 (Sep 2026), one
 * segment of copy lookahead within a step (execution.ts). `ferry`: plans from a cost model of
 * copies vs compute (ferryPolicy.ts).
 */
export type PolicyName = "sdcpp" | "sdcpp-prefetch" | "ferry";

export interface PlanOptions {
  /** Planning policy. @default "sdcpp" */
  policy: PolicyName;
  /**
   * sd.cpp's `--max-vram`: positive = GiB, 0 = no split, negative = free memory minus that many
   * GiB. Undefined = the device's whole free memory.
   */
  maxVramGiB?: number;
  /** Stream segments that do not fit (sd.cpp `--stream-layers`). @default true */
  stream: boolean;
  /**
   * Inputs of the cost model beyond the device profile (disk bandwidth, measured compute
   * seconds). Every policy's plan is priced with it; the `ferry` policy also plans with it.
   * @default {} (rates from the device profile, compute from FLOPs)
   */
  cost?: CostModelOptions;
}

/** A merged segment: base segments `base[0]..base[1]` run as one unit. */
export interface PlannedSegment {
  index: number;
  base: [number, number];
  param_bytes: number;
  compute_buffer_bytes: number;
  output_bytes: number;
  prev_cut_bytes: number;
  external_bytes: number;
  resident: boolean;
}

export interface Plan {
  policy: PolicyName;
  stream: boolean;
  /** Budgets in bytes: B (the user's limit, resolved), E (effective), P (planner). */
  budget: { B: number; E: number; P: number };
  segments: PlannedSegment[];
  resident_bytes: number;
  streamed_bytes_per_step: number;
  /** Names of the base segments the `base` ranges index. */
  base_segment_names: string[];
  /** Staging slots streamed segments cycle through (prefetch depth); 0 = fresh allocations. */
  slots?: number;
  /** Predicted step time by the cost model, seconds. */
  predicted_step_s?: number;
  /** Lower bound on step time for this budget, seconds. */
  lower_bound_s?: number;
}

/** A plan cannot be made (budget below the largest segment, bad profile, …). */
export class PlanError extends Error {
  override name = "PlanError";
}

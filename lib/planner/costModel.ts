/**
 * The cost model behind the `ferry` policy, the explanations and the plan bench: what a device
 * does per second (host→device bandwidth β, compute rate, per-dispatch overhead δ, optionally disk
 * bandwidth γ) and, per base segment, what it costs to copy and to compute. Merged segments are
 * priced from prefix sums, so a planner can price any run of base segments in O(1).
 *
 * Units: `h2d_gbps` and disk rates are decimal GB/s (10^9 bytes/s, as PCIe and NVMe are quoted);
 * `tflops` is 10^12 FLOP/s; `dispatch_us` is microseconds. Times are seconds.
 *
 * Unknown rates (0 in a device profile, which is what an executor that has not measured yet
 * reports) are replaced by conservative defaults rather than treated as "free": a cost model that
 * believed copies cost nothing would stream everything and keep nothing resident. The defaults
 * are marked in {@link DeviceRates.assumed} so explanations can say the numbers are guesses until
 * calibration (calibration.ts) replaces them.
 */
import type { BaseSegment, DeviceProfile, ModelProfile } from "../model/profile";
import { PlanError } from "./types";

/**
 * Host→device bandwidth assumed when the device reports none: what pinned copies achieve over
 * PCIe 3.0 x16 (≈ 12 GB/s of the 15.75 GB/s link), the slowest link a current GPU is likely on.
 */
export const DEFAULT_H2D_GBPS = 12;
/**
 * Compute rate assumed when the device reports none: about half the dense bf16 tensor rate of an
 * entry-level current GPU (RTX 3060: 25 TFLOP/s with fp32 accumulation).
 */
export const DEFAULT_TFLOPS = 12.5;

/** A device's rates in SI units, with what was assumed. */
export interface DeviceRates {
  /** Host→device bytes per second (pinned memory). */
  h2dBytesPerS: number;
  /** Floating-point operations per second the kernels achieve. */
  flopsPerS: number;
  /** Fixed cost of one dispatch (one merged segment's graph launch), seconds. */
  dispatchS: number;
  /** Disk read bytes per second for lazy first-step loads; 0 = disk not modelled. */
  diskBytesPerS: number;
  /** Which rates are defaults because the device reported 0 (unknown). */
  assumed: { h2d: boolean; compute: boolean };
}

/** Options of {@link deviceRates} and {@link buildCostModel}. */
export interface CostModelOptions {
  /**
   * Disk (or params backend) read bandwidth, GB/s, for the first step's lazy loads: every
   * segment's first copy is limited by min(β, γ). Steady-state steps never read the disk (the
   * params cache keeps pinned host copies).
   * @default 0 (not modelled: the first step copies at β like the others)
   */
  diskGbps?: number;
  /**
   * Measured compute seconds per base segment (without the dispatch overhead), e.g. from a
   * previous run's traces. Where given (same length as the model's segments), they replace
   * flops / rate.
   * @default undefined (flops / rate for every segment)
   */
  computeSeconds?: readonly number[];
}

/**
 * The device's rates, with defaults for the unknown ones.
 * @throws PlanError when a rate is negative or not finite.
 */
export function deviceRates(device: DeviceProfile, options: CostModelOptions = {}): DeviceRates {
  const check = (value: number, what: string): number => {
    if (!Number.isFinite(value) || value < 0) {
      throw new PlanError(`${what} must be a non-negative number (got ${value})`);
    }
    return value;
  };
  const h2d = check(device.h2d_gbps, "device.h2d_gbps");
  const tflops = check(device.tflops, "device.tflops");
  const dispatchUs = check(device.dispatch_us, "device.dispatch_us");
  const disk = check(options.diskGbps ?? 0, "disk bandwidth");
  return {
    h2dBytesPerS: (h2d > 0 ? h2d : DEFAULT_H2D_GBPS) * 1e9,
    flopsPerS: (tflops > 0 ? tflops : DEFAULT_TFLOPS) * 1e12,
    dispatchS: dispatchUs * 1e-6,
    diskBytesPerS: disk * 1e9,
    assumed: { h2d: h2d === 0, compute: tflops === 0 },
  };
}

/** The memory figures and costs of a merged run of base segments `first..last` (inclusive). */
export interface RunCost {
  first: number;
  last: number;
  param_bytes: number;
  /** Largest compute buffer of the members: the buffer is reused member after member. */
  compute_buffer_bytes: number;
  /** What the last member hands on. */
  output_bytes: number;
  /** What the first member reads from earlier runs. */
  prev_cut_bytes: number;
  /** External inputs are shared by the members, so the largest counts. */
  external_bytes: number;
  /** Steady-state copy seconds when streamed: param_bytes / β. */
  copy_s: number;
  /** First-step copy seconds (lazy load, limited by min(β, γ) when disk is modelled). */
  first_copy_s: number;
  /** Members' compute seconds plus one dispatch overhead δ. */
  compute_s: number;
}

/** A priced model on a device. */
export interface CostModel {
  rates: DeviceRates;
  segments: readonly BaseSegment[];
  /** Compute seconds of each base segment, without dispatch overhead. */
  baseComputeS: readonly number[];
  /** Σ param_bytes over all base segments. */
  totalParamBytes: number;
  /** Σ compute seconds over all base segments, without dispatch overhead. */
  totalComputeS: number;
  /** Seconds to copy `bytes` host→device at β. */
  copySeconds(bytes: number): number;
  /** Seconds for the first (cold) copy of `bytes`: min(β, γ) when disk is modelled. */
  firstCopySeconds(bytes: number): number;
  /** Figures and costs of the run `first..last`; O(last − first) for the maxima. */
  run(first: number, last: number): RunCost;
}

/**
 * Prices a model on a device. Inputs are assumed validated (planJob parses profiles first).
 * @throws PlanError when measured compute seconds do not match the segments.
 */
export function buildCostModel(
  model: ModelProfile,
  device: DeviceProfile,
  options: CostModelOptions = {},
): CostModel {
  const rates = deviceRates(device, options);
  const segments = model.segments;
  const measured = options.computeSeconds;
  if (measured !== undefined && measured.length !== segments.length) {
    throw new PlanError(
      `measured compute seconds cover ${measured.length} segment(s) but the model has ` +
        `${segments.length}`,
    );
  }
  const baseComputeS = segments.map((segment, i) => {
    const value = measured !== undefined ? measured[i] : segment.flops / rates.flopsPerS;
    if (!Number.isFinite(value) || value < 0) {
      throw new PlanError(`compute seconds of segment ${segment.name} must be ≥ 0 (got ${value})`);
    }
    return value;
  });
  // Prefix sums make a run's parameters and compute O(1); the maxima are short loops.
  const paramPrefix = new Float64Array(segments.length + 1);
  const computePrefix = new Float64Array(segments.length + 1);
  for (let i = 0; i < segments.length; i++) {
    paramPrefix[i + 1] = paramPrefix[i] + segments[i].param_bytes;
    computePrefix[i + 1] = computePrefix[i] + baseComputeS[i];
  }
  const copySeconds = (bytes: number) => bytes / rates.h2dBytesPerS;
  const coldRate =
    rates.diskBytesPerS > 0
      ? Math.min(rates.diskBytesPerS, rates.h2dBytesPerS)
      : rates.h2dBytesPerS;
  const firstCopySeconds = (bytes: number) => bytes / coldRate;

  return {
    rates,
    segments,
    baseComputeS,
    totalParamBytes: paramPrefix[segments.length],
    totalComputeS: computePrefix[segments.length],
    copySeconds,
    firstCopySeconds,
    run(first: number, last: number): RunCost {
      let computeBuffer = 0;
      let external = 0;
      for (let i = first; i <= last; i++) {
        computeBuffer = Math.max(computeBuffer, segments[i].compute_buffer_bytes);
        external = Math.max(external, segments[i].external_bytes);
      }
      const params = paramPrefix[last + 1] - paramPrefix[first];
      return {
        first,
        last,
        param_bytes: params,
        compute_buffer_bytes: computeBuffer,
        output_bytes: segments[last].output_bytes,
        prev_cut_bytes: segments[first].prev_cut_bytes,
        external_bytes: external,
        copy_s: copySeconds(params),
        first_copy_s: firstCopySeconds(params),
        compute_s: computePrefix[last + 1] - computePrefix[first] + rates.dispatchS,
      };
    },
  };
}

/**
 * The merged segments of a plan, priced: one {@link RunCost} per planned segment.
 * @throws PlanError when the plan's base ranges do not fit the model.
 */
export function priceRuns(
  cost: CostModel,
  ranges: ReadonlyArray<readonly [number, number]>,
): RunCost[] {
  return ranges.map(([first, last]) => {
    if (!(first >= 0 && first <= last && last < cost.segments.length)) {
      throw new PlanError(
        `merged segment ${first}-${last} does not fit the model's ${cost.segments.length} base segments`,
      );
    }
    return cost.run(first, last);
  });
}

/**
 * Calibration: turn an executor's measurements into the device rates the cost model plans with.
 * An executor reports its device at start-up (β from a probe copy, maybe nothing for compute);
 * while it runs jobs it measures every segment's copy and compute. These pure functions refine
 * the reported profile from those measurements so the next plan on that executor uses the numbers
 * its hardware actually achieves.
 *
 * Estimators, chosen to survive noisy timings (a copy that shared the link, a compute that waited
 * on a clock ramp, a stray preemption):
 * - β (h2d_gbps): the median of bytes / seconds over the recent copies of at least
 *   `minCopyBytes` (smaller copies measure latency, not bandwidth). A median ignores up to half
 *   the samples being arbitrarily wrong. The latency is reported too (Theil–Sen intercept) but not
 *   used: the cost model prices copies as bytes / β, which for segment-sized copies (≥ MBs) is
 *   what the median measures.
 * - compute rate and δ: compute seconds = flops / rate + δ per merged segment, fitted with the
 *   Theil–Sen estimator (slope = the median of the pairwise slopes between samples whose FLOPs
 *   differ; intercept = the median of seconds − slope · flops), which tolerates ~29% outliers
 *   where least squares is dragged by one. When all samples have the same FLOPs, a slope cannot
 *   be separated from δ: δ stays as reported and the rate is the median of flops / (seconds − δ).
 * A rate replaces the reported one only with at least `minSamples` usable samples and a sane
 * (positive, finite) result; otherwise the reported value stays and the result says why.
 */
import type { DeviceProfile } from "../model/profile";

/** One merged segment of one step, as an executor measures it. */
export interface SegmentMeasurement {
  /** Bytes copied host→device for the segment this step (0 when resident). */
  bytes_copied: number;
  /** Seconds the copy took (0 when nothing was copied). */
  copy_s: number;
  /** Seconds the segment's compute took, dispatch included. */
  compute_s: number;
  /** The segment's FLOPs (from its profile). */
  flops: number;
}

/** One step's measurements, segment by segment. */
export interface StepMeasurement {
  segments: readonly SegmentMeasurement[];
}

/** Options of {@link calibrateDevice}. */
export interface CalibrationOptions {
  /** Use the most recent this many samples of each kind (copies, computes). @default 256 */
  window?: number;
  /** Fewest usable samples before a measured rate replaces the reported one. @default 3 */
  minSamples?: number;
  /** Copies smaller than this are left out of β (latency-bound). @default 1 MiB */
  minCopyBytes?: number;
}

/** Where a calibrated rate came from. */
export type RateSource = "measured" | "reported";

export interface CalibrationResult {
  /** The reported profile with the measured rates in place. */
  device: DeviceProfile;
  h2d: {
    gbps: number;
    source: RateSource;
    /** Usable copy samples. */
    samples: number;
    /** Fixed cost per copy from the Theil–Sen intercept, seconds (informational). */
    latency_s?: number;
    /** Why the reported value was kept. */
    reason?: string;
  };
  compute: {
    tflops: number;
    dispatch_us: number;
    source: RateSource;
    samples: number;
    /** Median absolute relative error of the fit over the samples. */
    fit_error?: number;
    reason?: string;
  };
}

/** Median of a non-empty list (mean of the middle two for even lengths). */
export function median(values: readonly number[]): number {
  if (values.length === 0) throw new RangeError("median of no values");
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/** A robust line y = slope·x + intercept (Theil–Sen). */
export interface RobustLine {
  slope: number;
  intercept: number;
  /** Pairs with distinct x that gave a slope. */
  pairs: number;
}

/**
 * Theil–Sen fit: the median of slopes over pairs whose x differ by more than `minRelativeGap` of
 * the larger, and the median of y − slope·x. Returns undefined when no pair qualifies.
 * @param minRelativeGap @default 0.05
 */
export function theilSen(
  points: ReadonlyArray<{ x: number; y: number }>,
  minRelativeGap = 0.05,
): RobustLine | undefined {
  const slopes: number[] = [];
  for (let i = 0; i < points.length; i++) {
    for (let j = i + 1; j < points.length; j++) {
      const dx = points[j].x - points[i].x;
      const scale = Math.max(Math.abs(points[i].x), Math.abs(points[j].x));
      if (Math.abs(dx) <= minRelativeGap * scale || dx === 0) continue;
      slopes.push((points[j].y - points[i].y) / dx);
    }
  }
  if (slopes.length === 0) return undefined;
  const slope = median(slopes);
  const intercept = median(points.map((p) => p.y - slope * p.x));
  return { slope, intercept, pairs: slopes.length };
}

const finitePositive = (value: number) => Number.isFinite(value) && value > 0;

/**
 * Refines a device profile from an executor's step measurements (see the module comment).
 * Measurements are taken oldest first; only the most recent `window` samples of each kind count.
 * @throws RangeError for a negative or non-finite measurement.
 */
export function calibrateDevice(
  reported: DeviceProfile,
  steps: readonly StepMeasurement[],
  options: CalibrationOptions = {},
): CalibrationResult {
  const window = options.window ?? 256;
  const minSamples = Math.max(1, options.minSamples ?? 3);
  const minCopyBytes = options.minCopyBytes ?? 1024 * 1024;

  const copies: Array<{ x: number; y: number }> = [];
  const computes: Array<{ x: number; y: number }> = [];
  steps.forEach((step, s) =>
    step.segments.forEach((segment, m) => {
      for (const field of ["bytes_copied", "copy_s", "compute_s", "flops"] as const) {
        const value = segment[field];
        if (!Number.isFinite(value) || value < 0) {
          throw new RangeError(`step ${s} segment ${m}: ${field} must be ≥ 0 (got ${value})`);
        }
      }
      if (segment.bytes_copied >= minCopyBytes && segment.copy_s > 0) {
        copies.push({ x: segment.bytes_copied, y: segment.copy_s });
      }
      if (segment.compute_s > 0) computes.push({ x: segment.flops, y: segment.compute_s });
    }),
  );
  const recentCopies = copies.slice(-window);
  const recentComputes = computes.slice(-window);

  const h2d = calibrateCopies(reported, recentCopies, minSamples);
  const compute = calibrateCompute(reported, recentComputes, minSamples);
  return {
    device: {
      ...reported,
      h2d_gbps: h2d.gbps,
      tflops: compute.tflops,
      dispatch_us: compute.dispatch_us,
    },
    h2d,
    compute,
  };
}

function calibrateCopies(
  reported: DeviceProfile,
  samples: ReadonlyArray<{ x: number; y: number }>,
  minSamples: number,
): CalibrationResult["h2d"] {
  const kept = { gbps: reported.h2d_gbps, source: "reported" as const, samples: samples.length };
  if (samples.length < minSamples) {
    return { ...kept, reason: `${samples.length} copy sample(s), ${minSamples} needed` };
  }
  const gbps = median(samples.map((p) => p.x / p.y)) / 1e9;
  if (!finitePositive(gbps)) return { ...kept, reason: "copies gave no usable bandwidth" };
  const line = theilSen(samples);
  const latency = line && line.slope > 0 ? Math.max(0, line.intercept) : undefined;
  return {
    gbps,
    source: "measured",
    samples: samples.length,
    ...(latency !== undefined ? { latency_s: latency } : {}),
  };
}

function calibrateCompute(
  reported: DeviceProfile,
  samples: ReadonlyArray<{ x: number; y: number }>,
  minSamples: number,
): CalibrationResult["compute"] {
  const kept = {
    tflops: reported.tflops,
    dispatch_us: reported.dispatch_us,
    source: "reported" as const,
    samples: samples.length,
  };
  const withFlops = samples.filter((p) => p.x > 0);
  if (withFlops.length < minSamples) {
    return {
      ...kept,
      reason: `${withFlops.length} compute sample(s) with FLOPs, ${minSamples} needed`,
    };
  }
  let rate: number; // FLOP/s
  let dispatchS: number;
  const line = theilSen(samples);
  if (line && line.slope > 0) {
    rate = 1 / line.slope;
    dispatchS = Math.max(0, line.intercept);
  } else {
    // One FLOP count only (or a nonsensical slope): keep δ, take the rate from what is left.
    dispatchS = reported.dispatch_us * 1e-6;
    const rates = withFlops.filter((p) => p.y > dispatchS).map((p) => p.x / (p.y - dispatchS));
    if (rates.length < minSamples) {
      return { ...kept, reason: "compute times are not longer than the dispatch overhead" };
    }
    rate = median(rates);
  }
  if (!finitePositive(rate)) return { ...kept, reason: "computes gave no usable rate" };
  const fitError = median(withFlops.map((p) => Math.abs(p.x / rate + dispatchS - p.y) / p.y));
  return {
    tflops: rate / 1e12,
    dispatch_us: dispatchS * 1e6,
    source: "measured",
    samples: samples.length,
    fit_error: fitError,
  };
}

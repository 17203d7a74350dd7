import { describe, expect, it } from "vitest";
import { GiB, MiB } from "../lib/config/units";
import type { DeviceProfile } from "../lib/model/profile";
import {
  calibrateDevice,
  median,
  theilSen,
  type SegmentMeasurement,
  type StepMeasurement,
} from "../lib/planner/calibration";
import { planJob } from "../lib/planner/planJob";
import { mulberry32 } from "./helpers/randomProfiles";

const reported: DeviceProfile = {
  name: "gpu",
  total_bytes: 24 * GiB,
  free_bytes: 23 * GiB,
  h2d_gbps: 12, // a pessimistic start-up probe
  tflops: 0, // unknown
  dispatch_us: 0,
};

/** The hardware the measurements come from. */
const truth = { gbps: 24, tflops: 80, dispatchS: 50e-6, latencyS: 10e-6 };

/**
 * Steps of segments whose copies and computes follow `truth`, with ±`noise` multiplicative jitter
 * and a fraction of `outliers` three times slower (a shared link, a preempted kernel).
 */
function measurements(steps: number, noise: number, outliers: number, seed = 1): StepMeasurement[] {
  const random = mulberry32(seed);
  const jitter = () => 1 + noise * (2 * random() - 1);
  const slow = () => (random() < outliers ? 3 : 1);
  return Array.from({ length: steps }, () => ({
    segments: Array.from({ length: 10 }, (): SegmentMeasurement => {
      const bytes = Math.round((50 + 450 * random()) * MiB);
      const flops = Math.round((0.1 + 1.9 * random()) * 1e12);
      const streamed = random() < 0.7;
      return {
        bytes_copied: streamed ? bytes : 0,
        copy_s: streamed ? (truth.latencyS + bytes / (truth.gbps * 1e9)) * jitter() * slow() : 0,
        compute_s: (flops / (truth.tflops * 1e12) + truth.dispatchS) * jitter() * slow(),
        flops,
      };
    }),
  }));
}

describe("robust estimators", () => {
  it("median of odd and even lists", () => {
    expect(median([3, 1, 2])).toBe(2);
    expect(median([4, 1, 3, 2])).toBe(2.5);
    expect(() => median([])).toThrow(RangeError);
  });

  it("Theil–Sen recovers a line despite an outlier that drags least squares", () => {
    const points = [1, 2, 3, 4, 5, 6, 7].map((x) => ({ x, y: 2 * x + 1 }));
    points[6].y = 100;
    const line = theilSen(points)!;
    expect(line.slope).toBeCloseTo(2, 12);
    expect(line.intercept).toBeCloseTo(1, 12);
    expect(
      theilSen([
        { x: 1, y: 1 },
        { x: 1, y: 2 },
      ]),
    ).toBeUndefined();
  });
});

describe("calibrateDevice", () => {
  it("recovers β, the compute rate and δ from noisy measurements with outliers", () => {
    const result = calibrateDevice(reported, measurements(40, 0.01, 0.1));
    expect(result.h2d.source).toBe("measured");
    expect(result.device.h2d_gbps).toBeGreaterThan(truth.gbps * 0.97);
    expect(result.device.h2d_gbps).toBeLessThan(truth.gbps * 1.03);
    expect(result.compute.source).toBe("measured");
    expect(result.device.tflops / truth.tflops).toBeCloseTo(1, 1);
    expect(Math.abs(result.device.dispatch_us - truth.dispatchS * 1e6)).toBeLessThan(15);
    expect(result.compute.fit_error!).toBeLessThan(0.02);
    expect(result.h2d.latency_s!).toBeLessThan(1e-3);
    // Only the rates change.
    expect(result.device).toMatchObject({
      name: "gpu",
      total_bytes: 24 * GiB,
      free_bytes: 23 * GiB,
    });
  });

  it("keeps the reported rates, saying why, without enough samples", () => {
    const result = calibrateDevice(reported, [
      { segments: [{ bytes_copied: 100 * MiB, copy_s: 0.004, compute_s: 0.01, flops: 1e12 }] },
    ]);
    expect(result.device).toEqual(reported);
    expect(result.h2d).toMatchObject({ source: "reported", reason: "1 copy sample(s), 3 needed" });
    expect(result.compute.reason).toBe("1 compute sample(s) with FLOPs, 3 needed");
  });

  it("ignores small copies, which measure latency rather than bandwidth", () => {
    const step: StepMeasurement = {
      segments: [
        ...[100, 200, 300].map((mb) => ({
          bytes_copied: mb * MiB,
          copy_s: (mb * MiB) / 20e9,
          compute_s: 0,
          flops: 0,
        })),
        { bytes_copied: 4096, copy_s: 1e-3, compute_s: 0, flops: 0 }, // 4 MB/s
      ],
    };
    expect(calibrateDevice(reported, [step]).device.h2d_gbps).toBeCloseTo(20, 9);
  });

  it("with one FLOP count keeps δ and takes the rate from the rest", () => {
    const steps = [0.011, 0.012, 0.013].map((s) => ({
      segments: [{ bytes_copied: 0, copy_s: 0, compute_s: s, flops: 1e12 }],
    }));
    const result = calibrateDevice({ ...reported, dispatch_us: 2000 }, steps);
    expect(result.compute.dispatch_us).toBe(2000);
    expect(result.compute.tflops).toBeCloseTo(1e12 / (0.012 - 0.002) / 1e12, 9);
  });

  it("uses only the most recent window of samples", () => {
    const old = measurements(20, 0, 0).map((step) => ({
      segments: step.segments.map((s) => ({ ...s, copy_s: s.copy_s * 4 })), // 6 GB/s then
    }));
    const now = measurements(5, 0, 0, 2);
    const recent = calibrateDevice(reported, [...old, ...now], { window: 20 });
    expect(recent.device.h2d_gbps).toBeGreaterThan(23);
    const everything = calibrateDevice(reported, [...old, ...now], { window: 10_000 });
    expect(everything.device.h2d_gbps).toBeLessThan(10);
  });

  it("rejects negative or non-finite measurements", () => {
    expect(() =>
      calibrateDevice(reported, [
        { segments: [{ bytes_copied: -1, copy_s: 1, compute_s: 1, flops: 1 }] },
      ]),
    ).toThrow("step 0 segment 0: bytes_copied must be ≥ 0 (got -1)");
  });

  it("the next plan uses the measured numbers", () => {
    const model = {
      name: "m",
      segments: Array.from({ length: 8 }, (_, i) => ({
        name: `b${i}`,
        param_bytes: 500 * MiB,
        compute_buffer_bytes: 0,
        output_bytes: 0,
        prev_cut_bytes: 0,
        external_bytes: 0,
        flops: 1e12,
      })),
    };
    const options = { policy: "ferry" as const, stream: true, maxVramGiB: 2 };
    const before = planJob(model, reported, options);
    const calibrated = calibrateDevice(reported, measurements(40, 0.01, 0.1)).device;
    const after = planJob(model, calibrated, options);
    // Faster copies and a known compute rate: a different, faster prediction.
    expect(after.predicted_step_s).toBeLessThan(before.predicted_step_s!);
    expect(after.lower_bound_s).not.toBe(before.lower_bound_s);
  });
});

import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { GiB, MiB } from "../lib/config/units";
import type { BaseSegment, DeviceProfile, ModelProfile } from "../lib/model/profile";
import { planJob } from "../lib/planner/planJob";
import { planToJson } from "../lib/planner/planJson";
import { readProfileFile } from "../lib/planner/profileFile";
import {
  mergeBaseSegments,
  residencyLimit,
  residentPrefixLength,
  sdcppPlannerBudget,
  segmentFootprint,
  worstFootprint,
} from "../lib/planner/sdcpp";
import { PlanError, type PlanOptions } from "../lib/planner/types";

const margin = 512 * MiB;

/** A base segment; all figures in bytes. */
function seg(
  name: string,
  param: number,
  compute = 0,
  output = 0,
  prevCut = 0,
  external = 0,
): BaseSegment {
  return {
    name,
    param_bytes: param,
    compute_buffer_bytes: compute,
    output_bytes: output,
    prev_cut_bytes: prevCut,
    external_bytes: external,
    flops: 0,
  };
}

/** Base segments b0, b1, … with these parameter bytes and nothing else. */
function params(...bytes: number[]): BaseSegment[] {
  return bytes.map((b, i) => seg(`b${i}`, b));
}

function model(segments: BaseSegment[], name = "m"): ModelProfile {
  return { name, segments };
}

function device(freeBytes: number): DeviceProfile {
  return {
    name: "gpu",
    total_bytes: freeBytes,
    free_bytes: freeBytes,
    h2d_gbps: 0,
    tflops: 0,
    dispatch_us: 0,
  };
}

/** A device whose streaming budget E (no --max-vram) is exactly `E`. */
function deviceWithStreamingE(E: number): DeviceProfile {
  return device(E + margin);
}

const stream: PlanOptions = { policy: "sdcpp", stream: true };
const noStream: PlanOptions = { policy: "sdcpp", stream: false };

/** [first, last] of each merged segment. */
function ranges(segments: { base: [number, number] }[]): Array<[number, number]> {
  return segments.map((s) => s.base);
}

describe("planner budget P (PR #1612 T/4 cap)", () => {
  it("4·Σ = 3·E exactly: no cap, P = E", () => {
    expect(sdcppPlannerBudget(4_000_000_000, 3_000_000_000, true)).toEqual({
      P: 4_000_000_000,
      capped: false,
    });
  });

  it("4·Σ = 3·E + 1: cap, P = floor(E/4)", () => {
    // E = 4000000001: 3E + 1 = 12000000004 = 4 · 3000000001.
    expect(sdcppPlannerBudget(4_000_000_001, 3_000_000_001, true)).toEqual({
      P: 1_000_000_000,
      capped: true,
    });
    expect(sdcppPlannerBudget(4_000_000_001, 3_000_000_000, true).capped).toBe(false);
  });

  it("P rounds down", () => {
    expect(sdcppPlannerBudget(4_000_000_003, 4_000_000_000, true).P).toBe(1_000_000_000);
  });

  it("is gated on streaming: no cap without it, however large the model", () => {
    expect(sdcppPlannerBudget(1_000, 1_000_000, false)).toEqual({ P: 1_000, capped: false });
  });

  it("at the boundary in a whole plan: 4·Σ = 3·E keeps one merged segment", () => {
    const plan = planJob(model(params(1e9, 1e9, 1e9)), deviceWithStreamingE(4e9), stream);
    expect(plan.budget).toEqual({ B: 4e9 + margin, E: 4e9, P: 4e9 });
    expect(ranges(plan.segments)).toEqual([[0, 2]]);
    // W = 3e9, reserved = 3536870912 > E − 3e9: nothing resident — the problem PR #1612 fixes.
    expect(plan.segments[0].resident).toBe(false);
    expect(plan.resident_bytes).toBe(0);
    expect(plan.streamed_bytes_per_step).toBe(3e9);
  });

  it("one byte over the boundary in a whole plan: capped, smaller segments, some resident", () => {
    const E = 4_000_000_001;
    const plan = planJob(model(params(1e9, 1e9, 1_000_000_001)), deviceWithStreamingE(E), stream);
    expect(plan.budget).toEqual({ B: E + margin, E, P: 1e9 });
    // 1e9 + 1e9 > P; the last (1e9 + 1 > P) stays alone.
    expect(ranges(plan.segments)).toEqual([
      [0, 0],
      [1, 1],
      [2, 2],
    ]);
    // W = 1000000001, reserved = 1536870913, E − reserved = 2463129088: two fit.
    expect(plan.segments.map((s) => s.resident)).toEqual([true, true, false]);
    expect(plan.resident_bytes).toBe(2e9);
    expect(plan.streamed_bytes_per_step).toBe(1_000_000_001);
  });

  it("without streaming, a model over 0.75·E is not capped (it does not fit at all)", () => {
    // E = free = 1000 MiB; Σ = 800 MiB > 750 MiB. Uncapped, the 8 segments merge into one,
    // so W = 800 MiB = 0.8 GiB (capped at P = 250 MiB it would be 0.2 GiB).
    const segments = params(...Array<number>(8).fill(100 * MiB));
    expect(() => planJob(model(segments), device(1000 * MiB), noStream)).toThrow(
      new PlanError(
        "model m does not fit without streaming: params 0.8 GiB + largest working set " +
          "W 0.8 GiB = 1.6 GiB is more than the effective budget E 1.0 GiB; enable streaming",
      ),
    );
    // The same model with streaming is capped: P = 250 MiB, merged pairs.
    const plan = planJob(model(segments), deviceWithStreamingE(1000 * MiB), stream);
    expect(plan.budget.P).toBe(250 * MiB);
    expect(ranges(plan.segments)).toEqual([
      [0, 1],
      [2, 3],
      [4, 5],
      [6, 7],
    ]);
    // W = 200 MiB, reserved = 712 MiB, E − reserved = 288 MiB: one pair resident.
    expect(plan.resident_bytes).toBe(200 * MiB);
  });
});

describe("greedy merge", () => {
  it("extends while the run's need is ≤ P, exactly P included", () => {
    // b0 needs 150; b0+b1 needs max(50, 20) + 200 = 250 = P; adding b2 needs 251.
    const segments = [seg("b0", 100, 50), seg("b1", 100, 20), seg("b2", 1), seg("b3", 1)];
    expect(mergeBaseSegments(segments, 250).map((r) => [r.first, r.last])).toEqual([
      [0, 1],
      [2, 3],
    ]);
    expect(mergeBaseSegments(segments, 249).map((r) => [r.first, r.last])).toEqual([
      [0, 0],
      [1, 3],
    ]);
  });

  it("sums params", () => {
    const segments = params(100, 101);
    expect(mergeBaseSegments(segments, 200)).toHaveLength(2);
    expect(mergeBaseSegments(segments, 201)).toHaveLength(1);
  });

  it("takes the largest compute buffer, not the sum", () => {
    // Needs 100 + 50 + 50 = 200 with max; 300 if summed.
    const segments = [seg("a", 50, 100), seg("b", 50, 100)];
    expect(mergeBaseSegments(segments, 200)).toHaveLength(1);
  });

  it("counts the first member's prev_cut", () => {
    // a+b: 0 + 150 + prev_cut(a) 30 + 0 = 180 ≤ 180; b's own prev_cut (40) would make it 190.
    const segments = [seg("a", 50, 0, 0, 30), seg("b", 100, 0, 0, 40)];
    expect(mergeBaseSegments(segments, 180)).toHaveLength(1);
    expect(mergeBaseSegments(segments, 179)).toHaveLength(2);
  });

  it("counts the last member's output", () => {
    // a alone 140, b alone 110, a+b: 150 + output(b) 0 = 150; a's output would make it 250.
    const segments = [seg("a", 40, 0, 100), seg("b", 110, 0, 0)];
    expect(mergeBaseSegments(segments, 150)).toHaveLength(1);
  });

  it("ignores external inputs when merging and keeps the largest", () => {
    const runs = mergeBaseSegments([seg("a", 100, 0, 0, 0, 1000), seg("b", 100, 0, 0, 0, 7)], 200);
    expect(runs).toHaveLength(1);
    expect(runs[0].external_bytes).toBe(1000);
  });

  it("gives each run its combined figures", () => {
    // a+b needs max(20, 60) + 160 + prev_cut(a) 30 + output(b) 9 = 259; with c: 60 + 161 + 30 + 0.
    const runs = mergeBaseSegments(
      [seg("a", 10, 20, 5, 30, 7), seg("b", 150, 60, 9, 40, 3), seg("c", 1, 1, 0, 0, 0)],
      260,
    );
    expect(runs).toEqual([
      {
        first: 0,
        last: 2,
        param_bytes: 161, // sum
        compute_buffer_bytes: 60, // max
        output_bytes: 0, // last member's
        prev_cut_bytes: 30, // first member's
        external_bytes: 7, // max
      },
    ]);
  });

  it("a base segment alone over P stays alone", () => {
    // E = 1000 MiB, Σ = 900 MiB → P = 250 MiB. b1 (300 MiB) is over P but within E.
    const segments = params(...[100, 300, 100, 100, 200, 100].map((m) => m * MiB));
    const plan = planJob(model(segments), deviceWithStreamingE(1000 * MiB), stream);
    expect(plan.budget.P).toBe(250 * MiB);
    expect(ranges(plan.segments)).toEqual([
      [0, 0],
      [1, 1],
      [2, 3],
      [4, 4],
      [5, 5],
    ]);
    // W = 300 MiB, reserved 812 MiB, E − reserved = 188 MiB: only the first.
    expect(plan.segments.map((s) => s.resident)).toEqual([true, false, false, false, false]);
  });

  it("an over-P segment is neither extended nor joined, even where the combined figure fits", () => {
    // a alone: 100 + output 200 = 300 > 250; a+b would be 110 (b's output counts) — a stays alone.
    expect(
      mergeBaseSegments([seg("a", 100, 0, 200), seg("b", 10)], 250).map((r) => r.last),
    ).toEqual([0, 1]);
    // d alone: 100 + prev_cut 200 = 300 > 250; c+d would be 110 (c's prev_cut counts).
    expect(
      mergeBaseSegments([seg("c", 10), seg("d", 100, 0, 0, 200)], 250).map((r) => r.last),
    ).toEqual([0, 1]);
  });
});

describe("residency (chunk-K)", () => {
  it("W is the largest merged footprint, external inputs included", () => {
    const runs = [seg("a", 100, 10, 1, 2, 0), seg("b", 10, 10, 1, 2, 500)];
    expect(segmentFootprint(runs[0])).toBe(113);
    expect(worstFootprint(runs)).toBe(523);
    expect(residencyLimit(10_000_000_000, 523)).toBe(10_000_000_000 - 536_870_912 - 523);
  });

  it("keeps a prefix: stops at the first misfit even when a later, smaller one would fit", () => {
    expect(residentPrefixLength(params(300, 500, 100), 700)).toBe(1);
    expect(residentPrefixLength(params(300, 400, 100), 700)).toBe(2); // 700 ≤ 700
    expect(residentPrefixLength(params(300, 400), 10_000)).toBe(2);
    expect(residentPrefixLength(params(0, 0), -1)).toBe(0); // E − reserved < 0 → K = 0
  });

  it("in a whole plan: 900, 950, 900, 400 MiB → the 400 MiB one is streamed though it fits", () => {
    // E = 4000 MiB, Σ = 3150 > 3000 → P = 1000 MiB: no two neighbours merge.
    // W = 950 MiB, reserved = 1462 MiB, E − reserved = 2538 MiB: 900 + 950 fit, + 900 does not.
    const segments = params(...[900, 950, 900, 400].map((m) => m * MiB));
    const plan = planJob(model(segments), deviceWithStreamingE(4000 * MiB), stream);
    expect(plan.budget.P).toBe(1000 * MiB);
    expect(ranges(plan.segments)).toEqual([
      [0, 0],
      [1, 1],
      [2, 2],
      [3, 3],
    ]);
    expect(plan.segments.map((s) => s.resident)).toEqual([true, true, false, false]);
    expect(plan.resident_bytes).toBe(1850 * MiB);
    expect(plan.streamed_bytes_per_step).toBe(1300 * MiB);
  });

  it("reserves 512 MiB + W, W counting external inputs; cumulative = E − reserved is resident", () => {
    // E = 4000 MiB, Σ = 3100 MiB → P = 1000 MiB, every segment alone.
    // W = 100 + 1388 (external) = 1488 MiB, reserved = 2000 MiB, E − reserved = 2000 MiB.
    const segments = (external: number) => [
      seg("a", 1000 * MiB),
      seg("b", 1000 * MiB),
      seg("c", 1000 * MiB),
      seg("d", 100 * MiB, 0, 0, 0, external),
    ];
    const exact = planJob(model(segments(1388 * MiB)), deviceWithStreamingE(4000 * MiB), stream);
    expect(exact.segments.map((s) => s.resident)).toEqual([true, true, false, false]);
    expect(exact.resident_bytes).toBe(2000 * MiB);
    // One more byte of external input: E − reserved = 2000 MiB − 1, the second no longer fits.
    const over = planJob(model(segments(1388 * MiB + 1)), deviceWithStreamingE(4000 * MiB), stream);
    expect(over.segments.map((s) => s.resident)).toEqual([true, false, false, false]);
  });

  it("without streaming every segment is resident", () => {
    const plan = planJob(
      model(params(...Array<number>(4).fill(100 * MiB))),
      device(1000 * MiB),
      noStream,
    );
    expect(plan.budget).toEqual({ B: 1000 * MiB, E: 1000 * MiB, P: 1000 * MiB });
    expect(ranges(plan.segments)).toEqual([[0, 3]]);
    expect(plan.segments[0].resident).toBe(true);
    expect(plan.resident_bytes).toBe(400 * MiB);
    expect(plan.streamed_bytes_per_step).toBe(0);
  });
});

describe("no split (--max-vram 0)", () => {
  const segments = [
    seg("a", 100 * MiB, 50 * MiB, 10 * MiB, 0, 5 * MiB),
    seg("b", 200 * MiB, 80 * MiB, 20 * MiB, 10 * MiB, 1 * MiB),
  ];

  it("one resident segment over every base segment; B = 0, P = E = free (no streaming margin)", () => {
    const plan = planJob(model(segments), device(2 * GiB), { ...stream, maxVramGiB: 0 });
    expect(plan.budget).toEqual({ B: 0, E: 2 * GiB, P: 2 * GiB });
    expect(plan.segments).toEqual([
      {
        index: 0,
        base: [0, 1],
        param_bytes: 300 * MiB,
        compute_buffer_bytes: 80 * MiB,
        output_bytes: 20 * MiB,
        prev_cut_bytes: 0,
        external_bytes: 5 * MiB,
        resident: true,
      },
    ]);
    expect(plan.resident_bytes).toBe(300 * MiB);
    expect(plan.streamed_bytes_per_step).toBe(0);
  });

  it("a 512 MiB device runs a model that fits without streaming (no 512 MiB margin; issue 12)", () => {
    // Σparam 150 MiB + W (150 params + 60 compute) = 360 MiB ≤ 512 MiB: it fits. Before, E was
    // free − 512 MiB = 0 and the job was refused.
    const small = [seg("a", 50 * MiB, 30 * MiB), seg("b", 100 * MiB, 60 * MiB)];
    // Σparam 300 MiB + W 380 MiB = 680 MiB > 512 MiB: it does not.
    const big = [seg("a", 100 * MiB, 50 * MiB), seg("b", 200 * MiB, 80 * MiB)];
    const plan = planJob(model(small), device(512 * MiB), { ...stream, maxVramGiB: 0 });
    expect(plan.budget).toEqual({ B: 0, E: 512 * MiB, P: 512 * MiB });
    expect(plan.segments.map((s) => s.resident)).toEqual([true]);
    expect(() => planJob(model(big), device(512 * MiB), { ...stream, maxVramGiB: 0 })).toThrow(
      /does not fit without splitting \(--max-vram 0\)/,
    );
  });

  it("without streaming E = free", () => {
    const plan = planJob(model(segments), device(2 * GiB), { ...noStream, maxVramGiB: 0 });
    expect(plan.budget).toEqual({ B: 0, E: 2 * GiB, P: 2 * GiB });
  });

  it("fails when Σparam + W > E", () => {
    // W = 600 + 100 = 700 MiB; 600 + 700 = 1300 MiB > 1000 MiB.
    const big = [seg("a", 300 * MiB, 100 * MiB), seg("b", 300 * MiB)];
    expect(() => planJob(model(big), device(1000 * MiB), { ...noStream, maxVramGiB: 0 })).toThrow(
      "model m does not fit without splitting (--max-vram 0): params 0.6 GiB + largest " +
        "working set W 0.7 GiB = 1.3 GiB is more than the effective budget E 1.0 GiB",
    );
  });
});

describe("errors", () => {
  it("no base segments", () => {
    expect(() => planJob(model([], "empty"), device(GiB), stream)).toThrow(
      new PlanError("model empty has no base segments"),
    );
  });

  it("a base segment alone needs more than E", () => {
    // --max-vram 0.9: B = E = floor(0.9 · 2^30) = 966367641 (free 4 GiB − 512 MiB is more).
    const segments = [
      seg("prelude", 10 * MiB),
      seg("blocks.0", 100 * MiB),
      seg("blocks.1", 100 * MiB),
      seg("blocks.2", 100 * MiB),
      seg("blocks.3", GiB, 200 * MiB),
      seg("final", 10 * MiB),
    ];
    expect(() => planJob(model(segments), device(4 * GiB), { ...stream, maxVramGiB: 0.9 })).toThrow(
      "segment blocks.3 needs 1.2 GiB (params 1.0 GiB + compute 0.2 GiB + activations in " +
        "0.0 GiB + out 0.0 GiB) but the effective budget E is 0.9 GiB",
    );
    // Without streaming too (the same check comes first).
    expect(() =>
      planJob(model(segments), device(4 * GiB), { ...noStream, maxVramGiB: 0.9 }),
    ).toThrow(/^segment blocks\.3 needs/);
  });

  it("suggests raising --max-vram only when it is what limits E", () => {
    const segments = params(...Array<number>(8).fill(100 * MiB));
    expect(() => planJob(model(segments), device(4 * GiB), { ...noStream, maxVramGiB: 1 })).toThrow(
      /does not fit without streaming: .*; enable streaming or raise --max-vram$/,
    );
  });

  it("names the largest over-budget segment and counts the others", () => {
    const segments = [seg("x", 2 * GiB), seg("y", 3 * GiB), seg("z", 10 * MiB)];
    expect(() => planJob(model(segments), device(2 * GiB), stream)).toThrow(
      "segment y needs 3.0 GiB (params 3.0 GiB + compute 0.0 GiB + activations in 0.0 GiB + " +
        "out 0.0 GiB) but the effective budget E is 1.5 GiB (1 other segment(s) are over E too)",
    );
  });

  it("a budget that leaves no memory", () => {
    expect(() =>
      planJob(model(params(1)), device(12 * GiB), { ...stream, maxVramGiB: -20 }),
    ).toThrow("--max-vram -20 leaves no memory: free 12.0 GiB − 20.0 GiB");
  });

  it("unknown policy lists the known ones", () => {
    expect(() =>
      planJob(model(params(1)), device(GiB), { policy: "bogus" as "sdcpp", stream: true }),
    ).toThrow("unknown policy 'bogus' (known: sdcpp, sdcpp-prefetch, ferry)");
  });

  it("non-finite or negative inputs name the field", () => {
    const bad = [seg("a", 1), seg("b", NaN)];
    expect(() => planJob(model(bad), device(GiB), stream)).toThrow(
      "model.segments[1].param_bytes must be a non-negative number (got NaN)",
    );
    const negative = [seg("a", 1, -5)];
    expect(() => planJob(model(negative), device(GiB), stream)).toThrow(
      "model.segments[0].compute_buffer_bytes must be a non-negative number (got -5)",
    );
    expect(() =>
      planJob(model(params(1)), { ...device(GiB), free_bytes: Infinity }, stream),
    ).toThrow("device.free_bytes must be a non-negative number (got Infinity)");
  });

  it("every error is a PlanError", () => {
    expect(() => planJob(model([]), device(GiB), stream)).toThrow(PlanError);
    expect(() => planJob(model(params(2 * GiB)), device(GiB), stream)).toThrow(PlanError);
  });

  it("fills documented defaults for callers outside TypeScript", () => {
    const plan = planJob(model(params(MiB)), device(GiB), {} as PlanOptions);
    expect(plan.policy).toBe("sdcpp");
    expect(plan.stream).toBe(true);
  });
});

describe("PR #1612 story: Z-Image bf16 (11.7 GB) on an RTX 3060 12 GB, --max-vram -1", () => {
  const fixture = join(__dirname, "fixtures/profiles/zimage-rtx3060.json");

  it("caps P, makes ~10 merged segments and a nonzero resident prefix", async () => {
    const { model: zimage, device: rtx3060 } = await readProfileFile(fixture);
    expect(zimage!.segments).toHaveLength(32);
    const total = zimage!.segments.reduce((sum, s) => sum + s.param_bytes, 0);
    expect(total).toBe(11_700_000_000);

    const plan = planJob(zimage!, rtx3060, { ...stream, maxVramGiB: -1 });
    // free = 11.5 GiB = 12348030976; B = free − 2^30; E = min(B, free − 512 MiB) = B.
    expect(plan.budget).toEqual({ B: 11_274_289_152, E: 11_274_289_152, P: 2_818_572_288 });
    // Blocks need 1.2e9 compute + 0.2e9 activations, so ≤ 1418572288 of params: three blocks
    // (1.125e9). The prelude (compute 0.8e9, no prev_cut) takes three; final joins the last three.
    expect(ranges(plan.segments)).toEqual([
      [0, 3],
      [4, 6],
      [7, 9],
      [10, 12],
      [13, 15],
      [16, 18],
      [19, 21],
      [22, 24],
      [25, 27],
      [28, 31],
    ]);
    expect(plan.segments.length).toBeGreaterThanOrEqual(9);
    // W = 1.475e9 + 1.2e9 + 0.1e9 + 16 MiB = 2791777216; E − reserved = 7945641024:
    // 1.475e9 + 5 · 1.125e9 = 7.1e9 fits, one more (8.225e9) does not.
    expect(plan.segments.map((s) => s.resident)).toEqual([
      ...Array<boolean>(6).fill(true),
      ...Array<boolean>(4).fill(false),
    ]);
    expect(plan.resident_bytes).toBe(7_100_000_000);
    expect(plan.streamed_bytes_per_step).toBe(4_600_000_000);
  });

  it("uncapped (before PR #1612): 2 merged segments and nothing resident", async () => {
    const { model: zimage } = await readProfileFile(fixture);
    const E = 11_274_289_152;
    const runs = mergeBaseSegments(zimage!.segments, E);
    // prelude + 25 blocks (params 9.725e9, need 11.025e9 ≤ E); then 5 blocks + final.
    expect(runs.map((r) => [r.first, r.last])).toEqual([
      [0, 25],
      [26, 31],
    ]);
    expect(residencyLimit(E, worstFootprint(runs))).toBeLessThan(0);
    expect(residentPrefixLength(runs, residencyLimit(E, worstFootprint(runs)))).toBe(0);
  });

  it("the plan JSON has the policy's numbers", async () => {
    const { model: zimage, device: rtx3060 } = await readProfileFile(fixture);
    const json = planToJson(planJob(zimage!, rtx3060, { ...stream, maxVramGiB: -1 }));
    expect(json.segments[0]).toEqual({
      index: 0,
      base: [0, 3],
      param_bytes: 1_475_000_000,
      compute_buffer_bytes: 1_200_000_000,
      resident: true,
    });
    expect(json.segments[9]).toEqual({
      index: 9,
      base: [28, 31],
      param_bytes: 1_225_000_000,
      compute_buffer_bytes: 1_200_000_000,
      resident: false,
    });
  });
});

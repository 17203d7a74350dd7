import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { profileFiles } from "../bench/profiles";
import { runPlanCommand, type PlanCommandIo } from "../cli/commands/plan";
import { GiB, MiB } from "../lib/config/units";
import type { BaseSegment, DeviceProfile, ModelProfile } from "../lib/model/profile";
import {
  buildCostModel,
  DEFAULT_H2D_GBPS,
  DEFAULT_TFLOPS,
  deviceRates,
  priceRuns,
} from "../lib/planner/costModel";
import {
  costExplanationJson,
  explainCosts,
  formatCostExplanation,
  formatSeconds,
} from "../lib/planner/explainFerry";
import {
  FERRY_MARGIN_BYTES,
  ferryMemory,
  planFerry,
  resolveFerryBudget,
} from "../lib/planner/ferryPolicy";
import { formatPlan } from "../lib/planner/formatPlan";
import { lowerBound, lowerBoundFor } from "../lib/planner/lowerBound";
import { KNOWN_POLICIES, planJob } from "../lib/planner/planJob";
import { planToJson } from "../lib/planner/planJson";
import { parseProfile, readProfileFile } from "../lib/planner/profileFile";
import { simulatePlan, simulateSchedule, type ScheduleSegment } from "../lib/planner/simulate";
import { PlanError, type PlanOptions } from "../lib/planner/types";

const profiles = join(__dirname, "fixtures/profiles");

/** A base segment with `computeS` seconds of compute at 1 TFLOP/s. */
function seg(name: string, params: number, computeS = 0, extra: Partial<BaseSegment> = {}) {
  return {
    name,
    param_bytes: params,
    compute_buffer_bytes: 0,
    output_bytes: 0,
    prev_cut_bytes: 0,
    external_bytes: 0,
    flops: computeS * 1e12,
    ...extra,
  };
}

const blocks = (count: number, params: number, computeS: number) =>
  Array.from({ length: count }, (_, i) => seg(`b${i}`, params, computeS));

/** 8 GiB free, 1 GB/s, 1 TFLOP/s, no dispatch overhead unless given. */
function device(overrides: Partial<DeviceProfile> = {}): DeviceProfile {
  return {
    name: "gpu",
    total_bytes: 8 * GiB,
    free_bytes: 8 * GiB,
    h2d_gbps: 1,
    tflops: 1,
    dispatch_us: 0,
    ...overrides,
  };
}

const model = (segments: BaseSegment[]): ModelProfile => ({ name: "m", segments });
const ferry = (maxVramGiB?: number): PlanOptions => ({ policy: "ferry", stream: true, maxVramGiB });
const residency = (plan: { segments: Array<{ resident: boolean }> }) =>
  plan.segments.map((s) => (s.resident ? "R" : "s")).join("");

describe("cost model", () => {
  it("converts device rates to SI units and assumes defaults for unknown ones", () => {
    const rates = deviceRates(device({ h2d_gbps: 25, tflops: 100, dispatch_us: 20 }));
    expect(rates).toMatchObject({
      h2dBytesPerS: 25e9,
      flopsPerS: 100e12,
      diskBytesPerS: 0,
      assumed: { h2d: false, compute: false },
    });
    expect(rates.dispatchS).toBeCloseTo(20e-6, 15);
    const unknown = deviceRates(device({ h2d_gbps: 0, tflops: 0 }));
    expect(unknown.h2dBytesPerS).toBe(DEFAULT_H2D_GBPS * 1e9);
    expect(unknown.flopsPerS).toBe(DEFAULT_TFLOPS * 1e12);
    expect(unknown.assumed).toEqual({ h2d: true, compute: true });
    expect(() => deviceRates(device({ h2d_gbps: -1 }))).toThrow(PlanError);
  });

  it("prices a merged run with the merge rules and one dispatch", () => {
    const cost = buildCostModel(
      model([
        seg("a", 100, 1, { compute_buffer_bytes: 7, prev_cut_bytes: 3, external_bytes: 1 }),
        seg("b", 200, 2, { compute_buffer_bytes: 9, output_bytes: 4, external_bytes: 5 }),
        seg("c", 300, 3, { output_bytes: 6 }),
      ]),
      device({ h2d_gbps: 1e-7, dispatch_us: 1e6 }), // 100 B/s; δ = 1 s
    );
    expect(cost.totalParamBytes).toBe(600);
    expect(cost.totalComputeS).toBe(6);
    expect(cost.run(0, 1)).toEqual({
      first: 0,
      last: 1,
      param_bytes: 300,
      compute_buffer_bytes: 9,
      output_bytes: 4,
      prev_cut_bytes: 3,
      external_bytes: 5,
      copy_s: 3,
      first_copy_s: 3,
      compute_s: 4,
    });
    expect(() => priceRuns(cost, [[2, 3]])).toThrow("does not fit the model's 3 base segments");
  });

  it("uses measured compute seconds and a slower disk for the first copy", () => {
    const cost = buildCostModel(model([seg("a", 1e9, 5)]), device({ h2d_gbps: 10 }), {
      computeSeconds: [0.25],
      diskGbps: 2,
    });
    expect(cost.run(0, 0).compute_s).toBe(0.25);
    expect(cost.run(0, 0).copy_s).toBeCloseTo(0.1, 12);
    expect(cost.run(0, 0).first_copy_s).toBeCloseTo(0.5, 12);
    expect(() =>
      buildCostModel(model([seg("a", 1)]), device(), { computeSeconds: [1, 2] }),
    ).toThrow("measured compute seconds cover 2 segment(s) but the model has 1");
  });
});

describe("simulateSchedule", () => {
  const streamed = (copy: number, compute: number): ScheduleSegment => ({
    copy_s: copy,
    compute_s: compute,
    resident: false,
  });
  const resident = (compute: number, upload = 0): ScheduleSegment => ({
    copy_s: upload,
    compute_s: compute,
    resident: true,
  });

  it("serial execution (slots 0) adds every copy to every compute", () => {
    const result = simulateSchedule([streamed(1, 2), resident(3, 5), streamed(1, 2)], {
      slots: 0,
    });
    expect(result.step_s).toBe(1 + 2 + 3 + 1 + 2);
    expect(result.first_step_s).toBe(1 + 2 + 5 + 3 + 1 + 2); // the resident upload, once
    expect(result.converged).toBe(true);
  });

  it("one slot serialises copy and compute of consecutive streamed segments", () => {
    // Copy B may start only when A (the slot's last user) has computed.
    const result = simulateSchedule([streamed(1, 1), streamed(1, 1)], { slots: 1 });
    expect(result.step_s).toBe(4);
  });

  it("two slots overlap copies with compute, prefetching across the step boundary", () => {
    const result = simulateSchedule([streamed(1, 1), streamed(1, 1)], { slots: 2, detail: true });
    expect(result.step_s).toBe(2); // = Σ compute = Σ copies
    expect(result.stall_s).toBe(0);
    // The next step's first copy ran during this step's last compute.
    expect(result.segments![0].copy_start_s).toBe(-1);
    expect(result.segments![0].stall_s).toBe(0);
  });

  it("a resident segment's compute hides the next copy", () => {
    // R computes 3 s while S (copy 2 s) is copied into the freed slot: compute-bound.
    expect(simulateSchedule([resident(3), streamed(2, 1)], { slots: 1 }).step_s).toBe(4);
    // R computes only 1 s: S's copy stalls the compute engine by 1 s.
    const short = simulateSchedule([resident(1), streamed(2, 1)], { slots: 1, detail: true });
    expect(short.step_s).toBe(3);
    expect(short.segments![1].stall_s).toBe(1);
    expect(short.segments![0].stall_s).toBe(0);
  });

  it("never reports less than either engine's work", () => {
    const result = simulateSchedule([streamed(5, 1), streamed(5, 1)], { slots: 4 });
    expect(result.step_s).toBe(10);
    expect(result.copy_s).toBe(10);
    expect(result.compute_s).toBe(2);
  });

  it("rejects bad input", () => {
    expect(() => simulateSchedule([streamed(1, 1)], { slots: 1.5 })).toThrow(RangeError);
    expect(() => simulateSchedule([streamed(-1, 1)], { slots: 1 })).toThrow(RangeError);
  });
});

describe("lowerBound", () => {
  // β = 100 MiB/s, 1 TFLOP/s; two segments of 100 and 300 MiB with buffers 50 and 80 MiB.
  const beta = (100 * MiB) / 1e9;
  const two = (computeS: number, external = 0) =>
    buildCostModel(
      model([
        seg("a", 100 * MiB, computeS, {
          compute_buffer_bytes: 50 * MiB,
          external_bytes: external,
        }),
        seg("b", 300 * MiB, computeS, { compute_buffer_bytes: 80 * MiB }),
      ]),
      device({ h2d_gbps: beta }),
    );

  it("streaming only the small segment cannot fit, so both classes stream the large one", () => {
    // Streaming only a (100 MiB) would leave b (300 MiB) resident beside a's 100 + 50 MiB: 450 >
    // 400. So b streams: serial ≥ 2 s + 3.8 s of copies (resident a + b's 300 + 80 ≤ 400);
    // one slot ≥ 3.8 s of copies + the 1.8 s of compute they carry through the slot.
    const bound = lowerBound(two(1), 400 * MiB, true);
    expect(bound.streaming_necessary).toBe(true);
    expect(bound.min_dispatches).toBe(2);
    expect(bound.serial!.min_streamed_bytes).toBe(380 * MiB);
    expect(bound.serial!.bound_s).toBeCloseTo(5.8, 9);
    expect(bound.overlapped).toMatchObject({ slots: 1, min_streamed_bytes: 380 * MiB });
    expect(bound.overlapped!.occupancy_s).toBeCloseTo(5.6, 9);
    expect(bound.lower_bound_s).toBeCloseTo(5.6, 9);
    expect(bound.bound_by).toBe("slots");
  });

  it("takes serial plans' bound when no overlapped plan fits", () => {
    // 60 MiB of external inputs: a slotted arena needs 300 + 110 + resident > 400.
    const bound = lowerBound(two(1, 60 * MiB), 400 * MiB, true);
    expect(bound.overlapped).toBeUndefined();
    expect(bound.lower_bound_s).toBeCloseTo(5.8, 9);
    expect(bound.bound_by).toBe("serial");
  });

  // Four blocks of 100 MiB with 10 MiB buffers in 350 MiB.
  const four = (computeS: number) =>
    buildCostModel(
      model(
        Array.from({ length: 4 }, (_, i) =>
          seg(`b${i}`, 100 * MiB, computeS, { compute_buffer_bytes: 10 * MiB }),
        ),
      ),
      device({ h2d_gbps: beta }),
    );

  it("takes overlapped plans' bound when compute dominates", () => {
    // One slot: resident ≤ 350 − 100 − 10 → ≥ 160 MiB streamed (1.6 s), slot busy 1.6 + 1.6 s.
    const bound = lowerBound(four(1), 350 * MiB, true);
    expect(bound.overlapped).toMatchObject({ slots: 1, min_streamed_bytes: 160 * MiB });
    expect(bound.overlapped!.occupancy_s).toBeCloseTo(3.2, 9);
    expect(bound.serial!.bound_s).toBeCloseTo(5.6, 9);
    expect(bound.lower_bound_s).toBe(4);
    expect(bound.bound_by).toBe("compute");
  });

  it("charges the slots' occupancy: a segment holds its slot while copied and computed", () => {
    // One slot: copies 1.6 s + their compute 0.8 s pass through it (2.4 s); two slots leave
    // room for 90 MiB less residency: 2.6 s of copies. Both beat serial (2 + 1.6 s).
    const bound = lowerBound(four(0.5), 350 * MiB, true);
    expect(bound.lower_bound_s).toBeCloseTo(2.4, 9);
    expect(bound.bound_by).toBe("slots");
    expect(bound.overlapped).toMatchObject({ slots: 1 });
  });

  it("is reached exactly where the slots' occupancy binds", () => {
    // Four 100 MiB blocks of 0.5 s in 300 MiB at 100 MiB/s: one slot leaves room for two
    // residents, and each streamed block holds the slot for 1 s of copy + 0.5 s of compute.
    const m = model(blocks(4, 100 * MiB, 0.5));
    const plan = planJob(m, device({ h2d_gbps: beta }), ferry(300 / 1024));
    const bound = lowerBoundFor(m, device({ h2d_gbps: beta }), {
      maxVramGiB: 300 / 1024,
      stream: true,
    });
    expect(bound.bound_by).toBe("slots");
    expect(bound.lower_bound_s).toBeCloseTo(3, 9);
    expect(plan.slots).toBe(1);
    expect(plan.predicted_step_s).toBeCloseTo(3, 9);
  });

  it("is Σ compute + one dispatch when everything might stay resident or nothing streams", () => {
    expect(lowerBound(two(1), 480 * MiB, true)).toMatchObject({
      lower_bound_s: 2,
      streaming_necessary: false,
      copy_s: 0,
    });
    expect(lowerBound(two(1), 100 * MiB, false).lower_bound_s).toBe(2);
  });

  it("takes the memory any policy may use: min(B, free), free with no split", () => {
    const m = model(blocks(4, GiB, 1));
    const d = device({ free_bytes: 3 * GiB });
    expect(lowerBoundFor(m, d, { maxVramGiB: 2, stream: true }).memory_cap_bytes).toBe(2 * GiB);
    expect(lowerBoundFor(m, d, { maxVramGiB: -1, stream: true }).memory_cap_bytes).toBe(2 * GiB);
    expect(lowerBoundFor(m, d, { maxVramGiB: 0, stream: true }).streaming_necessary).toBe(false);
  });
});

describe("ferry memory and budget", () => {
  it("E = min(B, free − 128 MiB), whether or not streaming", () => {
    const free = 4 * GiB;
    expect(resolveFerryBudget({ freeBytes: free, maxVramGiB: 2, stream: true }).E).toBe(2 * GiB);
    expect(resolveFerryBudget({ freeBytes: free, stream: true }).E).toBe(free - FERRY_MARGIN_BYTES);
    expect(resolveFerryBudget({ freeBytes: free, maxVramGiB: 0, stream: false }).E).toBe(
      free - FERRY_MARGIN_BYTES,
    );
    expect(() => resolveFerryBudget({ freeBytes: 100 * MiB, stream: true })).toThrow(
      "the device leaves no memory: free 100.0 MiB is not more than Ferry's 128.0 MiB margin",
    );
  });

  it("counts resident weights, slots of the largest streamed segment and each working region's worst case", () => {
    const figures = (params: number, buffer: number, resident: boolean, carried = 0) => ({
      param_bytes: params,
      compute_buffer_bytes: buffer,
      output_bytes: carried,
      prev_cut_bytes: carried,
      external_bytes: 1,
      resident,
    });
    const segments = [
      figures(100, 50, true),
      figures(300, 10, false, 5),
      figures(200, 80, false),
      figures(400, 20, true),
    ];
    expect(ferryMemory(segments, 2)).toEqual({
      slots: 2,
      resident_bytes: 500,
      slot_bytes: 300,
      staging_bytes: 600,
      working_bytes: 91, // max buffer 80 + max carried 5 + 5 + max external 1
      total_bytes: 1191,
    });
    // Serial: the largest need, a streamed segment's params included.
    expect(ferryMemory(segments, 0)).toMatchObject({
      slots: 0,
      working_bytes: 321,
      total_bytes: 821,
    });
    // Nothing streamed: no slots.
    expect(ferryMemory([figures(100, 50, true)], 3)).toMatchObject({ slots: 0, total_bytes: 151 });
  });
});

describe("the ferry policy", () => {
  it("is registered beside sdcpp; sdcpp stays the default", () => {
    expect(KNOWN_POLICIES).toEqual(["sdcpp", "sdcpp-prefetch", "ferry"]);
    const m = model(blocks(2, MiB, 0.01));
    const plan = planJob(m, device(), { stream: true } as PlanOptions);
    expect(plan.policy).toBe("sdcpp");
  });

  it("spreads residents between streamed segments and overlaps copies with compute", () => {
    // 8 blocks of 100 MiB (0.105 s to copy, 0.1 s to compute) in 500 MiB: sd.cpp streams all
    // of them serially; Ferry keeps some resident, spaced out, and hides the copies.
    const m = model(blocks(8, 100 * MiB, 0.1));
    const sdcpp = planJob(m, device(), { ...ferry(500 / 1024), policy: "sdcpp" });
    const plan = planJob(m, device(), ferry(500 / 1024));
    expect(plan.policy).toBe("ferry");
    expect(plan.slots).toBeGreaterThanOrEqual(1);
    expect(residency(plan)).not.toMatch(/^R+s+$/); // not a prefix
    expect(residency(plan)).toMatch(/R/);
    expect(plan.predicted_step_s).toBeCloseTo(0.8, 3); // compute-bound: every copy hidden
    expect(plan.lower_bound_s).toBeCloseTo(0.8, 9);
    expect(sdcpp.predicted_step_s! / plan.predicted_step_s!).toBeGreaterThan(1.5);
    expect(ferryMemory(plan.segments, plan.slots!).total_bytes).toBeLessThanOrEqual(500 * MiB);
  });

  it("keeps the segment that costs most to copy resident, wherever it is", () => {
    // The last segment is 400 MiB with almost no compute: streaming it would also need a
    // 400 MiB slot. Ferry keeps it resident and streams blocks through 100 MiB slots.
    const m = model([...blocks(4, 100 * MiB, 0.1), seg("big", 400 * MiB, 0.001)]);
    const plan = planJob(m, device(), ferry(700 / 1024));
    expect(plan.segments[4].resident).toBe(true);
    expect(ferryMemory(plan.segments, plan.slots!).slot_bytes).toBe(100 * MiB);
    expect(plan.predicted_step_s! / plan.lower_bound_s!).toBeLessThan(1.02);
  });

  it("merges small segments when the dispatch overhead matters", () => {
    // 200 segments of 1 MiB and 10 µs each, 100 µs per dispatch.
    const m = model(Array.from({ length: 200 }, (_, i) => seg(`t${i}`, MiB, 10e-6)));
    const d = device({ h2d_gbps: 10, dispatch_us: 100 });
    const plan = planJob(m, d, ferry(100 / 1024));
    const sdcpp = planJob(m, d, { ...ferry(100 / 1024), policy: "sdcpp" });
    expect(plan.segments.length).toBeLessThan(100);
    expect(plan.predicted_step_s).toBeLessThan(sdcpp.predicted_step_s!);
    expect(plan.predicted_step_s! / plan.lower_bound_s!).toBeLessThan(1.1);
  });

  it("without streaming keeps everything resident in one merged segment, or refuses", () => {
    const m = model(blocks(4, 100 * MiB, 0.1));
    const plan = planJob(m, device(), { policy: "ferry", stream: false });
    expect(plan.segments).toHaveLength(1);
    expect(plan.segments[0].resident).toBe(true);
    expect(plan.slots).toBe(0);
    expect(plan.streamed_bytes_per_step).toBe(0);
    expect(() =>
      planJob(m, device(), { policy: "ferry", stream: false, maxVramGiB: 0.25 }),
    ).toThrow(
      "model m does not fit without streaming: params and working set 400.0 MiB are more than " +
        "Ferry's effective budget E 256.0 MiB; enable streaming or raise --max-vram",
    );
  });

  it("with --max-vram 0 runs the model as one resident unit", () => {
    const plan = planJob(model(blocks(3, MiB, 0.1)), device(), ferry(0));
    expect(plan.budget).toEqual({
      B: 0,
      E: 8 * GiB - FERRY_MARGIN_BYTES,
      P: 8 * GiB - FERRY_MARGIN_BYTES,
    });
    expect(plan.segments.map((s) => s.base)).toEqual([[0, 2]]);
  });

  it("names a base segment that cannot fit", () => {
    const m = model([seg("small", MiB), seg("huge", GiB, 0, { compute_buffer_bytes: 64 * MiB })]);
    expect(() => planJob(m, device(), ferry(0.5))).toThrow(
      "segment huge needs 1.1 GiB (params 1.0 GiB + compute 0.1 GiB + activations in 0.0 GiB + " +
        "out 0.0 GiB + external 0.0 GiB) but Ferry's effective budget E is 0.5 GiB",
    );
    expect(() => planFerry(model([]), device(), ferry())).toThrow("model m has no base segments");
  });

  it("is deterministic and never predicted slower than sdcpp on the Z-Image fixture", async () => {
    const { model: z, device: d } = await readProfileFile(join(profiles, "zimage-rtx3060.json"));
    for (const maxVramGiB of [-1, 6, 3]) {
      const a = planJob(z!, d, ferry(maxVramGiB));
      expect(planJob(z!, d, ferry(maxVramGiB))).toEqual(a);
      const sdcpp = planJob(z!, d, { ...ferry(maxVramGiB), policy: "sdcpp" });
      expect(a.predicted_step_s).toBeLessThanOrEqual(sdcpp.predicted_step_s!);
      expect(a.predicted_step_s).toBeGreaterThanOrEqual(a.lower_bound_s!);
    }
  });

  it("prices sdcpp plans on the same simulator: serial, slots 0", async () => {
    const { model: z, device: d } = await readProfileFile(join(profiles, "zimage-rtx3060.json"));
    const plan = planJob(z!, d, { policy: "sdcpp", stream: true, maxVramGiB: -1 });
    const cost = buildCostModel(z!, d);
    expect(plan.slots).toBe(0);
    // Serial: Σ compute (with one dispatch per merged segment) + Σ streamed copies.
    const serial = plan.segments.reduce((t, s) => {
      const run = cost.run(s.base[0], s.base[1]);
      return t + run.compute_s + (s.resident ? 0 : run.copy_s);
    }, 0);
    expect(plan.predicted_step_s).toBeCloseTo(serial, 9);
    expect(simulatePlan(plan, cost).step_s).toBe(plan.predicted_step_s);
  });
});

describe("plan JSON, text and --explain", () => {
  const m = model(blocks(8, 100 * MiB, 0.1));

  it("appends predicted_step_s, lower_bound_s and slots after the agreed keys, for both policies", () => {
    for (const policy of ["sdcpp", "ferry"] as const) {
      const json = planToJson(planJob(m, device(), { ...ferry(0.5), policy }));
      expect(Object.keys(json)).toEqual([
        "policy",
        "stream",
        "budget",
        "segments",
        "resident_bytes",
        "streamed_bytes_per_step",
        "predicted_step_s",
        "lower_bound_s",
        "slots",
      ]);
    }
  });

  it("formats a ferry plan with its margin, slots, memory and prediction", () => {
    const plan = planJob(m, device(), ferry(0.5));
    const text = formatPlan(plan, { modelName: "m", device: device(), maxVramGiB: 0.5 });
    expect(text).toContain("Policy ferry, streaming on");
    expect(text).toContain("min(B, free − 128.0 MiB margin)");
    expect(text).toContain("= E: no planner cap; the cost model chooses the boundaries");
    expect(text).toContain(`${plan.slots} staging slot(s) × 100.0 MiB`);
    expect(text).toMatch(/memory: resident .* \+ staging .* \+ working .* = .* of E 512\.0 MiB/);
    expect(text).toContain(`Predicted step: ${formatSeconds(plan.predicted_step_s!)}`);
  });

  it("explains per merged segment: bytes, state, copy, compute and stall, then the totals", () => {
    const options = ferry(0.5);
    const plan = planJob(m, device(), options);
    const x = explainCosts(plan, m, device(), options);
    expect(x.rows).toHaveLength(8);
    for (const row of x.rows) {
      expect(row.compute_s).toBeCloseTo(0.1, 12);
      expect(row.copy_s).toBeCloseTo(row.resident ? 0 : 0.1048576, 12);
    }
    expect(x.compute_s + x.stall_s).toBeCloseTo(x.predicted_step_s, 12);
    expect(x.predicted_step_s).toBe(plan.predicted_step_s);
    expect(x.lower_bound.lower_bound_s).toBe(plan.lower_bound_s);
    expect(x.memory!.total_bytes).toBeLessThanOrEqual(x.memory!.E);
    expect(x.alternative).toMatchObject({ policy: "sdcpp", slots: 0 });

    const text = formatCostExplanation(x);
    expect(text).toContain(
      "Cost model: host→device 1.0 GB/s, compute 1.0 TFLOP/s, 0 s per dispatch",
    );
    expect(text).toMatch(/ {2}#\s+base\s+params\s+state\s+copy\s+compute\s+stall/);
    expect(text).toMatch(/ {2}0\s+0\s+b0\s+100\.0 MiB\s+(resident|streamed)\s+/);
    expect(text).toContain(`predicted ${formatSeconds(x.predicted_step_s)}`);
    expect(text).toContain("Lower bound: 800.0 ms");
    expect(text).toMatch(
      /The sdcpp policy on the same input: 1\.\d{3} s per step \(\d\.\d\d× this plan's time\)/,
    );
    expect(costExplanationJson(x)).toMatchObject({
      slots: plan.slots,
      predicted_step_s: x.predicted_step_s,
    });
  });

  it("explains an sdcpp plan against ferry, and says when the other policy has no plan", () => {
    const options: PlanOptions = { policy: "sdcpp", stream: true, maxVramGiB: 0.5 };
    const x = explainCosts(planJob(m, device(), options), m, device(), options);
    expect(x.memory).toBeUndefined();
    expect(x.alternative).toMatchObject({ policy: "ferry" });
    expect(formatCostExplanation(x)).toContain(
      "serial: each streamed segment is copied, then computed",
    );

    // 640 MiB free: sd.cpp's E = 128 MiB, Ferry's E = 512 MiB. A 300 MiB segment fits only Ferry.
    const big = model([seg("a", 300 * MiB, 0.1), seg("b", 300 * MiB, 0.1)]);
    const small = device({ free_bytes: 640 * MiB, total_bytes: 640 * MiB });
    const f = planJob(big, small, ferry());
    const y = explainCosts(f, big, small, ferry());
    expect(y.alternative).toMatchObject({ policy: "sdcpp" });
    expect("error" in y.alternative!).toBe(true);
    expect(formatCostExplanation(y)).toContain(
      "The sdcpp policy on the same input: no plan (segment a needs",
    );
  });
});

describe("ferry plan CLI", () => {
  async function plan(...args: string[]) {
    const run = { code: 0, stdout: "", stderr: "" };
    const io: PlanCommandIo = {
      stdout: (text) => void (run.stdout += text),
      stderr: (text) => void (run.stderr += text),
    };
    run.code = await runPlanCommand(args, io);
    return run;
  }
  const flux = join(profiles, "models/flux1-dev-q8_0.json");
  const rtx4090 = join(profiles, "devices/rtx4090-24gb.json");

  it("--policy ferry --json prints the plan with the cost model's keys", async () => {
    const run = await plan(
      "--profile",
      flux,
      "--device-profile",
      rtx4090,
      "--max-vram",
      "6",
      "--policy",
      "ferry",
      "--json",
    );
    expect(run.stderr).toBe("");
    expect(run.code).toBe(0);
    const json = JSON.parse(run.stdout) as ReturnType<typeof planToJson>;
    const { model: f } = await readProfileFile(flux, { deviceOptional: true });
    const { device: d } = await readProfileFile(rtx4090, { modelOptional: true });
    expect(json).toEqual(planToJson(planJob(f!, d!, ferry(6))));
    expect(json.predicted_step_s).toBeGreaterThanOrEqual(json.lower_bound_s!);
  });

  it("--explain adds the breakdown and the other policy's prediction", async () => {
    const run = await plan(
      "--profile",
      flux,
      "--device-profile",
      rtx4090,
      "--max-vram",
      "6",
      "--policy",
      "ferry",
      "--explain",
    );
    expect(run.code).toBe(0);
    expect(run.stdout).toContain("Policy ferry, streaming on");
    expect(run.stdout).toContain("Per merged segment, steady state (ferry)");
    expect(run.stdout).toMatch(/ {2}0\s+0(-\d+)?\s+prelude/);
    expect(run.stdout).toContain("Lower bound: ");
    expect(run.stdout).toContain("The sdcpp policy on the same input: ");

    const json = await plan(
      "--profile",
      flux,
      "--device-profile",
      rtx4090,
      "--max-vram",
      "6",
      "--explain",
      "--json",
    );
    const parsed = JSON.parse(json.stdout) as Record<string, unknown>;
    expect(Object.keys(parsed).slice(-4)).toEqual([
      "predicted_step_s",
      "lower_bound_s",
      "slots",
      "explain",
    ]);
    expect(parsed.explain).toMatchObject({ alternative: { policy: "ferry" } });
  });

  it("--device-profile replaces the profile's device and warns about an ignored model", async () => {
    const zimage = join(profiles, "zimage-rtx3060.json");
    const run = await plan("--profile", zimage, "--device-profile", zimage, "--json");
    expect(run.code).toBe(0);
    expect(run.stderr).toBe(
      `ferry plan: warning: ${zimage}: model ignored; --device-profile supplies the device\n`,
    );
  });

  it("--help lists --explain and --device-profile", async () => {
    const run = await plan("--help");
    expect(run.stdout).toContain("--explain");
    expect(run.stdout).toContain("--device-profile <file>");
  });
});

describe("bench profiles", () => {
  it("the files under test/fixtures/profiles match bench/profiles.ts", async () => {
    const files = profileFiles();
    for (const kind of ["models", "devices"]) {
      const names = (await readdir(join(profiles, kind))).sort();
      expect(names).toEqual(
        files
          .filter((f) => f.path.startsWith(`${kind}/`))
          .map((f) => f.path.slice(kind.length + 1))
          .sort(),
      );
    }
    for (const file of files) {
      const text = await readFile(join(profiles, file.path), "utf8");
      expect(JSON.parse(text), file.path).toEqual(file.json);
    }
  });

  it("parse without warnings and document their source", async () => {
    for (const file of profileFiles()) {
      const path = join(profiles, file.path);
      const parsed = await readProfileFile(path, { modelOptional: true, deviceOptional: true });
      expect(parsed.warnings).toEqual([]);
      const json = file.json as { source: string; notes: string[] };
      expect(json.source.length).toBeGreaterThan(20);
      expect(json.notes.length).toBeGreaterThan(0);
    }
  });

  it("sizes follow the published parameter counts", () => {
    const counts = new Map(
      profileFiles()
        .filter((f) => f.path.endsWith("-bf16.json"))
        .map((f) => {
          const segments = (f.json as { model: ModelProfile }).model.segments;
          return [f.path, segments.reduce((t, s) => t + s.param_bytes, 0) / 2] as const;
        }),
    );
    // bf16: 2 B per parameter (f32 vectors count a little more).
    expect(counts.get("models/sdxl-unet-bf16.json")! / 1e9).toBeCloseTo(2.57, 1);
    expect(counts.get("models/flux1-dev-bf16.json")! / 1e9).toBeCloseTo(11.9, 1);
    expect(counts.get("models/sd3.5-large-bf16.json")! / 1e9).toBeCloseTo(8.15, 1);
    expect(counts.get("models/z-image-bf16.json")! / 1e9).toBeCloseTo(6.16, 1);
  });

  it("documentation fields must be strings", () => {
    const device = { name: "d", total_bytes: 1, free_bytes: 1 };
    const optional = { modelOptional: true };
    expect(
      parseProfile({ source: "x", notes: ["a"], device: { ...device, notes: "b" } }, optional)
        .warnings,
    ).toEqual([]);
    expect(() => parseProfile({ notes: 5, device }, optional)).toThrow(
      "notes must be a string or an array of strings (got 5)",
    );
    expect(() => parseProfile({ device: { ...device, source: ["a", 1] } }, optional)).toThrow(
      "device.source must be a string or an array of strings (got an array)",
    );
  });
});

/**
 * Property tests of both planning policies on thousands of seeded random profiles, devices and
 * budgets: plans stay within their own memory accounting, cover every base segment once in order,
 * are deterministic, never beat the lower bound, and the ferry policy is never predicted slower
 * than sdcpp. The lower bound is also checked against random feasible plans of every shape, not
 * only the policies' choices.
 */
import { describe, expect, it } from "vitest";
import { buildCostModel } from "../lib/planner/costModel";
import { FERRY_MAX_SLOTS, ferryMemory, resolveFerryBudget } from "../lib/planner/ferryPolicy";
import { lowerBound, memoryCap } from "../lib/planner/lowerBound";
import { planJob } from "../lib/planner/planJob";
import { residencyLimit, segmentVram, worstFootprint } from "../lib/planner/sdcpp";
import { simulatePlan } from "../lib/planner/simulate";
import { PlanError, type Plan, type PlannedSegment } from "../lib/planner/types";
import { mulberry32, randomCase, type RandomCase } from "./helpers/randomProfiles";

const CASES = 2000;
/** Float sums in different orders may differ in the last bits. */
const TOLERANCE = 1e-9;

function tryPlan(c: RandomCase, policy: "sdcpp" | "ferry"): Plan | PlanError {
  try {
    return planJob(c.model, c.device, { ...c.options, policy });
  } catch (error) {
    if (error instanceof PlanError) return error;
    throw error;
  }
}

/** Every base segment exactly once, in order, in non-empty ranges; indices 0..m−1. */
function expectCoverage(plan: Plan, count: number): void {
  let next = 0;
  plan.segments.forEach((segment, index) => {
    expect(segment.index).toBe(index);
    expect(segment.base[0]).toBe(next);
    expect(segment.base[1]).toBeGreaterThanOrEqual(segment.base[0]);
    next = segment.base[1] + 1;
  });
  expect(next).toBe(count);
  expect(plan.base_segment_names).toHaveLength(count);
}

function sum(segments: readonly PlannedSegment[], resident: boolean): number {
  return segments.filter((s) => s.resident === resident).reduce((t, s) => t + s.param_bytes, 0);
}

/** sd.cpp's own accounting (sdcpp.ts): the budget its rules promise to respect. */
function expectWithinSdcppAccounting(plan: Plan): void {
  const { E, P } = plan.budget;
  const W = worstFootprint(plan.segments);
  const total = sum(plan.segments, true) + sum(plan.segments, false);
  if (plan.budget.B === 0) {
    expect(plan.segments).toHaveLength(1);
    expect(total + W).toBeLessThanOrEqual(E);
  } else if (!plan.stream) {
    expect(plan.segments.every((s) => s.resident)).toBe(true);
    expect(total + W).toBeLessThanOrEqual(E);
  } else {
    // A resident prefix within E − (512 MiB + W), and merged segments within P unless alone.
    const residentCount = plan.segments.filter((s) => s.resident).length;
    plan.segments.forEach((s, i) => expect(s.resident).toBe(i < residentCount));
    if (residentCount > 0) expect(plan.resident_bytes).toBeLessThanOrEqual(residencyLimit(E, W));
    for (const s of plan.segments) {
      if (s.base[0] !== s.base[1]) expect(segmentVram(s)).toBeLessThanOrEqual(P);
      else expect(segmentVram(s)).toBeLessThanOrEqual(E);
    }
  }
}

describe("planner properties on random profiles", () => {
  it(`hold for ${CASES} seeded cases`, () => {
    const random = mulberry32(20260612);
    const stats = { both: 0, ferryOnly: 0, sdcppOnly: 0, neither: 0, faster: 0 };
    for (let i = 0; i < CASES; i++) {
      const c = randomCase(random);
      const context = `case ${i}: ${JSON.stringify(c.options)}`;
      const sdcpp = tryPlan(c, "sdcpp");
      const ferry = tryPlan(c, "ferry");
      const cost = buildCostModel(c.model, c.device);
      const count = c.model.segments.length;

      for (const plan of [sdcpp, ferry]) {
        if (plan instanceof PlanError) continue;
        expectCoverage(plan, count);
        expect(plan.resident_bytes, context).toBe(sum(plan.segments, true));
        expect(plan.streamed_bytes_per_step, context).toBe(sum(plan.segments, false));
        // The prediction is the simulator's, and no plan beats the bound.
        expect(simulatePlan(plan, cost).step_s).toBe(plan.predicted_step_s);
        expect(plan.predicted_step_s!, context).toBeGreaterThanOrEqual(
          plan.lower_bound_s! * (1 - TOLERANCE),
        );
        // Deterministic: planning again gives the same plan.
        expect(planJob(c.model, c.device, { ...c.options, policy: plan.policy })).toEqual(plan);
      }

      if (!(sdcpp instanceof PlanError)) {
        expect(sdcpp.slots).toBe(0);
        expectWithinSdcppAccounting(sdcpp);
      }
      if (!(ferry instanceof PlanError)) {
        const memory = ferryMemory(ferry.segments, ferry.slots!);
        expect(memory.total_bytes, context).toBeLessThanOrEqual(ferry.budget.E);
        expect(memory.slots).toBe(ferry.slots);
        expect(ferry.slots).toBeGreaterThanOrEqual(0);
        expect(ferry.slots).toBeLessThanOrEqual(FERRY_MAX_SLOTS);
        if (ferry.streamed_bytes_per_step === 0) expect(ferry.slots).toBe(0);
        if (!c.options.stream || c.options.maxVramGiB === 0) {
          expect(ferry.segments.every((s) => s.resident)).toBe(true);
        }
      }

      if (!(sdcpp instanceof PlanError) && !(ferry instanceof PlanError)) {
        stats.both++;
        // Same lower bound for the same input, whichever policy planned.
        expect(ferry.lower_bound_s).toBe(sdcpp.lower_bound_s);
        expect(ferry.predicted_step_s!, context).toBeLessThanOrEqual(
          sdcpp.predicted_step_s! * (1 + TOLERANCE),
        );
        if (ferry.predicted_step_s! < sdcpp.predicted_step_s! * 0.99) stats.faster++;
      } else if (!(sdcpp instanceof PlanError)) {
        stats.sdcppOnly++;
        // Ferry may refuse only where sd.cpp's own plan would not fit Ferry's accounting.
        let fits = false;
        try {
          const { E } = resolveFerryBudget({
            freeBytes: c.device.free_bytes,
            maxVramGiB: c.options.maxVramGiB,
            stream: c.options.stream,
          });
          fits = ferryMemory(sdcpp.segments, 0).total_bytes <= E;
        } catch (error) {
          if (!(error instanceof PlanError)) throw error;
        }
        expect(fits, `${context}: ferry refused (${(ferry as PlanError).message})`).toBe(false);
      } else if (!(ferry instanceof PlanError)) {
        stats.ferryOnly++;
      } else {
        stats.neither++;
      }
    }
    // The generator must exercise the interesting region, not only failures.
    expect(stats.both).toBeGreaterThan(CASES / 2);
    expect(stats.faster).toBeGreaterThan(CASES / 4);
  });

  it("no random feasible plan of any shape beats the lower bound", () => {
    const random = mulberry32(7);
    let checked = 0;
    for (let i = 0; i < 600; i++) {
      const c = randomCase(random, 16);
      const cost = buildCostModel(c.model, c.device);
      let cap: number;
      try {
        cap = memoryCap(c.device, c.options);
      } catch {
        continue;
      }
      const noSplit = c.options.maxVramGiB === 0;
      const bound = lowerBound(cost, cap, c.options.stream && !noSplit);
      const count = c.model.segments.length;
      for (let k = 0; k < 10; k++) {
        // Random boundaries, random residency, random slots.
        const segments: PlannedSegment[] = [];
        let first = 0;
        for (let b = 0; b < count; b++) {
          if (b === count - 1 || random() < 0.6) {
            const run = cost.run(first, b);
            segments.push({
              index: segments.length,
              base: [first, b],
              param_bytes: run.param_bytes,
              compute_buffer_bytes: run.compute_buffer_bytes,
              output_bytes: run.output_bytes,
              prev_cut_bytes: run.prev_cut_bytes,
              external_bytes: run.external_bytes,
              resident: !c.options.stream || noSplit || random() < 0.5,
            });
            first = b + 1;
          }
        }
        if (noSplit && segments.length > 1) continue;
        // Overlapped through random slots if that fits the cap, else serial if that does.
        let slots = ferryMemory(segments, Math.floor(random() * (FERRY_MAX_SLOTS + 1)));
        if (slots.total_bytes > cap) slots = ferryMemory(segments, 0);
        if (slots.total_bytes > cap) continue;
        const simulated = simulatePlan({ segments, slots: slots.slots }, cost).step_s;
        expect(simulated, `case ${i}.${k}`).toBeGreaterThanOrEqual(
          bound.lower_bound_s * (1 - TOLERANCE),
        );
        checked++;
      }
    }
    expect(checked).toBeGreaterThan(1000);
  });
});

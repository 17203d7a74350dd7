/**
 * Predicted step time of a plan: a discrete-event simulation of the two engines a GPU overlaps —
 * the copy engine (host→device DMA) and the compute engine — over the cyclic step schedule.
 *
 * Model (the execution a plan asks the executor for):
 * - Steps repeat the same sequence of merged segments; resident ones only compute.
 * - `slots ≥ 1` (Ferry): streamed segments cycle through `slots` staging buffers, reused every
 *   step. The g-th streamed copy overall (counting across steps) uses slot g mod slots, so it may
 *   start once the copy engine is idle (copies run in order, one at a time) and the segment that
 *   used that slot before — the (g − slots)-th — has finished computing. A segment computes once
 *   its copy has landed and the previous segment (in step order, across the step boundary) has
 *   finished. So step t+1's first copies run during step t's last computes whenever slots allow.
 * - `slots = 0` (sd.cpp): serial. Per streamed segment: copy (synchronous), then compute; nothing
 *   overlaps.
 * - `slots = 0` with `lookahead` (sd.cpp since PR #1905): as serial, but just before a segment
 *   computes, the next segment of the same step that needs a copy has it queued (into a fresh
 *   buffer); that copy overlaps this compute. No lookahead across the step boundary.
 * - Step 0 is the cold step: resident segments are uploaded once (in order, on the copy engine,
 *   without a slot) and every first copy runs at the cold rate (lazy disk loads when modelled).
 *
 * The schedule is a max-plus linear system, so per-step times settle into a periodic regime. The
 * simulation runs at least {@link DEFAULT_MIN_STEPS} steps and stops once three consecutive step
 * durations agree; otherwise (a regime with a period longer than one step, or a long transient)
 * it averages the second half of {@link defaultMaxSteps} steps. Either way the result is at least
 * each engine's work per step (Σ compute, Σ streamed copies): every periodic regime does that much
 * work per step, and the floor only matters when a window is still transient. Everything is plain
 * arithmetic in a fixed order, so results are deterministic.
 */
import { priceRuns, type CostModel } from "./costModel";
import type { Plan } from "./types";

/** A merged segment as the simulator sees it. */
export interface ScheduleSegment {
  /** Steady-state copy seconds (ignored when resident). */
  copy_s: number;
  /** Cold first-step copy seconds (resident segments too: their one upload). @default copy_s */
  first_copy_s?: number;
  /** Compute seconds, dispatch overhead included. */
  compute_s: number;
  resident: boolean;
}

/** Timing of one merged segment in the last simulated step, relative to that step's start. */
export interface SegmentTiming {
  /** When its copy started (negative: prefetched during the previous step); null when resident. */
  copy_start_s: number | null;
  copy_end_s: number | null;
  compute_start_s: number;
  compute_end_s: number;
  /** How long the compute engine waited for this segment's copy. */
  stall_s: number;
}

export interface SimulationResult {
  /** Steady-state seconds per step. */
  step_s: number;
  /** Seconds of the cold first step (resident uploads and first copies included). */
  first_step_s: number;
  /** Σ compute seconds per step (the compute engine's work). */
  compute_s: number;
  /** Σ copy seconds of the streamed segments per step (the copy engine's work). */
  copy_s: number;
  /** step_s − compute_s: how long per step the compute engine waits for copies. */
  stall_s: number;
  /** Steps simulated, the cold one included. */
  steps: number;
  /** Whether three consecutive step durations agreed (else a window average was used). */
  converged: boolean;
  /** Per-segment timing of the last simulated step, when asked for. */
  segments?: SegmentTiming[];
}

export interface SimulationOptions {
  /** Staging slots; 0 = serial execution without overlap (sd.cpp). */
  slots: number;
  /** With slots 0: one segment of copy lookahead within a step (sd.cpp PR #1905). @default false */
  lookahead?: boolean;
  /** Record per-segment timings of the last step. @default false */
  detail?: boolean;
  /** Fewest steps to simulate, the cold one included. @default DEFAULT_MIN_STEPS */
  minSteps?: number;
  /** Most steps to simulate. @default defaultMaxSteps(slots) */
  maxSteps?: number;
}

/** The cold step plus three steady cycles. */
export const DEFAULT_MIN_STEPS = 4;

/** Enough steps for multi-step periodic regimes (slots spanning steps) to average out. */
export function defaultMaxSteps(slots: number): number {
  return 32 + 4 * slots;
}

/** Relative tolerance for "two step durations agree". */
const AGREE = 1e-9;

/** A schedule as parallel arrays: the allocation-free form the planner's search uses. */
export interface ScheduleArrays {
  copy: ArrayLike<number>;
  firstCopy: ArrayLike<number>;
  compute: ArrayLike<number>;
  /** 1 = streamed, 0 = resident. */
  streamed: ArrayLike<number>;
}

/**
 * Simulates a plan's schedule and returns its steady-state step time.
 * @throws RangeError when slots is not a whole number ≥ 0 or a time is negative or not finite.
 */
export function simulateSchedule(
  segments: readonly ScheduleSegment[],
  options: SimulationOptions,
): SimulationResult {
  const count = segments.length;
  const arrays = {
    copy: new Float64Array(count),
    firstCopy: new Float64Array(count),
    compute: new Float64Array(count),
    streamed: new Uint8Array(count),
  };
  for (let m = 0; m < count; m++) {
    const segment = segments[m];
    arrays.copy[m] = segment.copy_s;
    arrays.firstCopy[m] = segment.first_copy_s ?? segment.copy_s;
    arrays.compute[m] = segment.compute_s;
    arrays.streamed[m] = segment.resident ? 0 : 1;
    for (const value of [arrays.copy[m], arrays.firstCopy[m], arrays.compute[m]]) {
      if (!Number.isFinite(value) || value < 0) {
        throw new RangeError(`segment ${m}: times must be finite and ≥ 0 (got ${value})`);
      }
    }
  }
  return simulateArrays(arrays, options);
}

/**
 * {@link simulateSchedule} on parallel arrays, without validating the times (the planner builds
 * them from validated profiles).
 * @throws RangeError when slots is not a whole number ≥ 0.
 */
export function simulateArrays(
  schedule: ScheduleArrays,
  options: SimulationOptions,
): SimulationResult {
  const { slots } = options;
  if (!Number.isInteger(slots) || slots < 0) {
    throw new RangeError(`slots must be a whole number ≥ 0 (got ${slots})`);
  }
  const lookahead = slots === 0 && (options.lookahead ?? false);
  const { copy, firstCopy, compute, streamed } = schedule;
  const count = compute.length;
  let computeWork = 0;
  let copyWork = 0;
  for (let m = 0; m < count; m++) {
    computeWork += compute[m];
    if (streamed[m]) copyWork += copy[m];
  }
  const minSteps = Math.max(2, options.minSteps ?? DEFAULT_MIN_STEPS);
  const maxSteps = Math.max(minSteps, options.maxSteps ?? defaultMaxSteps(slots));

  // Compute end of the streamed segment that last used each slot (ring buffer).
  const slotFree = new Float64Array(Math.max(1, slots));
  const stepEnds: number[] = [];
  let copyFree = 0;
  let computeFree = 0;
  let g = 0; // streamed copies so far, across steps
  let converged = false;
  const detail = options.detail ? new Array<SegmentTiming>(count) : undefined;

  for (let t = 0; t < maxSteps; t++) {
    const cold = t === 0;
    const stepStart = computeFree;
    let aheadOf = -1; // the segment whose copy the lookahead queued, this step
    let aheadStart = 0;
    let aheadReady = 0;
    for (let m = 0; m < count; m++) {
      let ready = 0;
      let copyStart = -1;
      if (aheadOf === m) {
        copyStart = aheadStart;
        ready = aheadReady;
        aheadOf = -1;
      } else if (streamed[m] || cold) {
        // Serial execution copies only after everything before it has computed.
        let start = slots === 0 ? Math.max(copyFree, computeFree) : copyFree;
        if (streamed[m] && slots > 0) start = Math.max(start, slotFree[g % slots]);
        copyStart = start;
        ready = start + (cold ? firstCopy[m] : copy[m]);
        copyFree = ready;
      }
      const computeStart = Math.max(computeFree, ready);
      if (lookahead) {
        // Queued just before this compute: the next segment of the step that needs a copy.
        for (let n = m + 1; n < count; n++) {
          if (!streamed[n] && !cold) continue;
          aheadOf = n;
          aheadStart = Math.max(copyFree, computeStart);
          aheadReady = aheadStart + (cold ? firstCopy[n] : copy[n]);
          copyFree = aheadReady;
          break;
        }
      }
      const stall = computeStart - computeFree;
      computeFree = computeStart + compute[m];
      if (streamed[m]) {
        if (slots > 0) slotFree[g % slots] = computeFree;
        g++;
      }
      if (detail) {
        detail[m] = {
          copy_start_s: copyStart >= 0 ? copyStart - stepStart : null,
          copy_end_s: copyStart >= 0 ? ready - stepStart : null,
          compute_start_s: computeStart - stepStart,
          compute_end_s: computeFree - stepStart,
          stall_s: stall,
        };
      }
    }
    stepEnds.push(computeFree);
    const n = stepEnds.length;
    if (n >= minSteps && n >= 4) {
      const d1 = stepEnds[n - 1] - stepEnds[n - 2];
      const d2 = stepEnds[n - 2] - stepEnds[n - 3];
      const d3 = stepEnds[n - 3] - stepEnds[n - 4];
      const tolerance = AGREE * Math.max(d1, Number.MIN_VALUE);
      if (Math.abs(d1 - d2) <= tolerance && Math.abs(d2 - d3) <= tolerance) {
        converged = true;
        break;
      }
    }
  }

  const n = stepEnds.length;
  let stepS: number;
  if (converged) {
    stepS = stepEnds[n - 1] - stepEnds[n - 2];
  } else {
    // Average the second half of the steady steps (step 0 is cold and excluded).
    const from = Math.max(1, Math.floor(n / 2));
    stepS = (stepEnds[n - 1] - stepEnds[from - 1]) / (n - from);
  }
  stepS = Math.max(stepS, computeWork, copyWork);
  return {
    step_s: stepS,
    first_step_s: stepEnds[0],
    compute_s: computeWork,
    copy_s: copyWork,
    stall_s: Math.max(0, stepS - computeWork),
    steps: n,
    converged,
    ...(detail ? { segments: detail } : {}),
  };
}

/**
 * A plan's predicted schedule: its merged segments priced by the cost model and simulated with
 * its slots (0 for sd.cpp plans and plans without `slots`).
 * @throws PlanError when the plan's base ranges do not fit the model.
 */
export function simulatePlan(
  plan: Pick<Plan, "segments" | "slots">,
  cost: CostModel,
  options: Omit<SimulationOptions, "slots"> = {},
): SimulationResult {
  const runs = priceRuns(
    cost,
    plan.segments.map((segment) => segment.base),
  );
  return simulateSchedule(
    runs.map((run, m) => ({
      copy_s: run.copy_s,
      first_copy_s: run.first_copy_s,
      compute_s: run.compute_s,
      resident: plan.segments[m].resident,
    })),
    { ...options, slots: plan.slots ?? 0 },
  );
}

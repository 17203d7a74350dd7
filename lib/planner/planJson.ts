import type { Plan } from "./types";

/** One merged segment in the plan JSON. */
export interface PlanJsonSegment {
  index: number;
  /** First and last base segment, inclusive. */
  base: [number, number];
  param_bytes: number;
  compute_buffer_bytes: number;
  resident: boolean;
}

/**
 * The plan as `ferry plan --json` prints it. This shape is compared field for field with an
 * independent implementation of the same policy, so it has exactly these keys, in this order.
 * The cost model's three keys follow `streamed_bytes_per_step` for plans that carry them (every
 * plan planJob makes, of either policy); a plan without them (e.g. one built by hand or received
 * from an older scheduler) prints the first six keys only.
 */
export interface PlanJson {
  policy: string;
  stream: boolean;
  /** Bytes: B (the user's limit, resolved), E (effective), P (planner). */
  budget: { B: number; E: number; P: number };
  segments: PlanJsonSegment[];
  resident_bytes: number;
  streamed_bytes_per_step: number;
  /** Predicted steady-state seconds per step (simulate.ts). */
  predicted_step_s?: number;
  /** Lower bound on seconds per step for the budget (lowerBound.ts). */
  lower_bound_s?: number;
  /** Staging slots; 0 = serial execution or nothing streamed. */
  slots?: number;
}

/** The plan's JSON form, keys built explicitly so order and set never depend on the Plan type. */
export function planToJson(plan: Plan): PlanJson {
  return {
    policy: plan.policy,
    stream: plan.stream,
    budget: { B: plan.budget.B, E: plan.budget.E, P: plan.budget.P },
    segments: plan.segments.map((segment) => ({
      index: segment.index,
      base: [segment.base[0], segment.base[1]],
      param_bytes: segment.param_bytes,
      compute_buffer_bytes: segment.compute_buffer_bytes,
      resident: segment.resident,
    })),
    resident_bytes: plan.resident_bytes,
    streamed_bytes_per_step: plan.streamed_bytes_per_step,
    ...(plan.predicted_step_s !== undefined ? { predicted_step_s: plan.predicted_step_s } : {}),
    ...(plan.lower_bound_s !== undefined ? { lower_bound_s: plan.lower_bound_s } : {}),
    ...(plan.predicted_step_s !== undefined || plan.lower_bound_s !== undefined
      ? { slots: plan.slots ?? 0 }
      : {}),
  };
}

/** `planToJson` as printed: two-space indentation and a final newline. */
export function formatPlanJson(plan: Plan): string {
  return `${JSON.stringify(planToJson(plan), null, 2)}\n`;
}

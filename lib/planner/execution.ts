/**
 * How an executor runs a plan, from the plan alone (one place, for the executor and the
 * simulator):
 * - "serial": sd.cpp before PR #1905 — per step, per segment: allocate, copy, compute, free.
 * - "lookahead": sd.cpp after PR #1905 (`sdcpp-prefetch`) — the same, with the next streamed
 *   segment's copy queued into its own fresh buffer while the current one computes, within a step.
 * - "pooled": Ferry (`slots` ≥ 1) — staging slots allocated once, copies running ahead across
 *   steps.
 */
import type { Plan } from "./types";

export type Execution = "serial" | "lookahead" | "pooled";

export function executionOf(plan: Pick<Plan, "slots"> & { policy: string }): Execution {
  if ((plan.slots ?? 0) > 0) return "pooled";
  return plan.policy === "sdcpp-prefetch" ? "lookahead" : "serial";
}

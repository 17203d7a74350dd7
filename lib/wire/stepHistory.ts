import type { StepStats } from "../../gen/ferry/v1/scheduler";
import { RESULT_FIRST_STEPS, RESULT_STEPS } from "./limits";

/**
 * Per-step statistics of a job, bounded: the first RESULT_FIRST_STEPS steps (the cold start)
 * and the most recent ones, RESULT_STEPS in all; the steps in between are only counted. A
 * million-step job's result and the memory behind it stay the size of a short job's.
 */
export class StepHistory {
  private readonly first: StepStats[] = [];
  private readonly last: StepStats[] = [];
  /** Steps dropped from the middle. */
  omitted = 0;

  push(step: StepStats): void {
    if (this.first.length < RESULT_FIRST_STEPS) {
      this.first.push(step);
      return;
    }
    this.last.push(step);
    if (this.last.length > RESULT_STEPS - RESULT_FIRST_STEPS) {
      this.last.shift();
      this.omitted++;
    }
  }

  steps(): StepStats[] {
    return [...this.first, ...this.last];
  }
}

/** A result's steps within the bound, and how many were left out (for results from elsewhere). */
export function boundSteps(steps: readonly StepStats[]): { steps: StepStats[]; omitted: number } {
  if (steps.length <= RESULT_STEPS) return { steps: [...steps], omitted: 0 };
  const tail = RESULT_STEPS - RESULT_FIRST_STEPS;
  return {
    steps: [...steps.slice(0, RESULT_FIRST_STEPS), ...steps.slice(steps.length - tail)],
    omitted: steps.length - RESULT_STEPS,
  };
}

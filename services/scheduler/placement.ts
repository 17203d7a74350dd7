/**
 * Where a job runs. Pure: the scheduler prices each executor that can take the job and this
 * chooses.
 *
 * 1. An idle executor where the model is warm (opened, its weights in the host params cache)
 *    wins: it starts at once and skips the cold read. Among several, the fastest predicted run.
 * 2. Otherwise the earliest predicted finish: time until the executor is free (its running job's
 *    predicted remainder plus the jobs already waiting for it) + reading the weights if the model
 *    is cold there + the job's predicted run (steps × the cost model's step time for the plan it
 *    would get on that executor, with that executor's calibrated rates).
 *    A job whose best executor is busy waits for it rather than starting slower elsewhere.
 * Predictions carry error (rates calibrated on a busy host drift by tens of percent), so an
 * idle executor whose predicted finish is within PREDICTION_SLACK of the best one is taken over
 * waiting for a busy one. Ties go to an idle executor, then a warm one, then the smaller id.
 */

/** An idle executor within this factor of the best predicted finish wins over a busy one. */
export const PREDICTION_SLACK = 1.25;

/** Disk rate assumed for a cold model's first read when pricing placement, GB/s. */
export const ASSUMED_DISK_GBPS = 2;

export interface PlacementCandidate {
  id: string;
  /** Free to start the job now. */
  idle: boolean;
  /** The model is open on it. */
  warm: boolean;
  /** Seconds until it is free (0 when idle). */
  availableInS: number;
  /** Predicted seconds of the job's run there. */
  runS: number;
  /** Predicted seconds of reading the weights when the model is cold there. */
  coldLoadS: number;
}

/** Predicted seconds from now until the job would finish on the candidate. */
export function predictedFinishS(candidate: PlacementCandidate): number {
  return candidate.availableInS + (candidate.warm ? 0 : candidate.coldLoadS) + candidate.runS;
}

/** The executor to run the job on, or undefined when there is no candidate. */
export function choosePlacement(
  candidates: readonly PlacementCandidate[],
): PlacementCandidate | undefined {
  const byId = (a: PlacementCandidate, b: PlacementCandidate) =>
    a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
  const idleWarm = candidates.filter((c) => c.idle && c.warm);
  if (idleWarm.length > 0) {
    return [...idleWarm].sort((a, b) => a.runS - b.runS || byId(a, b))[0];
  }
  const ranked = [...candidates].sort(
    (a, b) =>
      predictedFinishS(a) - predictedFinishS(b) ||
      Number(b.idle) - Number(a.idle) ||
      Number(b.warm) - Number(a.warm) ||
      byId(a, b),
  );
  const best = ranked[0];
  if (best === undefined || best.idle) return best;
  const idleClose = ranked.find(
    (c) => c.idle && predictedFinishS(c) <= PREDICTION_SLACK * predictedFinishS(best),
  );
  return idleClose ?? best;
}

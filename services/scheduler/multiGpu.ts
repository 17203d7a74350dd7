/**
 * Multi-GPU: whether a job runs on one executor or is split across several, and why. Pure: the
 * scheduler prices each option with the cost model and this chooses.
 *
 * A batch split gives each of k idle executors a contiguous share of the batch's samples; each
 * runs the whole model (streaming it under its own budget, over its own link) for its share, and
 * the scheduler concatenates the shares' outputs in sample order. The samples of a batch are
 * independent and the job's initial input is defined element by element, so the concatenation is
 * bit for bit the single-executor run's output (ggml's CPU kernels compute every row alike
 * whatever the batch; test/scheduler.multiGpu.test.ts checks it).
 *
 * What a split saves is compute: every share still streams every weight every step, so a job
 * whose step is bound by its transfers gains nothing from a split (k executors each copy the whole
 * model) while one bound by compute gains up to k. The cost model's step prediction (the two
 * engines simulated over the step, lib/planner/simulate.ts) carries both, so the split is priced
 * as the slowest share's predicted finish against the best single executor's predicted finish
 * (queue, cold read and run, as placement.ts prices it). Predictions err by tens of percent, so a
 * split is chosen only when it is predicted at least SPLIT_GAIN times faster: a split occupies k
 * executors that queued jobs could use.
 */

/** A split must be predicted at least this many times faster than one executor. */
export const SPLIT_GAIN = 1.25;

/** Executors one job is split across at most. */
export const MAX_SPLIT = 8;

export type MultiGpuMode = "auto" | "single" | "batch";
export const MULTI_GPU_MODES: readonly MultiGpuMode[] = ["auto", "single", "batch"];

/** Samples of each of k shares of a batch, larger ones first (they differ by at most one). */
export function shareSizes(batch: number, k: number): number[] {
  const base = Math.floor(batch / k);
  const extra = batch % k;
  return Array.from({ length: k }, (_, i) => base + (i < extra ? 1 : 0));
}

/** The share sizes any split of `batch` over up to `maxExecutors` executors may use. */
export function possibleShareSizes(batch: number, maxExecutors: number): number[] {
  const sizes = new Set<number>();
  for (let k = 2; k <= Math.min(batch, maxExecutors, MAX_SPLIT); k++) {
    for (const size of shareSizes(batch, k)) sizes.add(size);
  }
  return [...sizes].sort((a, b) => a - b);
}

/** What running `samples` of the job on one executor is predicted to take. */
export interface SharePrice<P> {
  plan: P;
  /** Predicted seconds of the run (steps × predicted step). */
  runS: number;
  /** Predicted seconds of reading the weights first (0 when the model is warm there). */
  coldLoadS: number;
}

/** An idle executor a share could run on. */
export interface SplitCandidate<P> {
  id: string;
  /** The share's price there, or undefined when that many samples do not fit its budget. */
  price(samples: number): SharePrice<P> | undefined;
}

export interface ChosenShare<P> {
  executorId: string;
  firstSample: number;
  samples: number;
  plan: P;
  /** Predicted seconds until the share finishes (cold read + run). */
  predictedS: number;
}

export interface MultiGpuDecision<P> {
  mode: "single" | "batch";
  /** The shares of the chosen batch split, in sample order (empty for "single"). */
  shares: ChosenShare<P>[];
  /** The best single executor's predicted finish, seconds (undefined when none can take it). */
  singleS: number | undefined;
  /** The best split's predicted finish (its slowest share), seconds; undefined when none. */
  splitS: number | undefined;
  /** One line per option considered, and the choice. */
  explanation: string[];
}

const seconds = (s: number) => (s >= 10 ? `${s.toFixed(1)} s` : `${s.toFixed(3)} s`);

/**
 * Chooses between the best single executor (already chosen by placement, `single`) and a batch
 * split across `idle` executors. `mode` "single" never splits, "batch" splits whenever two or more
 * idle executors can take a share (across as many as can), "auto" splits when the cost model predicts the split at least
 * SPLIT_GAIN times faster.
 */
export function chooseMultiGpu<P>(args: {
  mode: MultiGpuMode;
  batch: number;
  single: { id: string; finishS: number; idle: boolean } | undefined;
  idle: readonly SplitCandidate<P>[];
}): MultiGpuDecision<P> {
  const { mode, batch, single } = args;
  const explanation: string[] = [];
  if (single) {
    explanation.push(
      `one executor: ${single.id} ${single.idle ? "" : "(after its queue) "}finishes in ${seconds(single.finishS)}`,
    );
  } else {
    explanation.push("one executor: none can take the whole batch");
  }
  let best: { shares: ChosenShare<P>[]; finishS: number } | undefined;
  const singleOnly = (why: string): MultiGpuDecision<P> => ({
    mode: "single",
    shares: [],
    singleS: single?.finishS,
    splitS: best?.finishS,
    explanation: [...explanation, `chose one executor: ${why}`],
  });
  if (mode === "single") return singleOnly("the job asked for one (multi_gpu = single)");
  if (batch < 2) return singleOnly("a batch of 1 cannot be split");
  if (args.idle.length < 2) {
    return singleOnly(
      `a batch split needs two or more idle executors (${args.idle.length} idle now)`,
    );
  }
  const maxK = Math.min(batch, args.idle.length, MAX_SPLIT);
  for (let k = 2; k <= maxK; k++) {
    const sizes = shareSizes(batch, k);
    // The executors that finish the largest share soonest take the shares, largest first.
    const priced = args.idle
      .map((candidate) => ({ candidate, price: candidate.price(sizes[0]) }))
      .filter((p) => p.price !== undefined)
      .sort(
        (a, b) =>
          a.price!.runS + a.price!.coldLoadS - (b.price!.runS + b.price!.coldLoadS) ||
          (a.candidate.id < b.candidate.id ? -1 : 1),
      );
    if (priced.length < k) {
      explanation.push(
        `batch split over ${k}: only ${priced.length} idle executors can hold a share of ${sizes[0]} samples`,
      );
      continue;
    }
    const shares: ChosenShare<P>[] = [];
    let first = 0;
    let fits = true;
    for (const [i, samples] of sizes.entries()) {
      const candidate = priced[i].candidate;
      const price = samples === sizes[0] ? priced[i].price! : candidate.price(samples);
      if (!price) {
        fits = false;
        break;
      }
      shares.push({
        executorId: candidate.id,
        firstSample: first,
        samples,
        plan: price.plan,
        predictedS: price.coldLoadS + price.runS,
      });
      first += samples;
    }
    if (!fits) continue;
    const finishS = Math.max(...shares.map((share) => share.predictedS));
    explanation.push(
      `batch split over ${k} (${shares.map((s) => `${s.samples} on ${s.executorId}`).join(", ")}): the slowest share finishes in ${seconds(finishS)}`,
    );
    // Asked for a split, the job is split across every idle executor that can take a share;
    // else over as many as finish it soonest (fewer on a tie: they leave executors free).
    if (!best || finishS < best.finishS || mode === "batch") best = { shares, finishS };
  }
  explanation.push(
    "pipeline split (stages of the model on different executors): not available in this version",
  );
  if (!best) return singleOnly("no batch split fits the idle executors' budgets");
  const chooseSplit = (why: string): MultiGpuDecision<P> => ({
    mode: "batch",
    shares: best!.shares,
    singleS: single?.finishS,
    splitS: best!.finishS,
    explanation: [...explanation, `chose a batch split over ${best!.shares.length}: ${why}`],
  });
  if (!single) return chooseSplit("no single executor can take the whole batch");
  const gain = single.finishS / best.finishS;
  if (mode === "batch") {
    return chooseSplit(`the job asked for one (multi_gpu = batch); predicted ${gain.toFixed(2)}×`);
  }
  if (gain >= SPLIT_GAIN) {
    return chooseSplit(`predicted ${gain.toFixed(2)}× faster than one executor`);
  }
  return singleOnly(
    `the best split is predicted only ${gain.toFixed(2)}× faster (a split needs ${SPLIT_GAIN}×): every share streams the whole model every step, so a split saves compute, not transfers`,
  );
}

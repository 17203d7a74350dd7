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
 *
 * A pipeline split cuts the model instead: k idle executors each compute a contiguous range of
 * base segments (a stage) under their own budget, and every step the activations go from stage
 * to stage, executor to executor (services/executor/peer.ts), the last stage's latent back to the
 * first. The stages run one after another (step t+1 needs step t's latent), so a pipeline does
 * not add compute; what it saves is transfers: a model that must stream through one executor's
 * budget every step may fit, cut in k, in k budgets, and then nothing streams at all. It is
 * priced as the slowest stage's cold read plus, every step, every stage's predicted step and
 * every handoff. Each stage computes exactly the single run's graphs on the same bytes and is
 * handed exactly the activations the single run has at its boundary, so the output is bit for
 * bit the single run's (test/scheduler.pipeline.test.ts).
 */

/** A split must be predicted at least this many times faster than one executor. */
export const SPLIT_GAIN = 1.25;

/** Executors one job is split across at most. */
export const MAX_SPLIT = 8;

/** Stages one job is cut into at most. */
export const MAX_STAGES = 8;

/**
 * A handoff between executors as the cost model prices it: a fixed latency (a gRPC stream's
 * round of messages and the native run's wait) plus the bytes at a rate well below a network's or
 * loopback's (each chunk is copied into and out of a protobuf message).
 */
export const PEER_HANDOFF_LATENCY_S = 0.002;
export const PEER_HANDOFF_GBPS = 1;

/**
 * What a handoff costs, learnt from running pipelines (starting from PEER_HANDOFF_LATENCY_S).
 * Executors' clocks may differ, so a sample uses one clock and durations only: the last stage's
 * step t starts (its clock) one step period after its step t − 1 did, and that period is its own
 * step t − 1, every other stage's step t, and k handoffs. What the stages' reported durations do
 * not explain, divided by k, less the bytes at PEER_HANDOFF_GBPS, is one handoff's latency;
 * samples are smoothed (EWMA) and bounded to [0, 1 s].
 */
export class HandoffCalibration {
  private latency = PEER_HANDOFF_LATENCY_S;
  private readonly pipelines = new Map<
    string,
    { stepS: Map<number, Map<number, number>>; lastStartUs: Map<number, number> }
  >();

  /** Seconds of latency one handoff is priced at now. */
  get latencyS(): number {
    return this.latency;
  }

  /** One stage's step of a pipeline run (`run` names the run: the job and its attempt). */
  record(
    run: string,
    stages: number,
    stage: number,
    step: number,
    stepS: number,
    startUs: number,
    handoffBytes: number,
  ): void {
    let timing = this.pipelines.get(run);
    if (!timing) {
      // Runs that ended (or were abandoned) are dropped oldest first.
      if (this.pipelines.size >= 64) this.pipelines.delete(this.pipelines.keys().next().value!);
      timing = { stepS: new Map(), lastStartUs: new Map() };
      this.pipelines.set(run, timing);
    }
    const steps = timing.stepS.get(step) ?? new Map<number, number>();
    steps.set(stage, stepS);
    timing.stepS.set(step, steps);
    if (stage === stages - 1) timing.lastStartUs.set(step, startUs);
    // Step 1 reads and uploads weights; from step 3 on a period is the steady state.
    for (const t of [...timing.lastStartUs.keys()]) {
      const before = timing.lastStartUs.get(t - 1);
      const now = timing.stepS.get(t);
      const lastBefore = timing.stepS.get(t - 1)?.get(stages - 1);
      if (t < 3 || before === undefined || lastBefore === undefined || !now) continue;
      if (now.size < stages) continue;
      let explained = lastBefore;
      for (let s = 0; s < stages - 1; s++) explained += now.get(s)!;
      const periodS = (timing.lastStartUs.get(t)! - before) / 1e6;
      const sample = (periodS - explained) / stages - handoffBytes / (PEER_HANDOFF_GBPS * 1e9);
      this.latency = 0.8 * this.latency + 0.2 * Math.min(1, Math.max(0, sample));
      timing.lastStartUs.delete(t - 1);
      timing.stepS.delete(t - 1);
    }
    // Steps some stage's progress never came for (coalesced while a stream was full) are not
    // waited for: only the last few are kept.
    if (stage === stages - 1) {
      for (const map of [timing.stepS, timing.lastStartUs]) {
        for (const t of map.keys()) if (t < step - 3) map.delete(t);
      }
    }
  }

  /** A run that ended. */
  forget(run: string): void {
    this.pipelines.delete(run);
  }
}

/** Bytes one handoff carries, as the cost model estimates them from the job's base segments. */
export function handoffBytesOf(
  segments: readonly { output_bytes: number; prev_cut_bytes: number }[],
): number {
  // The activations between segments (the state one writes and the next reads) and the latent,
  // both ways of the ring alike.
  return 2 * Math.max(0, ...segments.map((s) => s.output_bytes + s.prev_cut_bytes));
}

export type MultiGpuMode = "auto" | "single" | "batch" | "pipeline";
export const MULTI_GPU_MODES: readonly MultiGpuMode[] = ["auto", "single", "batch", "pipeline"];

/** Samples of each of k shares of a batch, larger ones first (they differ by at most one). */
export function shareSizes(batch: number, k: number): number[] {
  const base = Math.floor(batch / k);
  const extra = batch % k;
  return Array.from({ length: k }, (_, i) => base + (i < extra ? 1 : 0));
}

/**
 * The share sizes any split of `batch` over up to `maxExecutors` executors may use, every share
 * at least `minShare` samples.
 */
export function possibleShareSizes(batch: number, maxExecutors: number, minShare = 1): number[] {
  const sizes = new Set<number>();
  for (let k = 2; k <= Math.min(Math.floor(batch / minShare), maxExecutors, MAX_SPLIT); k++) {
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
  /**
   * Predicted seconds until the share finishes (cold read + run); a pipeline stage's cold read
   * plus its own compute and copies over every step.
   */
  predictedS: number;
  /** The base segments it computes: the whole model for a batch share, its range for a stage. */
  firstBase: number;
  lastBase: number;
}

/** What running base segments first..last of the job on one executor is predicted to take. */
export interface StagePrice<P> {
  plan: P;
  /** Predicted seconds of one step of the stage (its computes and copies). */
  stepS: number;
  /** Predicted seconds of reading its weights first (0 when warm there). */
  coldLoadS: number;
}

/** An idle executor a pipeline stage could run on. */
export interface StageCandidate<P> {
  id: string;
  /** The stage's price there, or undefined when base segments first..last do not fit. */
  price(first: number, last: number): StagePrice<P> | undefined;
}

/** What a pipeline split of the job may use. */
export interface PipelineOptions<P> {
  /** Weight bytes of each base segment, in model order. */
  baseBytes: readonly number[];
  steps: number;
  /** Predicted seconds of one handoff between two stages (latency and bytes over the wire). */
  handoffS: number;
  /** Idle executors that can take handoffs (they have a peer address). */
  candidates: readonly StageCandidate<P>[];
  /** Why no pipeline can be considered for this job (undefined: it can). */
  unavailable?: string;
}

export interface MultiGpuDecision<P> {
  mode: "single" | "batch" | "pipeline";
  /**
   * The shares of the chosen batch split in sample order, or the stages of the chosen pipeline in
   * model order (empty for "single").
   */
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
 * Contiguous ranges [first, last] cutting `bytes` into `k` parts whose largest sum is as small as
 * it can be (each part at least one element).
 */
export function balancedRanges(bytes: readonly number[], k: number): [number, number][] {
  const n = bytes.length;
  if (k < 1 || k > n) return [];
  const prefix = [0];
  for (const b of bytes) prefix.push(prefix[prefix.length - 1] + b);
  const sum = (from: number, to: number) => prefix[to] - prefix[from]; // [from, to)
  // best[j][i]: the smallest largest part cutting the first i elements into j parts.
  const best = Array.from({ length: k + 1 }, () => new Array<number>(n + 1).fill(Infinity));
  const cut = Array.from({ length: k + 1 }, () => new Array<number>(n + 1).fill(0));
  best[0][0] = 0;
  for (let j = 1; j <= k; j++) {
    for (let i = j; i <= n; i++) {
      for (let c = j - 1; c < i; c++) {
        const worst = Math.max(best[j - 1][c], sum(c, i));
        if (worst < best[j][i]) {
          best[j][i] = worst;
          cut[j][i] = c;
        }
      }
    }
  }
  const ranges: [number, number][] = [];
  for (let j = k, i = n; j > 0; j--) {
    const c = cut[j][i];
    ranges.unshift([c, i - 1]);
    i = c;
  }
  return ranges;
}

/**
 * The best pipeline over the candidates: for each k, the model cut into k ranges of about equal
 * weight bytes, each given to the unused candidate that runs it soonest; the k with the soonest
 * predicted finish (fewer stages on a tie). Explanation lines are appended to `explanation`.
 */
export function bestPipeline<P>(
  options: PipelineOptions<P>,
  explanation: string[],
): { shares: ChosenShare<P>[]; finishS: number } | undefined {
  const { baseBytes, steps, handoffS, candidates } = options;
  let best: { shares: ChosenShare<P>[]; finishS: number } | undefined;
  const maxK = Math.min(candidates.length, baseBytes.length, MAX_STAGES);
  for (let k = 2; k <= maxK; k++) {
    const ranges = balancedRanges(baseBytes, k);
    const used = new Set<string>();
    const shares: ChosenShare<P>[] = [];
    let stepS = 0;
    let coldS = 0;
    let missing: [number, number] | undefined;
    for (const [first, last] of ranges) {
      let chosen: { candidate: StageCandidate<P>; price: StagePrice<P> } | undefined;
      for (const candidate of candidates) {
        if (used.has(candidate.id)) continue;
        const price = candidate.price(first, last);
        if (!price) continue;
        const soon = (p: StagePrice<P>) => p.coldLoadS + steps * p.stepS;
        if (!chosen || soon(price) < soon(chosen.price)) chosen = { candidate, price };
      }
      if (!chosen) {
        missing = [first, last];
        break;
      }
      used.add(chosen.candidate.id);
      stepS += chosen.price.stepS;
      coldS = Math.max(coldS, chosen.price.coldLoadS);
      shares.push({
        executorId: chosen.candidate.id,
        firstSample: 0,
        samples: 0,
        plan: chosen.price.plan,
        predictedS: chosen.price.coldLoadS + steps * chosen.price.stepS,
        firstBase: first,
        lastBase: last,
      });
    }
    if (missing) {
      explanation.push(
        `pipeline over ${k}: no idle executor left can hold base segments ${missing[0]}–${missing[1]}`,
      );
      continue;
    }
    // Every step goes through every stage and hands over k times (the last back to the first),
    // but the last step's latent stays where it is.
    const finishS = coldS + steps * stepS + Math.max(0, steps * k - 1) * handoffS;
    explanation.push(
      `pipeline over ${k} (${shares.map((s) => `${s.firstBase}–${s.lastBase} on ${s.executorId}`).join(", ")}): ${seconds(steps * stepS)} of stages and ${seconds(Math.max(0, steps * k - 1) * handoffS)} of handoffs, finishes in ${seconds(finishS)}`,
    );
    if (!best || finishS < best.finishS) best = { shares, finishS };
  }
  return best;
}

/**
 * Chooses between the best single executor (already chosen by placement, `single`), a batch
 * split across `idle` executors and a pipeline split over `pipeline.candidates`. `mode` "single"
 * never splits; "batch" splits the batch whenever two or more idle executors can take a share
 * (across as many as can); "pipeline" cuts the model whenever a pipeline fits the idle
 * executors; "auto" takes the option predicted to finish soonest, a split only when it is
 * predicted at least SPLIT_GAIN times faster than one executor.
 */
export function chooseMultiGpu<P>(args: {
  mode: MultiGpuMode;
  batch: number;
  single: { id: string; finishS: number; idle: boolean } | undefined;
  idle: readonly SplitCandidate<P>[];
  /** Base segments of the model (a batch share computes all of them). @default 1 */
  baseSegments?: number;
  /**
   * The fewest samples a share may have and still compute exactly as in the whole batch (FLUX.1's
   * per-sample vector MLPs take another ggml kernel for one row). @default 1
   */
  minShareSamples?: number;
  pipeline?: PipelineOptions<P>;
}): MultiGpuDecision<P> {
  const { mode, batch, single } = args;
  const explanation: string[] = [];
  if (single) {
    explanation.push(
      `one executor: ${single.id} ${single.idle ? "" : "(after its queue) "}finishes in ${seconds(single.finishS)}`,
    );
  } else {
    explanation.push("one executor: none can take the whole job");
  }
  let batchSplit: { shares: ChosenShare<P>[]; finishS: number } | undefined;
  let pipeline: { shares: ChosenShare<P>[]; finishS: number } | undefined;
  const singleOnly = (why: string): MultiGpuDecision<P> => ({
    mode: "single",
    shares: [],
    singleS: single?.finishS,
    splitS: [batchSplit?.finishS, pipeline?.finishS]
      .filter((s) => s !== undefined)
      .reduce<number | undefined>((a, b) => (a === undefined || b < a ? b : a), undefined),
    explanation: [...explanation, `chose one executor: ${why}`],
  });
  if (mode === "single") return singleOnly("the job asked for one (multi_gpu = single)");

  if (mode !== "pipeline") {
    const minShare = args.minShareSamples ?? 1;
    if (batch < 2) {
      explanation.push("batch split: a batch of 1 cannot be split");
    } else if (batch < 2 * minShare) {
      explanation.push(
        `batch split: this model's shares need ${minShare} samples or more each (a batch of ${batch} cannot be split)`,
      );
    } else if (args.idle.length < 2) {
      explanation.push(
        `batch split: needs two or more idle executors (${args.idle.length} idle now)`,
      );
    } else {
      batchSplit = bestBatchSplit(
        mode,
        batch,
        args.idle,
        args.baseSegments ?? 1,
        minShare,
        explanation,
      );
    }
  }
  if (mode !== "batch") {
    const options = args.pipeline;
    if (!options) {
      explanation.push("pipeline: not considered for this job");
    } else if (options.unavailable) {
      explanation.push(`pipeline: ${options.unavailable}`);
    } else if (options.candidates.length < 2) {
      explanation.push(
        `pipeline: needs two or more idle executors with a peer address (${options.candidates.length} now)`,
      );
    } else {
      pipeline = bestPipeline(options, explanation);
    }
  }

  const choose = (
    kind: "batch" | "pipeline",
    split: { shares: ChosenShare<P>[]; finishS: number },
    why: string,
  ): MultiGpuDecision<P> => ({
    mode: kind,
    shares: split.shares,
    singleS: single?.finishS,
    splitS: split.finishS,
    explanation: [
      ...explanation,
      `chose a ${kind === "batch" ? "batch split" : "pipeline"} over ${split.shares.length}: ${why}`,
    ],
  });
  if (mode === "batch") {
    if (!batchSplit) return singleOnly("no batch split fits the idle executors' budgets");
    const gain = single ? `; predicted ${(single.finishS / batchSplit.finishS).toFixed(2)}×` : "";
    return choose("batch", batchSplit, `the job asked for one (multi_gpu = batch)${gain}`);
  }
  if (mode === "pipeline") {
    if (!pipeline) return singleOnly("no pipeline fits the idle executors' budgets");
    const gain = single ? `; predicted ${(single.finishS / pipeline.finishS).toFixed(2)}×` : "";
    return choose("pipeline", pipeline, `the job asked for one (multi_gpu = pipeline)${gain}`);
  }
  const splits = [
    ...(batchSplit ? [{ kind: "batch" as const, split: batchSplit }] : []),
    ...(pipeline ? [{ kind: "pipeline" as const, split: pipeline }] : []),
  ].sort((a, b) => a.split.finishS - b.split.finishS);
  const fastest = splits[0];
  if (!fastest) return singleOnly("no split is possible for it now (see above)");
  if (!single) return choose(fastest.kind, fastest.split, "no single executor can take the job");
  const gain = single.finishS / fastest.split.finishS;
  if (gain >= SPLIT_GAIN) {
    return choose(
      fastest.kind,
      fastest.split,
      `predicted ${gain.toFixed(2)}× faster than one executor`,
    );
  }
  return singleOnly(
    `the fastest split (${fastest.kind === "batch" ? "batch" : "pipeline"}) is predicted only ${gain.toFixed(2)}× faster (a split needs ${SPLIT_GAIN}×)${
      fastest.kind === "batch"
        ? ": every share streams the whole model every step, so a batch split saves compute, not transfers"
        : ""
    }`,
  );
}

/** The best batch split over the idle executors (see chooseMultiGpu). */
function bestBatchSplit<P>(
  mode: MultiGpuMode,
  batch: number,
  idle: readonly SplitCandidate<P>[],
  baseSegments: number,
  minShare: number,
  explanation: string[],
): { shares: ChosenShare<P>[]; finishS: number } | undefined {
  let best: { shares: ChosenShare<P>[]; finishS: number } | undefined;
  const maxK = Math.min(Math.floor(batch / minShare), idle.length, MAX_SPLIT);
  for (let k = 2; k <= maxK; k++) {
    const sizes = shareSizes(batch, k);
    // The executors that finish the largest share soonest take the shares, largest first.
    const priced = idle
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
        firstBase: 0,
        lastBase: baseSegments - 1,
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
  if (!best) explanation.push("batch split: none fits the idle executors' budgets");
  return best;
}

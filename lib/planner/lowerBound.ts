/**
 * A true lower bound on the steady-state step time of ANY plan — either policy, any merge, any
 * resident set, serial or overlapped through any number of staging slots — for a model, a
 * device's rates and a budget. The bench reports how close each policy gets to it; a property
 * test checks that no simulated plan beats it.
 *
 * Notation: base segments i with parameters p_i, compute buffer b_i, external inputs e_i and
 * compute seconds c_i; P = Σp_i; δ the dispatch overhead; β the host→device bandwidth. `cap` is
 * the most device memory any plan may use: min(B, free), or free with `--max-vram 0`; sd.cpp's
 * E = min(B, free − 512 MiB) and Ferry's E = min(B, free − its margin) are both ≤ cap.
 * W = max_i (b_i + e_i): every merged segment's working set includes its members' largest compute
 * buffer and external inputs, so some segment's working set is at least W whatever the merge.
 *
 * Facts every plan obeys:
 * - Compute: the compute engine runs every base segment once per step, one merged segment after
 *   another, each paying δ once: a step takes at least Σc_i + m·δ for m merged segments. m ≥ 2
 *   when P + max_i b_i > cap: one merged segment would hold every parameter and a compute buffer
 *   at once, resident or streamed (sd.cpp checks each merged segment's params + buffer ≤ E too).
 * - Copies: in the steady state the copy engine moves every streamed byte once per step.
 *   Streamed bytes X = P − (resident bytes).
 * Plans fall in three classes; the bound is the smallest of the classes' bounds:
 * 1. Everything resident. Needs P + W ≤ cap; then a step takes ≥ Σc + δ, and this is the bound
 *    (the other classes cannot go below it), whether or not such a plan really exists.
 * 2. Serial streaming (sd.cpp's execution, Ferry's slots = 0): a step takes the sum
 *    Σc + m·δ + X/β. Let s be the largest base segment that streams (size p_i = s). While the
 *    merged segment holding it computes, the device holds everything resident plus its params
 *    (≥ s) and its compute buffer (≥ b_i); while the segment with the largest buffer computes,
 *    everything resident plus b_max. So resident ≤ cap − max(b_max, s + min{b_i : p_i = s}),
 *    X ≥ max(s, P − cap + max(b_max, s + min{b_i : p_i = s})), and X ≤ Σ_{p_i ≤ s} p_i. The
 *    class's bound is the minimum over the sizes s for which these agree. (External inputs are
 *    left out here: sd.cpp's per-segment check does not count them when nothing is resident.)
 * 3. Overlapped streaming through d ≥ 1 staging slots (Ferry): the arena holds resident +
 *    d·S + the working regions ≥ resident + d·s + W, where S, the slot size, is at least s = the
 *    largest base segment that streams. So X ≥ max(s, P − cap + d·s + W); and since only
 *    segments with p_i ≤ s stream, such a plan exists only if X ≤ Σ_{p_i ≤ s} p_i. A step takes
 *    ≥ max(Σc + m·δ, X/β), and also ≥ (X/β + C_X)/d: each streamed segment holds a slot from
 *    the start of its copy to the end of its compute, at least its copy time plus its compute
 *    time, and d slots give d slot-seconds per second (Little's law). C_X, the compute of the
 *    streamed segments, is at least the fractional cover of X bytes by the eligible segments
 *    with the least compute per byte. The class's bound is the minimum over every (s, d) that
 *    may exist; if none does, no overlapped plan fits and the class drops out.
 * 4. Without streaming (`--no-stream`, `--max-vram 0`) only class 1 exists: the bound is Σc + δ.
 * Outputs, carried activations and margins only add to what a plan needs, so leaving them out
 * keeps the bound valid (and a little loose). Each simulated plan is at least its engines' work
 * per step (simulate.ts), which is at least its class's terms.
 */
import type { DeviceProfile, ModelProfile } from "../model/profile";
import { resolveBudget } from "./budget";
import { buildCostModel, type CostModel, type CostModelOptions } from "./costModel";
import type { PlanOptions } from "./types";

/** One class of streaming plans' bound (see the module comment). */
export interface ClassBound {
  /** The fewest bytes a plan of the class streams per step. */
  min_streamed_bytes: number;
  /** Those bytes at β. */
  copy_s: number;
  /** The class's bound on the step time. */
  bound_s: number;
}

/** The overlapped class's bound, at the slot count that gives it. */
export interface OverlappedBound extends ClassBound {
  /** Staging slots at which the bound is reached. */
  slots: number;
  /** Σ (copy + compute) of the streamed segments / slots: the slots' occupancy per step. */
  occupancy_s: number;
}

/** The bound with its terms, for explanations. */
export interface LowerBound {
  /** The smallest bound over the plan classes that may exist. */
  lower_bound_s: number;
  /** Σ compute + the fewest dispatches any plan pays (the all-resident class's bound). */
  compute_s: number;
  /** Fewest merged segments (dispatches) a streaming plan runs. */
  min_dispatches: number;
  /** Most device memory any plan may use (min(B, free), or free with no split), bytes. */
  memory_cap_bytes: number;
  /** Whether no plan can keep every parameter resident. */
  streaming_necessary: boolean;
  /** Serial streaming plans (absent when streaming is not necessary). */
  serial?: ClassBound;
  /** Overlapped streaming plans (absent when not necessary or when none fits). */
  overlapped?: OverlappedBound;
  /** The fewest bytes any plan streams per step. */
  min_streamed_bytes: number;
  /** The copy term of the class that gives the bound (0 when everything may stay resident). */
  copy_s: number;
  /**
   * What binds: "compute" (everything may stay resident, or overlapped plans are compute-bound),
   * "copy" (overlapped plans are copy-bound), "slots" (overlapped plans are bound by how many
   * segments their slots hold at once), "serial" (only serial plans fit, or they are faster).
   */
  bound_by: "compute" | "copy" | "slots" | "serial";
}

/**
 * The most device memory any policy may plan into for these options: min(B, free), or all free
 * memory with `--max-vram 0`. Policies subtract their own margins from it.
 * @throws PlanError as resolveBudget does (a limit that leaves no memory).
 */
export function memoryCap(device: DeviceProfile, options: Pick<PlanOptions, "maxVramGiB">): number {
  return resolveBudget({
    freeBytes: device.free_bytes,
    maxVramGiB: options.maxVramGiB,
    stream: false,
  }).E;
}

/**
 * The lower bound for a priced model under a memory cap.
 * @param stream whether the plan may stream (false: nothing is copied per step).
 */
export function lowerBound(cost: CostModel, memoryCapBytes: number, stream: boolean): LowerBound {
  const segments = cost.segments;
  const P = cost.totalParamBytes;
  let maxBuffer = 0;
  let W = 0;
  for (const segment of segments) {
    const own = segment.compute_buffer_bytes + segment.external_bytes;
    maxBuffer = Math.max(maxBuffer, segment.compute_buffer_bytes);
    W = Math.max(W, own);
  }
  const cap = memoryCapBytes;
  const dispatch = cost.rates.dispatchS;
  const base = {
    memory_cap_bytes: cap,
    compute_s: cost.totalComputeS + dispatch,
    min_dispatches: 1,
  };
  if (!stream || segments.length === 0 || P + W <= cap) {
    // Class 1 may exist (or is the only one): nothing need be copied per step.
    return {
      ...base,
      lower_bound_s: base.compute_s,
      streaming_necessary: false,
      min_streamed_bytes: 0,
      copy_s: 0,
      bound_by: "compute",
    };
  }
  const minDispatches = P + maxBuffer > cap ? 2 : 1;
  const computeS = cost.totalComputeS + minDispatches * dispatch;

  // Distinct segment sizes, ascending, with Σ p_i over p_i ≤ size and the smallest compute
  // buffer among the segments of exactly that size.
  const sizes = [...new Set(segments.map((s) => s.param_bytes))].sort((a, b) => a - b);
  const byParams = segments.map((s) => s.param_bytes).sort((a, b) => a - b);
  const streamableUpTo = new Map<number, number>();
  let running = 0;
  let next = 0;
  for (const size of sizes) {
    while (next < byParams.length && byParams[next] <= size) running += byParams[next++];
    streamableUpTo.set(size, running);
  }
  const smallestBufferAt = new Map<number, number>();
  for (const segment of segments) {
    const known = smallestBufferAt.get(segment.param_bytes);
    if (known === undefined || segment.compute_buffer_bytes < known) {
      smallestBufferAt.set(segment.param_bytes, segment.compute_buffer_bytes);
    }
  }

  // Class 2: every largest-streamed-segment size s that could fit.
  let serial: ClassBound | undefined;
  for (const s of sizes) {
    const need = Math.max(maxBuffer, s + smallestBufferAt.get(s)!);
    const bytes = Math.max(s, P - cap + need);
    if (bytes > streamableUpTo.get(s)!) continue;
    const copy = cost.copySeconds(bytes);
    if (serial === undefined || computeS + copy < serial.bound_s) {
      serial = { min_streamed_bytes: bytes, copy_s: copy, bound_s: computeS + copy };
    }
  }

  // Class 3: every largest-streamed-segment size s and slot count d that could fit.
  let overlapped: OverlappedBound | undefined;
  // Cheapest compute per streamed byte first: the fractional cover of X bytes is a lower bound on
  // the compute of any set of segments that streams X bytes.
  const cheapest = segments
    .map((segment, i) => ({ p: segment.param_bytes, c: cost.baseComputeS[i], i }))
    .filter((x) => x.p > 0)
    .sort((a, b) => a.c / a.p - b.c / b.p || a.i - b.i);
  const minStreamedCompute = (bytes: number, largest: number) => {
    let covered = 0;
    let compute = 0;
    for (const { p, c } of cheapest) {
      if (p > largest) continue;
      const take = Math.min(p, bytes - covered);
      compute += (c * take) / p;
      covered += take;
      if (covered >= bytes) break;
    }
    return compute;
  };
  for (const s of sizes) {
    if (s === 0) continue; // streaming empty segments moves no bytes
    // Every (s' ≥ s, d ≥ 1) streams at least max(s, P − cap + s + W) bytes: once that alone
    // cannot beat the best bound so far, no larger s can.
    const floor = Math.max(computeS, cost.copySeconds(Math.max(s, P - cap + s + W)));
    if (overlapped !== undefined && floor >= overlapped.bound_s) break;
    const streamable = streamableUpTo.get(s)!;
    for (let slots = 1; ; slots++) {
      const bytes = Math.max(s, P - cap + slots * s + W);
      if (bytes > streamable) break; // more slots leave even less room
      const copy = cost.copySeconds(bytes);
      const occupancy = (copy + minStreamedCompute(bytes, s)) / slots;
      const bound = Math.max(computeS, copy, occupancy);
      if (overlapped === undefined || bound < overlapped.bound_s) {
        overlapped = {
          min_streamed_bytes: bytes,
          copy_s: copy,
          bound_s: bound,
          slots,
          occupancy_s: occupancy,
        };
      }
      // Past this, more slots only add streamed bytes.
      if (occupancy <= Math.max(computeS, copy)) break;
    }
  }

  if (serial === undefined && overlapped === undefined) {
    // No streaming plan fits at all (planning fails); report every byte streamed serially.
    const copy = cost.copySeconds(P);
    return {
      ...base,
      compute_s: computeS,
      min_dispatches: minDispatches,
      lower_bound_s: computeS + copy,
      streaming_necessary: true,
      min_streamed_bytes: P,
      copy_s: copy,
      bound_by: "serial",
    };
  }
  const useSerial =
    overlapped === undefined || (serial !== undefined && serial.bound_s < overlapped.bound_s);
  const best = useSerial ? serial! : overlapped!;
  let boundBy: LowerBound["bound_by"] = "serial";
  if (!useSerial) {
    const o = overlapped!;
    boundBy =
      o.bound_s === o.occupancy_s && o.occupancy_s > Math.max(computeS, o.copy_s)
        ? "slots"
        : o.copy_s > computeS
          ? "copy"
          : "compute";
  }
  return {
    ...base,
    compute_s: computeS,
    min_dispatches: minDispatches,
    lower_bound_s: best.bound_s,
    streaming_necessary: true,
    ...(serial ? { serial } : {}),
    ...(overlapped ? { overlapped } : {}),
    min_streamed_bytes: Math.min(
      serial?.min_streamed_bytes ?? Infinity,
      overlapped?.min_streamed_bytes ?? Infinity,
    ),
    copy_s: best.copy_s,
    bound_by: boundBy,
  };
}

/**
 * The lower bound for a model on a device under plan options (budget and streaming).
 * @throws PlanError when the budget leaves no memory or a rate is invalid.
 */
export function lowerBoundFor(
  model: ModelProfile,
  device: DeviceProfile,
  options: Pick<PlanOptions, "maxVramGiB" | "stream"> & { cost?: CostModelOptions },
): LowerBound {
  const cost = buildCostModel(model, device, options.cost);
  const noSplit = options.maxVramGiB === 0;
  return lowerBound(cost, memoryCap(device, options), options.stream && !noSplit);
}

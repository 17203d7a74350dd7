/**
 * The `ferry` policy: plans from a cost model (costModel.ts) instead of sd.cpp's constants. It
 * chooses segment boundaries, the resident set (any merged segments, not a prefix) and the number
 * of staging slots, and minimises the step time predicted by the two-engine simulation
 * (simulate.ts).
 *
 * Budget. E = min(B, free − {@link FERRY_MARGIN_BYTES}); with `--max-vram 0`, E = free − margin.
 * sd.cpp keeps 512 MiB of headroom for its per-segment allocations (a fresh device buffer per
 * segment per step, which fragments the allocator); a Ferry plan is one arena sized at plan time
 * (resident weights, staging slots, working buffers), so the margin only covers what lives outside
 * the arena after the executor probed free memory: cuBLAS workspaces (up to 32 MiB per handle on
 * Hopper), the copy stream's events, driver bookkeeping. As in sd.cpp the margin comes out of free memory, not out of
 * the user's `--max-vram`. The `sdcpp` policy keeps its own E = min(B, free − 512 MiB).
 *
 * Memory a plan needs ({@link ferryMemory}), which must be ≤ E:
 * - slots ≥ 1 (one arena allocated at plan time, no per-step allocation): Σresident params +
 *   slots · max(streamed merged params) (the staging slots) + max(compute buffer) (one compute
 *   region, reused by every segment) + max(prev_cut + output) (the carried activations: what
 *   crosses a cut, skip connections included, and the segment's output) + max(external) (inputs
 *   from outside the network, kept for the whole step). Each region is sized for its own worst
 *   segment, so the executor can lay the arena out once.
 * - slots = 0 (sd.cpp's execution: serial, one fresh buffer per segment; also any plan with
 *   nothing streamed): Σresident params + max over merged segments of (compute buffer + prev_cut
 *   + output + external + its params when streamed). Ferry falls back to it only where no slotted
 *   plan fits or nothing streams; the executor then runs segments one after another.
 *
 * Search (deterministic, no randomness; a few thousand simulations at most):
 * 1. Granularities: every base segment alone; when the dispatch overhead δ is worth saving,
 *    greedy merges of neighbours up to maxBase·2^k bytes (k = 0, 1, …) — merging amortises δ but
 *    enlarges staging slots and coarsens residency; also sd.cpp's own merged segments, and the
 *    whole model as one segment when it fits resident.
 * 2. For each granularity, slots d in 0..{@link FERRY_MAX_SLOTS} and slot size S among the
 *    largest distinct merged sizes (segments larger than S are forced resident, shrinking the
 *    slots): fill the memory left after the slots and working buffers with resident segments,
 *    largest first (streamed bytes are what the copy engine must move every step), and among
 *    equal sizes spread the resident ones evenly between the streamed ones, so that each copy
 *    has resident compute to hide behind.
 * 3. sd.cpp's own plan is a seed (its boundaries and resident prefix, serial and with slots), so
 *    the result is never predicted slower than the baseline.
 * 4. Local improvement on the best {@link REFINED_CANDIDATES}: take the streamed segment that
 *    stalls the compute engine longest and swap it with the resident segment (near it, or inside
 *    the longest run of resident compute) that shortens the predicted step most, while that helps;
 *    then first-improvement swaps of any stalled streamed segment with any resident one, nearest
 *    first, until none helps. A simulation budget (counted, not timed) bounds the work on very
 *    long models; a 1,000-segment model plans in a few milliseconds.
 * The plan with the smallest predicted steady-state step time wins; ties go to the earlier
 * candidate in the order above (finer granularity, fewer slots).
 */
import { bestUnit, formatBytes, formatGiBValue, MiB } from "../config/units";
import type { BaseSegment, DeviceProfile, ModelProfile } from "../model/profile";
import { resolveBudget, type BudgetInputs, type ResolvedBudget } from "./budget";
import { buildCostModel, type CostModel, type RunCost } from "./costModel";
import { lowerBound, memoryCap } from "./lowerBound";
import { planSdcpp } from "./sdcpp";
import { simulateArrays, type SimulationResult } from "./simulate";
import { PlanError, type Plan, type PlanOptions, type PlannedSegment } from "./types";

/** Device memory Ferry leaves outside its arena (see the module comment). */
export const FERRY_MARGIN_BYTES = 128 * MiB;
/** Most staging slots the search tries: beyond 4, slots cost residency and hide nothing more. */
export const FERRY_MAX_SLOTS = 4;
/** Slot sizes tried per granularity: the largest distinct merged sizes. */
const SLOT_SIZE_CANDIDATES = 3;
/** Candidates refined by local improvement. */
const REFINED_CANDIDATES = 3;
/** Swaps tried per local-improvement round. */
const SWAPS_PER_ROUND = 8;
/** A candidate must be faster by this fraction to replace another (keeps ties deterministic). */
const IMPROVEMENT = 1e-9;

/**
 * Ferry's B and E: B as sd.cpp resolves `--max-vram`; E = min(B, free − FERRY_MARGIN_BYTES), or
 * free − margin with no split. Streaming does not change E (sd.cpp's 512 MiB is for its
 * per-segment allocations, which Ferry does not make).
 * @throws PlanError when the limit leaves no memory.
 */
export function resolveFerryBudget(inputs: BudgetInputs): ResolvedBudget {
  const { B, mode } = resolveBudget({ ...inputs, stream: false });
  const deviceLimit = inputs.freeBytes - FERRY_MARGIN_BYTES;
  const E = mode === "no-split" ? deviceLimit : Math.min(B, deviceLimit);
  if (E <= 0) {
    const subject =
      inputs.maxVramGiB === undefined
        ? "the device"
        : `--max-vram ${formatGiBValue(inputs.maxVramGiB)}`;
    throw new PlanError(
      `${subject} leaves no memory: free ${formatBytes(inputs.freeBytes)} is not more than ` +
        `Ferry's ${formatBytes(FERRY_MARGIN_BYTES)} margin`,
    );
  }
  return { B, E, mode };
}

/** The figures {@link ferryMemory} reads of a merged segment. */
export interface MemoryFigures {
  param_bytes: number;
  compute_buffer_bytes: number;
  output_bytes: number;
  prev_cut_bytes: number;
  external_bytes: number;
  resident: boolean;
}

/** What a Ferry plan holds on the device, bytes. */
export interface FerryMemory {
  /** Staging slots in effect: 0 when nothing streams or the plan runs serially. */
  slots: number;
  resident_bytes: number;
  /** One staging slot: the largest streamed merged segment (0 without slots). */
  slot_bytes: number;
  /** slots · slot_bytes. */
  staging_bytes: number;
  /**
   * With slots: max compute buffer + max(prev_cut + output) + max external, each over all merged
   * segments. Serial: the largest per-segment need (compute buffer + prev_cut + output +
   * external, plus its params when streamed).
   */
  working_bytes: number;
  /** resident + staging + working: must be ≤ E. */
  total_bytes: number;
}

/** The device memory a plan with these segments and slots needs (see the module comment). */
export function ferryMemory(segments: readonly MemoryFigures[], slots: number): FerryMemory {
  let resident = 0;
  let slotBytes = 0;
  let anyStreamed = false;
  let maxBuffer = 0;
  let maxCarried = 0;
  let maxExternal = 0;
  let maxSerialNeed = 0;
  for (const segment of segments) {
    const own =
      segment.compute_buffer_bytes +
      segment.prev_cut_bytes +
      segment.output_bytes +
      segment.external_bytes;
    if (segment.resident) {
      resident += segment.param_bytes;
      maxSerialNeed = Math.max(maxSerialNeed, own);
    } else {
      anyStreamed = true;
      slotBytes = Math.max(slotBytes, segment.param_bytes);
      maxSerialNeed = Math.max(maxSerialNeed, own + segment.param_bytes);
    }
    maxBuffer = Math.max(maxBuffer, segment.compute_buffer_bytes);
    maxCarried = Math.max(maxCarried, segment.prev_cut_bytes + segment.output_bytes);
    maxExternal = Math.max(maxExternal, segment.external_bytes);
  }
  if (slots >= 1 && anyStreamed) {
    const staging = slots * slotBytes;
    const working = maxBuffer + maxCarried + maxExternal;
    return {
      slots,
      resident_bytes: resident,
      slot_bytes: slotBytes,
      staging_bytes: staging,
      working_bytes: working,
      total_bytes: resident + staging + working,
    };
  }
  return {
    slots: 0,
    resident_bytes: resident,
    slot_bytes: 0,
    staging_bytes: 0,
    working_bytes: maxSerialNeed,
    total_bytes: resident + maxSerialNeed,
  };
}

/** One granularity: merged runs with their costs in flat arrays for the simulator. */
interface Level {
  runs: RunCost[];
  params: Float64Array;
  copy: Float64Array;
  firstCopy: Float64Array;
  compute: Float64Array;
  /** compute buffer + prev_cut + output + external: a segment's own serial need. */
  own: Float64Array;
  /** max compute buffer + max(prev_cut + output) + max external: the slotted working regions. */
  slottedWorking: number;
  /** Runs grouped by equal parameter bytes, largest first; members in step order. */
  classes: Array<{ size: number; members: number[] }>;
  /** Slot sizes to try: the largest distinct run sizes. */
  slotSizes: number[];
}

/** A plan under consideration. */
interface Candidate {
  level: Level;
  slots: number;
  /** Slot size cap: streamed runs are at most this large. */
  slotSize: number;
  /** 1 = streamed. */
  streamed: Uint8Array;
  step_s: number;
}

function levelOf(runs: RunCost[]): Level {
  const count = runs.length;
  const level: Level = {
    runs,
    params: new Float64Array(count),
    copy: new Float64Array(count),
    firstCopy: new Float64Array(count),
    compute: new Float64Array(count),
    own: new Float64Array(count),
    slottedWorking: 0,
    classes: [],
    slotSizes: [],
  };
  let maxBuffer = 0;
  let maxCarried = 0;
  let maxExternal = 0;
  const bySize = new Map<number, number[]>();
  runs.forEach((run, m) => {
    level.params[m] = run.param_bytes;
    level.copy[m] = run.copy_s;
    level.firstCopy[m] = run.first_copy_s;
    level.compute[m] = run.compute_s;
    level.own[m] =
      run.compute_buffer_bytes + run.prev_cut_bytes + run.output_bytes + run.external_bytes;
    maxBuffer = Math.max(maxBuffer, run.compute_buffer_bytes);
    maxCarried = Math.max(maxCarried, run.prev_cut_bytes + run.output_bytes);
    maxExternal = Math.max(maxExternal, run.external_bytes);
    const members = bySize.get(run.param_bytes);
    if (members) members.push(m);
    else bySize.set(run.param_bytes, [m]);
  });
  level.slottedWorking = maxBuffer + maxCarried + maxExternal;
  level.classes = [...bySize.entries()]
    .map(([size, members]) => ({ size, members }))
    .sort((a, b) => b.size - a.size);
  level.slotSizes = level.classes
    .filter((c) => c.size > 0)
    .slice(0, SLOT_SIZE_CANDIDATES)
    .map((c) => c.size);
  return level;
}

/** Greedy left-to-right merge of neighbours while a run's parameters stay ≤ `target`. */
function mergeUpTo(cost: CostModel, target: number): RunCost[] {
  const segments = cost.segments;
  const runs: RunCost[] = [];
  let first = 0;
  let bytes = segments[0].param_bytes;
  for (let i = 1; i < segments.length; i++) {
    if (bytes + segments[i].param_bytes <= target) {
      bytes += segments[i].param_bytes;
    } else {
      runs.push(cost.run(first, i - 1));
      first = i;
      bytes = segments[i].param_bytes;
    }
  }
  runs.push(cost.run(first, segments.length - 1));
  return runs;
}

/** Exact memory of a candidate mask, via the same rules as {@link ferryMemory}. */
function memoryOf(level: Level, streamed: Uint8Array, slots: number): number {
  let resident = 0;
  let slotBytes = 0;
  let anyStreamed = false;
  let serialNeed = 0;
  for (let m = 0; m < streamed.length; m++) {
    if (streamed[m]) {
      anyStreamed = true;
      slotBytes = Math.max(slotBytes, level.params[m]);
      serialNeed = Math.max(serialNeed, level.own[m] + level.params[m]);
    } else {
      resident += level.params[m];
      serialNeed = Math.max(serialNeed, level.own[m]);
    }
  }
  if (slots >= 1 && anyStreamed) return resident + slots * slotBytes + level.slottedWorking;
  return resident + serialNeed;
}

function effectiveSlots(streamed: Uint8Array, slots: number): number {
  return streamed.includes(1) ? slots : 0;
}

/** `k` of `members`, spread evenly: the (i + ½)·n/k-th for i < k. */
function spread(members: readonly number[], k: number): number[] {
  const n = members.length;
  if (k >= n) return [...members];
  const picked: number[] = [];
  for (let i = 0; i < k; i++) picked.push(members[Math.floor(((i + 0.5) * n) / k)]);
  return picked;
}

/**
 * The resident set for a granularity, slots and slot size: runs over the slot size are resident;
 * the memory left is filled largest class first, spreading residents within each class.
 * Returns the streamed mask, or undefined when the forced residents do not fit.
 */
function selectResidents(
  level: Level,
  slots: number,
  slotSize: number,
  E: number,
): Uint8Array | undefined {
  const count = level.runs.length;
  const streamed = new Uint8Array(count);
  let capacity: number;
  if (slots >= 1) {
    capacity = E - slots * slotSize - level.slottedWorking;
  } else {
    // Serial: the largest need, counting every run that may stream as streamed (conservative).
    let need = 0;
    for (let m = 0; m < count; m++) {
      need = Math.max(need, level.own[m] + (level.params[m] <= slotSize ? level.params[m] : 0));
    }
    capacity = E - need;
  }
  let left = capacity;
  for (let m = 0; m < count; m++) {
    if (level.params[m] > slotSize) left -= level.params[m];
    else streamed[m] = 1;
  }
  if (left < 0) return undefined;
  for (const { size, members } of level.classes) {
    if (size > slotSize) continue;
    const k = size === 0 ? members.length : Math.min(members.length, Math.floor(left / size));
    if (k === 0) continue;
    for (const m of spread(members, k)) streamed[m] = 0;
    left -= k * size;
  }
  return memoryOf(level, streamed, slots) <= E ? streamed : undefined;
}

function simulate(level: Level, streamed: Uint8Array, slots: number, detail = false) {
  return simulateArrays(
    {
      copy: level.copy,
      firstCopy: level.firstCopy,
      compute: level.compute,
      streamed,
    },
    { slots: effectiveSlots(streamed, slots), detail },
  );
}

/** The search's mutable state: the best candidates so far and the simulation budget. */
class Search {
  candidates: Candidate[] = [];
  simulations = 0;

  constructor(
    readonly E: number,
    readonly simulationBudget: number,
  ) {}

  consider(level: Level, slots: number, slotSize: number, streamed: Uint8Array): void {
    if (memoryOf(level, streamed, slots) > this.E) return;
    this.simulations++;
    const step = simulate(level, streamed, slots).step_s;
    this.candidates.push({ level, slots, slotSize, streamed, step_s: step });
  }

  /**
   * Distinct candidates (granularity, slots in effect, resident set), fastest first; equal times
   * keep the order they were considered in.
   */
  ranked(): Candidate[] {
    const levels = new Map<Level, number>();
    const seen = new Set<string>();
    return this.candidates
      .map((candidate, order) => ({ candidate, order }))
      .sort((a, b) => a.candidate.step_s - b.candidate.step_s || a.order - b.order)
      .map(({ candidate }) => candidate)
      .filter((candidate) => {
        if (!levels.has(candidate.level)) levels.set(candidate.level, levels.size);
        const slots = effectiveSlots(candidate.streamed, candidate.slots);
        const key = `${levels.get(candidate.level)}:${slots}:${candidate.streamed.join("")}`;
        if (seen.has(key)) return false;
        seen.add(key);
        return true;
      });
  }

  /** Local improvement by swaps (step 4 of the module comment). */
  refine(start: Candidate): Candidate {
    const { level, slots, slotSize } = start;
    const count = level.runs.length;
    const streamed = Uint8Array.from(start.streamed);
    let best = start.step_s;
    while (this.simulations < this.simulationBudget) {
      const result: SimulationResult = simulate(level, streamed, slots, true);
      this.simulations++;
      const floor = Math.max(result.compute_s, result.copy_s);
      if (result.step_s <= floor * (1 + IMPROVEMENT)) break;
      const timings = result.segments!;
      let worst = -1;
      for (let m = 0; m < count; m++) {
        if (streamed[m] && (worst < 0 || timings[m].stall_s > timings[worst].stall_s)) worst = m;
      }
      if (worst < 0 || timings[worst].stall_s <= 0) break;

      const swaps = this.swapCandidates(level, streamed, worst, slots, slotSize);
      let bestSwap = -1;
      let bestStep = best;
      for (const r of swaps) {
        if (this.simulations >= this.simulationBudget) break;
        streamed[worst] = 0;
        streamed[r] = 1;
        this.simulations++;
        const step = simulate(level, streamed, slots).step_s;
        streamed[worst] = 1;
        streamed[r] = 0;
        if (step < bestStep * (1 - IMPROVEMENT)) {
          bestStep = step;
          bestSwap = r;
        }
      }
      if (bestSwap < 0) break;
      streamed[worst] = 0;
      streamed[bestSwap] = 1;
      best = bestStep;
    }
    best = this.hillClimb(level, slots, slotSize, streamed, best);
    return { level, slots, slotSize, streamed, step_s: best };
  }

  /**
   * Exhaustive first-improvement swaps: streamed segments in order of their stall, each against
   * the residents nearest to it; take the first swap that shortens the predicted step, and start
   * over, until a full pass finds none or the simulation budget is spent. Catches what the
   * targeted swaps miss, e.g. gathering residents at the step boundary so the next step's first
   * copies hide behind them.
   */
  private hillClimb(
    level: Level,
    slots: number,
    slotSize: number,
    streamed: Uint8Array,
    start: number,
  ): number {
    const count = streamed.length;
    let best = start;
    let improved = true;
    while (improved && this.simulations < this.simulationBudget) {
      improved = false;
      const result = simulate(level, streamed, slots, true);
      this.simulations++;
      if (result.step_s <= Math.max(result.compute_s, result.copy_s) * (1 + IMPROVEMENT)) break;
      const timings = result.segments!;
      const stalled: number[] = [];
      const residents: number[] = [];
      for (let m = 0; m < count; m++) {
        if (streamed[m]) stalled.push(m);
        else if (level.params[m] <= slotSize) residents.push(m);
      }
      stalled.sort((a, b) => timings[b].stall_s - timings[a].stall_s || a - b);
      search: for (const s of stalled) {
        const distance = (r: number) => {
          const d = Math.abs(r - s);
          return Math.min(d, count - d);
        };
        const nearest = [...residents].sort((a, b) => distance(a) - distance(b) || a - b);
        for (const r of nearest) {
          if (this.simulations >= this.simulationBudget) break search;
          streamed[s] = 0;
          streamed[r] = 1;
          if (memoryOf(level, streamed, slots) <= this.E) {
            this.simulations++;
            const step = simulate(level, streamed, slots).step_s;
            if (step < best * (1 - IMPROVEMENT)) {
              best = step;
              improved = true;
              break search;
            }
          }
          streamed[s] = 1;
          streamed[r] = 0;
        }
      }
    }
    return best;
  }

  /**
   * Residents that could take the stalling segment's place within memory: the nearest ones (in
   * cyclic step order) and those inside the longest runs of resident compute, where a copy hides
   * most easily.
   */
  private swapCandidates(
    level: Level,
    streamed: Uint8Array,
    worst: number,
    slots: number,
    slotSize: number,
  ): number[] {
    const count = streamed.length;
    const eligible: number[] = [];
    for (let r = 0; r < count; r++) {
      if (streamed[r] || level.params[r] > slotSize) continue;
      streamed[worst] = 0;
      streamed[r] = 1;
      const fits = memoryOf(level, streamed, slots) <= this.E;
      streamed[worst] = 1;
      streamed[r] = 0;
      if (fits) eligible.push(r);
    }
    if (eligible.length <= SWAPS_PER_ROUND) return eligible;

    const distance = (r: number) => {
      const d = Math.abs(r - worst);
      return Math.min(d, count - d);
    };
    // Compute of the run of consecutive residents containing each resident (cyclic).
    const runCompute = new Float64Array(count);
    for (let start = 0; start < count; start++) {
      if (streamed[start] || (start > 0 && !streamed[start - 1])) continue;
      let sum = 0;
      let end = start;
      while (end < count && !streamed[end]) sum += level.compute[end++];
      for (let m = start; m < end; m++) runCompute[m] = sum;
    }
    const half = SWAPS_PER_ROUND / 2;
    const nearest = [...eligible].sort((a, b) => distance(a) - distance(b) || a - b);
    const roomiest = [...eligible].sort((a, b) => runCompute[b] - runCompute[a] || a - b);
    const picked = new Set<number>(nearest.slice(0, half));
    for (const r of roomiest) {
      if (picked.size >= SWAPS_PER_ROUND) break;
      picked.add(r);
    }
    return [...picked];
  }
}

/** A base segment's own need: what it takes alone, streamed or resident. */
function baseNeed(segment: BaseSegment): number {
  return (
    segment.param_bytes +
    segment.compute_buffer_bytes +
    segment.prev_cut_bytes +
    segment.output_bytes +
    segment.external_bytes
  );
}

function describeNeed(segment: BaseSegment, E: number): string {
  const need = baseNeed(segment);
  const unit = bestUnit(Math.max(need, E));
  const b = (bytes: number) => formatBytes(bytes, { unit });
  return (
    `segment ${segment.name} needs ${b(need)} (params ${b(segment.param_bytes)} + compute ` +
    `${b(segment.compute_buffer_bytes)} + activations in ${b(segment.prev_cut_bytes)} + out ` +
    `${b(segment.output_bytes)} + external ${b(segment.external_bytes)}) but Ferry's effective ` +
    `budget E is ${b(E)}`
  );
}

function toPlannedSegments(level: Level, streamed: Uint8Array): PlannedSegment[] {
  return level.runs.map((run, index) => ({
    index,
    base: [run.first, run.last],
    param_bytes: run.param_bytes,
    compute_buffer_bytes: run.compute_buffer_bytes,
    output_bytes: run.output_bytes,
    prev_cut_bytes: run.prev_cut_bytes,
    external_bytes: run.external_bytes,
    resident: streamed[index] === 0,
  }));
}

/** Granularities in the order the search prefers them on ties (step 1 of the module comment). */
function granularities(cost: CostModel, stream: boolean, lowerBoundS: number): RunCost[][] {
  const segments = cost.segments;
  const count = segments.length;
  const unmerged = segments.map((_, i) => cost.run(i, i));
  const whole = cost.run(0, count - 1);
  // Without streaming everything is resident: the fewest dispatches win, so try whole first.
  const levels: RunCost[][] = stream ? [unmerged] : [[whole], unmerged];
  const delta = cost.rates.dispatchS;
  if (delta > 0 && count > 2) {
    const maxBase = segments.reduce((max, s) => Math.max(max, s.param_bytes), 0);
    let previousCount = count;
    for (let target = Math.max(maxBase, 1); previousCount > 2; target *= 2) {
      const runs = mergeUpTo(cost, target);
      if (runs.length < previousCount) {
        // Worth trying only if the dispatches it saves are a visible part of the step.
        if ((count - runs.length) * delta >= 1e-3 * lowerBoundS) levels.push(runs);
        previousCount = runs.length;
      }
      if (target >= cost.totalParamBytes) break;
    }
  }
  if (stream && count > 1) levels.push([whole]);
  return levels;
}

/** Options of {@link planFerry} beyond the plan options. */
export interface FerrySearchOptions {
  /**
   * Most simulations the search may run; bounds planning time on very long models. Counted, not
   * timed, so plans stay deterministic.
   * @default max(200, min(4000, 300000 / base segments))
   */
  simulationBudget?: number;
}

/**
 * Plans a model on a device with the `ferry` policy. Inputs are assumed validated (planJob does
 * it).
 * @throws PlanError when there are no base segments, the budget leaves no memory, a base segment
 *   alone needs more than E, or (without streaming / with no split) the model does not fit.
 */
export function planFerry(
  model: ModelProfile,
  device: DeviceProfile,
  options: PlanOptions,
  search: FerrySearchOptions = {},
): Plan {
  const segments = model.segments;
  if (segments.length === 0) throw new PlanError(`model ${model.name} has no base segments`);
  const { stream } = options;
  const budget = resolveFerryBudget({
    freeBytes: device.free_bytes,
    maxVramGiB: options.maxVramGiB,
    stream,
  });
  const { B, E, mode } = budget;
  const cost = buildCostModel(model, device, options.cost);
  const noSplit = mode === "no-split";
  const bound = lowerBound(cost, memoryCap(device, options), stream && !noSplit);
  const names = segments.map((segment) => segment.name);

  const budgetLimit =
    search.simulationBudget ?? Math.max(200, Math.min(4000, 300_000 / segments.length));
  const state = new Search(E, budgetLimit);

  if (noSplit || !stream) {
    // Everything resident: only the boundaries matter (dispatch overhead and working set).
    const levels = noSplit
      ? [[cost.run(0, segments.length - 1)]]
      : granularities(cost, false, bound.lower_bound_s);
    for (const runs of levels) {
      const level = levelOf(runs);
      state.consider(level, 0, 0, new Uint8Array(runs.length));
    }
    const best = state.ranked()[0];
    if (best === undefined) {
      const whole = levelOf([cost.run(0, segments.length - 1)]);
      const need = memoryOf(whole, new Uint8Array(1), 0);
      const unit = bestUnit(Math.max(need, E));
      const why = noSplit ? "without splitting (--max-vram 0)" : "without streaming";
      // Raising --max-vram only helps while it, not the device, is what limits E.
      const hint = noSplit
        ? ""
        : E < device.free_bytes - FERRY_MARGIN_BYTES
          ? "; enable streaming or raise --max-vram"
          : "; enable streaming";
      throw new PlanError(
        `model ${model.name} does not fit ${why}: params and working set ` +
          `${formatBytes(need, { unit })} are more than Ferry's effective budget E ` +
          `${formatBytes(E, { unit })}${hint}`,
      );
    }
    return finish(best);
  }

  const over = segments.filter((segment) => baseNeed(segment) > E);
  if (over.length > 0) {
    const worst = over.reduce((a, b) => (baseNeed(b) > baseNeed(a) ? b : a));
    const others = over.length > 1 ? ` (${over.length - 1} other segment(s) are over E too)` : "";
    throw new PlanError(`${describeNeed(worst, E)}${others}`);
  }

  for (const runs of granularities(cost, true, bound.lower_bound_s)) {
    const level = levelOf(runs);
    const allResident = new Uint8Array(runs.length);
    if (memoryOf(level, allResident, 0) <= E) {
      // Everything fits resident: streaming can only add copies.
      state.consider(level, 0, 0, allResident);
      continue;
    }
    for (let slots = 0; slots <= FERRY_MAX_SLOTS; slots++) {
      for (const slotSize of level.slotSizes) {
        const streamed = selectResidents(level, slots, slotSize, E);
        if (streamed) state.consider(level, slots, slotSize, streamed);
      }
    }
  }
  seedWithSdcpp(model, device, options, cost, state);

  // Refine the best few, then take the fastest.
  const ranked = state.ranked().slice(0, REFINED_CANDIDATES);
  if (ranked.length === 0) {
    // Unreachable: with every base segment under E, streaming all of them serially fits.
    throw new PlanError(`model ${model.name}: no plan fits Ferry's effective budget E`);
  }
  let best = ranked[0];
  for (const candidate of ranked) {
    const refined = state.refine(candidate);
    if (refined.step_s < best.step_s * (1 - IMPROVEMENT)) best = refined;
  }
  return finish(best);

  function finish(best: Candidate): Plan {
    const planned = toPlannedSegments(best.level, best.streamed);
    const slots = effectiveSlots(best.streamed, best.slots);
    const simulated = simulate(best.level, best.streamed, slots);
    const resident = planned.filter((s) => s.resident).reduce((sum, s) => sum + s.param_bytes, 0);
    const streamedBytes = planned
      .filter((s) => !s.resident)
      .reduce((sum, s) => sum + s.param_bytes, 0);
    return {
      policy: "ferry",
      stream,
      // Ferry has no separate planner budget: the cost model sizes the segments, so P = E.
      budget: { B, E, P: E },
      segments: planned,
      resident_bytes: resident,
      streamed_bytes_per_step: streamedBytes,
      base_segment_names: names,
      slots,
      predicted_step_s: simulated.step_s,
      lower_bound_s: bound.lower_bound_s,
    };
  }
}

/** Step 3 of the module comment: sd.cpp's boundaries and resident set as candidates. */
function seedWithSdcpp(
  model: ModelProfile,
  device: DeviceProfile,
  options: PlanOptions,
  cost: CostModel,
  state: Search,
): void {
  let baseline: Plan;
  try {
    baseline = planSdcpp(model, device, { ...options, policy: "sdcpp" });
  } catch (error) {
    if (error instanceof PlanError) return; // sd.cpp has no plan here; nothing to seed
    throw error;
  }
  const level = levelOf(baseline.segments.map((s) => cost.run(s.base[0], s.base[1])));
  const streamed = Uint8Array.from(baseline.segments, (s) => (s.resident ? 0 : 1));
  let slotSize = 0;
  streamed.forEach((flag, m) => {
    if (flag) slotSize = Math.max(slotSize, level.params[m]);
  });
  for (let slots = 0; slots <= FERRY_MAX_SLOTS; slots++) {
    state.consider(level, slots, slotSize, streamed);
  }
}

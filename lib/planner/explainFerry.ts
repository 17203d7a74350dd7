/**
 * `ferry plan --explain`: where a plan's predicted step time comes from. Per merged segment its
 * bytes, whether it is resident or streamed, its predicted copy and compute time and how long the
 * compute engine stalls waiting for it; then the totals, the predicted step time, the lower bound
 * for the budget, and what the other policy would do on the same input, priced on the same
 * simulator. Works for plans of either policy.
 */
import { formatBytes } from "../config/units";
import type { DeviceProfile, ModelProfile } from "../model/profile";
import { buildCostModel, type DeviceRates } from "./costModel";
import { ferryMemory, type FerryMemory } from "./ferryPolicy";
import { lowerBound, memoryCap, type LowerBound } from "./lowerBound";
import { planJob } from "./planJob";
import { simulatePlan } from "./simulate";
import { PlanError, type Plan, type PlanOptions, type PolicyName } from "./types";

/** One merged segment's costs in the steady state. */
export interface CostRow {
  index: number;
  base: [number, number];
  /** Base segment names, "blocks.3" or "blocks.3 .. blocks.5". */
  names: string;
  param_bytes: number;
  resident: boolean;
  /** Copy seconds per step (0 when resident). */
  copy_s: number;
  /** Compute seconds, dispatch overhead included. */
  compute_s: number;
  /** How long the compute engine waits for this segment's copy. */
  stall_s: number;
}

/** What the other policy does on the same input. */
export type AlternativePlan =
  | {
      policy: PolicyName;
      predicted_step_s: number;
      slots: number;
      segments: number;
      resident_bytes: number;
      streamed_bytes_per_step: number;
    }
  | { policy: PolicyName; error: string };

export interface CostExplanation {
  policy: PolicyName;
  slots: number;
  rates: DeviceRates;
  rows: CostRow[];
  resident_bytes: number;
  streamed_bytes_per_step: number;
  /** Σ compute per step. */
  compute_s: number;
  /** Σ copy per step (streamed segments). */
  copy_s: number;
  /** predicted − compute: time per step the compute engine waits for copies. */
  stall_s: number;
  predicted_step_s: number;
  /** The cold first step: lazy loads and the one upload of the resident set. */
  first_step_s: number;
  lower_bound: LowerBound;
  /** Ferry's memory accounting, for `ferry` plans. */
  memory?: FerryMemory & { E: number };
  /** The other policy's plan on the same input, when asked for. */
  alternative?: AlternativePlan;
}

/** Options of {@link explainCosts}. */
export interface ExplainCostsOptions {
  /** Plan the other policy on the same input for comparison. @default true */
  compare?: boolean;
}

/**
 * Prices a plan for its model and device and explains the prediction.
 * @param options the options the plan was made with (budget, streaming, cost inputs).
 * @throws PlanError when the plan does not fit the model (base ranges out of range).
 */
export function explainCosts(
  plan: Plan,
  model: ModelProfile,
  device: DeviceProfile,
  options: PlanOptions,
  explain: ExplainCostsOptions = {},
): CostExplanation {
  const cost = buildCostModel(model, device, options.cost);
  const slots = plan.slots ?? 0;
  const simulation = simulatePlan({ ...plan, slots }, cost, { detail: true });
  const timings = simulation.segments!;
  const name = (i: number) => plan.base_segment_names[i] ?? `#${i}`;
  const rows: CostRow[] = plan.segments.map((segment, m) => {
    const run = cost.run(segment.base[0], segment.base[1]);
    const [first, last] = segment.base;
    return {
      index: segment.index,
      base: [first, last],
      names: first === last ? name(first) : `${name(first)} .. ${name(last)}`,
      param_bytes: segment.param_bytes,
      resident: segment.resident,
      copy_s: segment.resident ? 0 : run.copy_s,
      compute_s: run.compute_s,
      stall_s: timings[m].stall_s,
    };
  });
  const noSplit = options.maxVramGiB === 0;
  const bound = lowerBound(cost, memoryCap(device, options), options.stream && !noSplit);
  const explanation: CostExplanation = {
    policy: plan.policy,
    slots,
    rates: cost.rates,
    rows,
    resident_bytes: plan.resident_bytes,
    streamed_bytes_per_step: plan.streamed_bytes_per_step,
    compute_s: simulation.compute_s,
    copy_s: simulation.copy_s,
    stall_s: simulation.stall_s,
    predicted_step_s: simulation.step_s,
    first_step_s: simulation.first_step_s,
    lower_bound: bound,
  };
  if (plan.policy === "ferry") {
    explanation.memory = { ...ferryMemory(plan.segments, slots), E: plan.budget.E };
  }
  if (explain.compare ?? true) {
    const other: PolicyName = plan.policy === "ferry" ? "sdcpp" : "ferry";
    try {
      const alternative = planJob(model, device, { ...options, policy: other });
      explanation.alternative = {
        policy: other,
        predicted_step_s: alternative.predicted_step_s!,
        slots: alternative.slots ?? 0,
        segments: alternative.segments.length,
        resident_bytes: alternative.resident_bytes,
        streamed_bytes_per_step: alternative.streamed_bytes_per_step,
      };
    } catch (error) {
      if (!(error instanceof PlanError)) throw error;
      explanation.alternative = { policy: other, error: error.message };
    }
  }
  return explanation;
}

/** Seconds for people: "12 µs", "3.4 ms", "1.234 s". */
export function formatSeconds(seconds: number): string {
  if (!Number.isFinite(seconds)) return `${seconds} s`;
  if (seconds === 0) return "0 s";
  if (seconds < 1e-3) return `${(seconds * 1e6).toFixed(0)} µs`;
  if (seconds < 1) return `${(seconds * 1e3).toFixed(1)} ms`;
  return `${seconds.toFixed(3)} s`;
}

function table(rows: string[][], right: boolean[]): string[] {
  const widths = rows[0].map((_, column) => Math.max(...rows.map((row) => row[column].length)));
  return rows.map((row) =>
    row
      .map((cell, column) =>
        right[column] ? cell.padStart(widths[column]) : cell.padEnd(widths[column]),
      )
      .join("  ")
      .trimEnd(),
  );
}

function describeRates(rates: DeviceRates): string {
  const guess = (assumed: boolean) => (assumed ? " (assumed: the device reports none)" : "");
  return (
    `Cost model: host→device ${(rates.h2dBytesPerS / 1e9).toFixed(1)} GB/s${guess(rates.assumed.h2d)}, ` +
    `compute ${(rates.flopsPerS / 1e12).toFixed(1)} TFLOP/s${guess(rates.assumed.compute)}, ` +
    `${formatSeconds(rates.dispatchS)} per dispatch`
  );
}

/** The lower bound in one line: its value and the classes of plans it comes from. */
export function describeBound(bound: LowerBound): string {
  const value = formatSeconds(bound.lower_bound_s);
  if (!bound.streaming_necessary) {
    return (
      `${value} = Σ compute + 1 dispatch (everything might stay resident, so nothing need be ` +
      "copied per step)"
    );
  }
  const compute = `compute with ${bound.min_dispatches} dispatches ${formatSeconds(bound.compute_s)}`;
  const copies = (c: { min_streamed_bytes: number; copy_s: number }) =>
    `copies of ≥ ${formatBytes(c.min_streamed_bytes)} ${formatSeconds(c.copy_s)}`;
  const serial = bound.serial!;
  const parts = [
    `serial plans ≥ ${compute} + ${copies(serial)} = ${formatSeconds(serial.bound_s)}`,
  ];
  if (bound.overlapped) {
    const o = bound.overlapped;
    parts.unshift(
      `overlapped plans ≥ max(${compute}, ${copies(o)}, ${o.slots} slot(s) busy ` +
        `${formatSeconds(o.occupancy_s)}) = ${formatSeconds(o.bound_s)}`,
    );
  } else {
    parts.push("no overlapped plan fits (a staging slot and the working set leave too little)");
  }
  return `${value}, the smaller of: ${parts.join("; ")}`;
}

/** The explanation for people, ending with a newline. */
export function formatCostExplanation(x: CostExplanation): string {
  const lines: string[] = [describeRates(x.rates)];
  const execution =
    x.slots > 0
      ? `copies overlap compute through ${x.slots} staging slot(s), prefetching across steps`
      : x.streamed_bytes_per_step > 0
        ? "serial: each streamed segment is copied, then computed, nothing overlaps"
        : "nothing is streamed";
  lines.push(`Execution: ${execution}`);
  lines.push("");

  const rows = [["#", "base", "", "params", "state", "copy", "compute", "stall"]];
  for (const row of x.rows) {
    rows.push([
      String(row.index),
      row.base[0] === row.base[1] ? String(row.base[0]) : `${row.base[0]}-${row.base[1]}`,
      row.names,
      formatBytes(row.param_bytes),
      row.resident ? "resident" : "streamed",
      row.resident ? "-" : formatSeconds(row.copy_s),
      formatSeconds(row.compute_s),
      formatSeconds(row.stall_s),
    ]);
  }
  lines.push(`Per merged segment, steady state (${x.policy})`);
  lines.push(
    ...table(rows, [true, true, false, true, false, true, true, true]).map((line) => `  ${line}`),
  );
  lines.push("");

  if (x.memory) {
    const m = x.memory;
    const staging =
      m.slots > 0
        ? ` + ${m.slots} slot(s) × ${formatBytes(m.slot_bytes)}`
        : " (serial: largest segment need)";
    lines.push(
      `Memory: resident ${formatBytes(m.resident_bytes)}${staging} + working ` +
        `${formatBytes(m.working_bytes)} = ${formatBytes(m.total_bytes)} ≤ E ${formatBytes(m.E)}`,
    );
  }
  lines.push(
    `Per step: compute ${formatSeconds(x.compute_s)} + stall ${formatSeconds(x.stall_s)} = ` +
      `predicted ${formatSeconds(x.predicted_step_s)}; copies ${formatSeconds(x.copy_s)} ` +
      `(${formatBytes(x.streamed_bytes_per_step)} streamed, ${formatBytes(x.resident_bytes)} resident)`,
  );
  lines.push(`First step: ${formatSeconds(x.first_step_s)} (also uploads the resident set once)`);
  lines.push(`Lower bound: ${describeBound(x.lower_bound)}`);
  lines.push(
    `Predicted / lower bound: ${(x.predicted_step_s / x.lower_bound.lower_bound_s).toFixed(3)}`,
  );
  const alt = x.alternative;
  if (alt) {
    if ("error" in alt) {
      lines.push(`The ${alt.policy} policy on the same input: no plan (${alt.error})`);
    } else {
      const ratio = alt.predicted_step_s / x.predicted_step_s;
      const how =
        ratio >= 1 ? `${ratio.toFixed(2)}× this plan's time` : `${(1 / ratio).toFixed(2)}× faster`;
      lines.push(
        `The ${alt.policy} policy on the same input: ${formatSeconds(alt.predicted_step_s)} per ` +
          `step (${how}); ${alt.segments} merged segment(s), slots ${alt.slots}, ` +
          `${formatBytes(alt.resident_bytes)} resident, ${formatBytes(alt.streamed_bytes_per_step)} ` +
          "streamed per step",
      );
    }
  }
  return `${lines.join("\n")}\n`;
}

/** The explanation as `ferry plan --explain --json` appends it under `"explain"`. */
export function costExplanationJson(x: CostExplanation): Record<string, unknown> {
  return {
    slots: x.slots,
    rates: {
      h2d_gbps: x.rates.h2dBytesPerS / 1e9,
      tflops: x.rates.flopsPerS / 1e12,
      dispatch_us: x.rates.dispatchS * 1e6,
      assumed: { ...x.rates.assumed },
    },
    segments: x.rows.map((row) => ({
      index: row.index,
      resident: row.resident,
      param_bytes: row.param_bytes,
      copy_s: row.copy_s,
      compute_s: row.compute_s,
      stall_s: row.stall_s,
    })),
    compute_s: x.compute_s,
    copy_s: x.copy_s,
    stall_s: x.stall_s,
    predicted_step_s: x.predicted_step_s,
    first_step_s: x.first_step_s,
    lower_bound: {
      lower_bound_s: x.lower_bound.lower_bound_s,
      compute_s: x.lower_bound.compute_s,
      copy_s: x.lower_bound.copy_s,
      min_streamed_bytes: x.lower_bound.min_streamed_bytes,
      bound_by: x.lower_bound.bound_by,
      ...(x.lower_bound.serial ? { serial: { ...x.lower_bound.serial } } : {}),
      ...(x.lower_bound.overlapped ? { overlapped: { ...x.lower_bound.overlapped } } : {}),
    },
    ...(x.memory ? { memory: { ...x.memory } } : {}),
    ...(x.alternative ? { alternative: { ...x.alternative } } : {}),
  };
}

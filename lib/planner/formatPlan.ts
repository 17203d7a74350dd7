/**
 * A plan for people: budgets with where they came from, a table of merged segments, what is
 * resident and what streams each step, and why (for `sdcpp`: the T/4 cap, the chunk-K prefix; for
 * `ferry`: its margin, staging slots and memory), then the predicted step time when the plan
 * carries one. `ferry plan --explain` adds the cost breakdown (explainFerry.ts).
 */
import { formatBytes } from "../config/units";
import type { DeviceProfile } from "../model/profile";
import { STREAM_MARGIN_BYTES } from "./budget";
import { formatSeconds } from "./explainFerry";
import { describeBudgetSource, explainPlan } from "./explainPlan";
import { FERRY_MARGIN_BYTES, ferryMemory } from "./ferryPolicy";
import type { Plan } from "./types";

/** Context that is not part of a plan but makes its explanation readable. */
export interface FormatPlanOptions {
  /** Printed in the heading. @default omitted */
  modelName?: string;
  /** Free and total memory in the heading, and the source of B. @default omitted */
  device?: DeviceProfile;
  /** The `--max-vram` value the plan was made with, to say how B was derived. @default omitted */
  maxVramGiB?: number;
}

/** Base range and names of a merged segment: "4-6  blocks.3 .. blocks.5" or "0  prelude". */
function describeBase(plan: Plan, base: [number, number]): { range: string; names: string } {
  const [first, last] = base;
  const name = (i: number) => plan.base_segment_names[i] ?? `#${i}`;
  if (first === last) return { range: String(first), names: name(first) };
  return { range: `${first}-${last}`, names: `${name(first)} .. ${name(last)}` };
}

/** Lays out rows as columns; `right` marks the columns aligned to the right. */
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

/** The human-readable plan, ending with a newline. */
export function formatPlan(plan: Plan, options: FormatPlanOptions = {}): string {
  const facts = explainPlan(plan);
  const { B, E, P } = plan.budget;
  const lines: string[] = [];

  const model = options.modelName ? `${options.modelName}: ` : "";
  lines.push(
    `Model ${model}${plan.base_segment_names.length} base segments, ` +
      `${formatBytes(facts.totalParamBytes)} of parameters`,
  );
  if (options.device) {
    const { name, free_bytes, total_bytes } = options.device;
    lines.push(`Device ${name}: ${formatBytes(free_bytes)} free of ${formatBytes(total_bytes)}`);
  }
  lines.push(`Policy ${plan.policy}, streaming ${plan.stream ? "on" : "off"}`);
  lines.push("");

  const source =
    options.device !== undefined || options.maxVramGiB !== undefined
      ? describeBudgetSource(options.maxVramGiB, options.device?.free_bytes ?? 0)
      : facts.noSplit
        ? "no split (--max-vram 0)"
        : "the user's limit, resolved";
  const ferry = plan.policy === "ferry";
  const margin = formatBytes(ferry ? FERRY_MARGIN_BYTES : STREAM_MARGIN_BYTES);
  const effective = ferry
    ? facts.noSplit
      ? `free − ${margin} margin (no split)`
      : `min(B, free − ${margin} margin)`
    : facts.noSplit
      ? "free (no split: nothing streams, so no margin)"
      : plan.stream
        ? `min(B, free − ${margin} margin)`
        : "min(B, free)";
  lines.push("Budgets");
  lines.push(
    ...table(
      [
        ["B", formatBytes(B), source],
        ["E", formatBytes(E), effective],
        [
          "P",
          formatBytes(P),
          ferry ? "= E: no planner cap; the cost model chooses the boundaries" : facts.cap.reason,
        ],
      ],
      [false, true, false],
    ).map((line) => `  ${line}`),
  );
  lines.push("");

  const rows = [["#", "base", "", "params", "compute", "state"]];
  for (const segment of plan.segments) {
    const { range, names } = describeBase(plan, segment.base);
    rows.push([
      String(segment.index),
      range,
      names,
      formatBytes(segment.param_bytes),
      formatBytes(segment.compute_buffer_bytes),
      segment.resident ? "resident" : "streamed",
    ]);
  }
  lines.push(`Merged segments (${plan.segments.length})`);
  lines.push(...table(rows, [true, true, false, true, true, false]).map((line) => `  ${line}`));
  lines.push("");

  if (ferry) {
    const memory = ferryMemory(plan.segments, plan.slots ?? 0);
    const staging =
      memory.slots > 0
        ? `${memory.slots} staging slot(s) × ${formatBytes(memory.slot_bytes)}`
        : "no staging slots";
    lines.push(
      `Residency: chosen by the cost model to minimise the predicted step time; ${staging}`,
    );
    lines.push(
      `  memory: resident ${formatBytes(memory.resident_bytes)} + staging ` +
        `${formatBytes(memory.staging_bytes)} + working ${formatBytes(memory.working_bytes)} = ` +
        `${formatBytes(memory.total_bytes)} of E ${formatBytes(E)}`,
    );
  } else if (plan.stream && !facts.noSplit) {
    lines.push(
      `Residency: W = ${formatBytes(facts.W)} (largest merged footprint), ` +
        `reserved = ${margin} + W = ${formatBytes(facts.reservedBytes)}, ` +
        `E − reserved = ${formatBytes(facts.residencyLimitBytes)}`,
    );
    lines.push(`  ${facts.residencyReason}`);
  } else {
    lines.push(`Residency: ${facts.residencyReason}`);
  }
  lines.push(
    `Resident: ${formatBytes(plan.resident_bytes)} in ${facts.residentCount} segment(s); ` +
      `streamed per step: ${formatBytes(plan.streamed_bytes_per_step)} in ` +
      `${facts.streamedCount} segment(s)`,
  );
  if (plan.predicted_step_s !== undefined) {
    const bound =
      plan.lower_bound_s !== undefined ? `; lower bound ${formatSeconds(plan.lower_bound_s)}` : "";
    const execution = (plan.slots ?? 0) > 0 ? `${plan.slots} staging slot(s)` : "serial";
    lines.push(
      `Predicted step: ${formatSeconds(plan.predicted_step_s)} (${execution}${bound}; ` +
        "--explain for the breakdown)",
    );
  }
  return `${lines.join("\n")}\n`;
}

/**
 * The budget step every policy starts from: the user's limit `B` and the effective budget `E` a
 * plan must fit in. Kept apart from the policies so a cost-model policy resolves `--max-vram`
 * exactly as the `sdcpp` baseline does and the two are compared on the same memory.
 *
 * Rules (stable-diffusion.cpp `--max-vram`, June 2026):
 * - positive x: B = floor(x · 2^30) bytes;
 * - 0: no split — the model runs as one resident unit; B = 0 and E = free. Nothing streams, so
 *   the streaming margin does not apply (a 512 MiB device runs a model that fits in 512 MiB);
 * - negative −x: B = free − floor(x · 2^30);
 * - not given: B = free. sd.cpp has no such case (its flag defaults to 0, "no split"); Ferry's
 *   default when the user sets no limit is to plan against the device's whole free memory.
 * - streaming: E = min(B, free − 512 MiB), the margin sd.cpp keeps for the CUDA context,
 *   allocator slack and buffers outside the plan; without streaming: E = min(B, free).
 */
import { formatBytes, formatGiBValue, GiB, MiB } from "../config/units";
import { PlanError } from "./types";

/**
 * sd.cpp's fixed headroom: subtracted from free memory when streaming, and reserved again (with
 * the largest merged footprint) before residency is chosen.
 */
export const STREAM_MARGIN_BYTES = 512 * MiB;

/** How `B` was obtained, for explanations. */
export type BudgetMode = "absolute" | "free-minus" | "no-split" | "free";

export interface ResolvedBudget {
  /** The user's limit in bytes (0 in no-split mode). */
  B: number;
  /** The effective budget a plan must fit in, bytes. Always > 0. */
  E: number;
  mode: BudgetMode;
}

/** What the budget step needs to know. */
export interface BudgetInputs {
  /** Free device memory, bytes. */
  freeBytes: number;
  /** sd.cpp's `--max-vram` in GiB; see {@link resolveBudget}. @default undefined (whole free memory) */
  maxVramGiB?: number;
  /** Whether segments that do not fit are streamed (sd.cpp `--stream-layers`). */
  stream: boolean;
}

/**
 * Resolves `B` and `E` from `--max-vram` and the device's free memory.
 * @throws PlanError when the limit is not a finite number or leaves no memory (E ≤ 0).
 */
export function resolveBudget({ freeBytes, maxVramGiB, stream }: BudgetInputs): ResolvedBudget {
  if (!Number.isFinite(freeBytes) || freeBytes < 0) {
    throw new PlanError(
      `device free memory must be a non-negative number of bytes (got ${freeBytes})`,
    );
  }
  if (maxVramGiB !== undefined && !Number.isFinite(maxVramGiB)) {
    throw new PlanError(`--max-vram must be a finite number of GiB (got ${maxVramGiB})`);
  }
  const streamLimit = freeBytes - STREAM_MARGIN_BYTES;
  const deviceLimit = stream ? streamLimit : freeBytes;

  let B: number;
  let mode: BudgetMode;
  if (maxVramGiB === undefined) {
    B = freeBytes;
    mode = "free";
  } else if (maxVramGiB === 0) {
    B = 0;
    mode = "no-split";
  } else if (maxVramGiB > 0) {
    // Multiplying by 2^30 is exact in binary floating point, so every implementation floors the
    // same product.
    B = Math.floor(maxVramGiB * GiB);
    mode = "absolute";
  } else {
    B = freeBytes - Math.floor(-maxVramGiB * GiB);
    mode = "free-minus";
  }
  // No split: one resident unit, nothing streamed, so no streaming margin either.
  const E = mode === "no-split" ? freeBytes : Math.min(B, deviceLimit);

  if (E <= 0) throw new PlanError(noMemoryMessage(freeBytes, maxVramGiB, stream, mode, B));
  return { B, E, mode };
}

/** Why E came out ≤ 0, in the terms the user gave. */
function noMemoryMessage(
  freeBytes: number,
  maxVramGiB: number | undefined,
  stream: boolean,
  mode: BudgetMode,
  B: number,
): string {
  const subject =
    maxVramGiB === undefined ? "the device" : `--max-vram ${formatGiBValue(maxVramGiB)}`;
  if (mode === "free-minus" && B <= 0) {
    const taken = formatBytes(Math.floor(-maxVramGiB! * GiB), { unit: "GiB" });
    return `${subject} leaves no memory: free ${formatBytes(freeBytes, { unit: "GiB" })} − ${taken}`;
  }
  if (mode === "absolute" && B <= 0) {
    return `${subject} is less than one byte`;
  }
  if (stream && mode !== "no-split") {
    return (
      `${subject} leaves no memory: free ${formatBytes(freeBytes)} is not more than the ` +
      `${formatBytes(STREAM_MARGIN_BYTES)} streaming margin`
    );
  }
  return `${subject} leaves no memory: ${formatBytes(freeBytes)} free`;
}

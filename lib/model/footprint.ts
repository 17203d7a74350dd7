/**
 * Per-base-segment memory and compute of the DiT, for B samples of T tokens (M = B·T rows),
 * float32 activations. `compute_buffer_bytes` is exactly the scratch the native kernels ask for
 * (native/include/ferry/kernels.h: *_scratch_bytes), so a plan's memory bound is what the
 * executor will really allocate; a test keeps the two in step.
 */
import type { BaseSegment } from "./profile";
import { validateDitConfig, type DitConfig } from "./dit";

/** A base segment's footprint without its weights (param_bytes depends on the stored dtypes). */
export type SegmentFootprint = Omit<BaseSegment, "name" | "param_bytes">;

export interface DitFootprint {
  prelude: SegmentFootprint;
  /** Every block has the same footprint. */
  block: SegmentFootprint;
  final: SegmentFootprint;
}

const FLOAT_BYTES = 4;

/**
 * Footprints of the prelude, one block and the final segment:
 *   compute_buffer: prelude 0; block 4·(9·M·D + H·T·T) (h, qkv, attention output and the MLP
 *     hidden layer — 1 + 3 + 1 + 4 rows of D — plus one sample's H score matrices); final
 *     4·(M·D + M·C)
 *   output: prelude 4·M·D, block 4·M·D, final 4·M·C
 *   prev_cut (the previous segment's output it reads): prelude 4·M·C (the latent), block and
 *     final 4·M·D
 *   flops: prelude 2·M·C·D; block 2·M·(3D² + D² + 4D² + 4D²) + 4·B·H·T²·(D/H) (QKᵀ and P·V);
 *     final 2·M·D·C
 */
export function segmentFootprint(config: DitConfig, batch: number, tokens: number): DitFootprint {
  validateDitConfig(config);
  for (const [label, value] of [
    ["batch", batch],
    ["tokens", tokens],
  ] as const) {
    if (!Number.isSafeInteger(value) || value <= 0) {
      throw new RangeError(`segmentFootprint: ${label} must be a positive integer (got ${value})`);
    }
  }
  const { hidden: d, heads: h, channels: c } = config;
  const m = batch * tokens;
  const dh = d / h;
  return {
    prelude: {
      compute_buffer_bytes: 0,
      output_bytes: FLOAT_BYTES * m * d,
      prev_cut_bytes: FLOAT_BYTES * m * c,
      external_bytes: 0,
      flops: 2 * m * c * d,
    },
    block: {
      compute_buffer_bytes: FLOAT_BYTES * (9 * m * d + h * tokens * tokens),
      output_bytes: FLOAT_BYTES * m * d,
      prev_cut_bytes: FLOAT_BYTES * m * d,
      external_bytes: 0,
      flops:
        2 * m * (3 * d * d + d * d + 4 * d * d + 4 * d * d) + 4 * batch * h * tokens * tokens * dh,
    },
    final: {
      compute_buffer_bytes: FLOAT_BYTES * (m * d + m * c),
      output_bytes: FLOAT_BYTES * m * c,
      prev_cut_bytes: FLOAT_BYTES * m * d,
      external_bytes: 0,
      flops: 2 * m * d * c,
    },
  };
}

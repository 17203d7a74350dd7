/**
 * How far the native output (ggml's CPU backend, float32) may be from the TypeScript reference
 * (float64, lib/model/reference.ts), by the weights' type.
 *
 * For f32 weights the two agree to float32 rounding: 1e-4, as the model's spec asks (measured
 * worst 4.8e-7). For other types ggml converts each matrix product's activations to the weight
 * type's dot type first (f16, bf16, q8_0 blocks), and the reference does the same — but from
 * float64 activations, so a value that lies within float32 rounding of a conversion boundary can
 * convert the other way: one activation then moves by one unit of that type (2^-11 relative for
 * f16, 2^-8 for bf16, max|x|/127 of its block for q8_0) and an output by that times a weight.
 * Measured worst over 6 models × 2–3 steps (blocks 2–3, hidden 64, batch 2, tokens 8–16):
 * f16 5.2e-4, bf16 4.2e-3, q8_0 7.8e-3, q4_0 6.9e-3. The tolerances leave about 4× margin.
 */
export const QUANTIZED_TOLERANCE = {
  f32: 1e-4,
  f16: 2e-3,
  bf16: 2e-2,
  q8_0: 3e-2,
  q4_0: 3e-2,
} as const;

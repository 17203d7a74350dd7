/**
 * Seeded random profiles, devices and budgets for the planner's property tests: deterministic
 * (mulberry32), spread over the interesting region — models larger than the budget but with every
 * segment fitting, transfer and compute of similar order — with edge cases mixed in (zero-byte
 * segments, zero FLOPs, unknown rates, no split, no streaming).
 */
import { GiB, MiB } from "../../lib/config/units";
import type { BaseSegment, DeviceProfile, ModelProfile } from "../../lib/model/profile";
import { mulberry32 } from "../../bench/plan";
import type { PlanOptions } from "../../lib/planner/types";

export { mulberry32 };

export interface RandomCase {
  model: ModelProfile;
  device: DeviceProfile;
  options: Omit<PlanOptions, "policy">;
}

/** A random case; `maxSegments` bounds the model's length. */
export function randomCase(random: () => number, maxSegments = 24): RandomCase {
  const pick = <T>(values: readonly T[]): T => values[Math.floor(random() * values.length)];
  const count = 1 + Math.floor(random() * maxSegments);
  // A few size regimes so that uniform blocks, mixed sizes and tiny segments all occur.
  const regime = pick(["uniform", "mixed", "unet"] as const);
  const blockBytes = Math.round((8 + random() * 600) * MiB);
  const segments: BaseSegment[] = Array.from({ length: count }, (_, i) => {
    let params: number;
    if (random() < 0.05) params = 0;
    else if (regime === "uniform") params = blockBytes;
    else if (regime === "mixed") params = Math.round(random() * random() * 800 * MiB);
    else params = Math.round(blockBytes * (i % 7 < 3 ? 0.05 + random() * 0.1 : 1 + random()));
    const flopsPerByte = random() < 0.05 ? 0 : 10 ** (1 + random() * 3.5);
    return {
      name: `s${i}`,
      param_bytes: params,
      compute_buffer_bytes: Math.round(random() * (regime === "unet" ? 500 : 200) * MiB),
      output_bytes: Math.round(random() * 40 * MiB),
      prev_cut_bytes: i === 0 ? 0 : Math.round(random() * 60 * MiB),
      external_bytes: random() < 0.5 ? 0 : Math.round(random() * 16 * MiB),
      flops: Math.round(Math.max(params, MiB) * flopsPerByte),
    };
  });
  const totalParams = segments.reduce((sum, s) => sum + s.param_bytes, 0);
  const free = Math.round((1 + random() * 23) * GiB);
  const device: DeviceProfile = {
    name: "random gpu",
    total_bytes: free + Math.round(random() * GiB),
    free_bytes: free,
    h2d_gbps: random() < 0.05 ? 0 : 4 + random() * 60,
    tflops: random() < 0.05 ? 0 : 5 + random() * 400,
    dispatch_us: random() < 0.2 ? 0 : random() * 200,
  };
  // Most budgets hold the largest segment (else both policies refuse) but not the whole model.
  const largestNeed = Math.max(
    ...segments.map(
      (s) =>
        s.param_bytes +
        s.compute_buffer_bytes +
        s.output_bytes +
        s.prev_cut_bytes +
        s.external_bytes,
    ),
  );
  let maxVramGiB: number | undefined;
  const budget = random();
  if (budget < 0.05) maxVramGiB = undefined;
  else if (budget < 0.1) maxVramGiB = 0;
  else if (budget < 0.2) maxVramGiB = -random() * 2;
  else if (budget < 0.35) maxVramGiB = Math.max(0.05, (totalParams / GiB) * random());
  else {
    const fraction = totalParams * (0.05 + random() * 1.1);
    maxVramGiB = Math.max(largestNeed * (1.05 + random()), fraction) / GiB;
  }
  return {
    model: { name: `random-${count}`, segments },
    device,
    options: { maxVramGiB, stream: random() < 0.9 },
  };
}

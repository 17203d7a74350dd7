/**
 * `ferry bench predict`: how well the cost model predicts real steps. On one CPU executor with
 * an emulated host→device link (so copies take real, predictable time), the scheduler first
 * calibrates the executor from a warm-up job, then plans the same job with each policy; each
 * plan's predicted step time is compared with the measured steady-state step time (median of
 * the steps after the first, which pays the cold disk reads).
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { JobSpec } from "../gen/ferry/v1/scheduler";
import { genModel } from "../lib/model/genModel";
import { startCluster } from "../services/cluster/localCluster";

export interface PredictBenchOptions {
  /** Model blocks. @default 8 */
  blocks?: number;
  /** Model hidden width. @default 512 */
  hidden?: number;
  /** Steps per measured job. @default 6 */
  steps?: number;
  /** Tokens per sample. @default 64 */
  tokens?: number;
  /** Emulated link, GB/s. @default 2 */
  linkGbps?: number;
  /** The job's --max-vram, GiB (small enough that the model streams). @default 0.06 */
  maxVramGiB?: number;
  log?: (line: string) => void;
}

export interface PredictBenchRow {
  policy: string;
  slots: number;
  predicted_step_s: number;
  measured_step_s: number;
  lower_bound_s: number;
  /** |predicted − measured| / measured. */
  error: number;
}

const median = (values: number[]) => {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
};

export async function runPredictBench(
  options: PredictBenchOptions = {},
): Promise<PredictBenchRow[]> {
  const log = options.log ?? (() => {});
  const dir = await mkdtemp(join(tmpdir(), "ferry-bench-predict-"));
  const modelPath = join(dir, "model.safetensors");
  const hidden = options.hidden ?? 512;
  await genModel(modelPath, { blocks: options.blocks ?? 8, hidden, heads: hidden / 64 });
  const cluster = await startCluster(
    [{ id: "bench-gpu", vram: "2GiB", linkGbps: options.linkGbps ?? 2 }],
    { modelDirs: [dir] },
  );
  try {
    const spec = (policy: string, steps: number): JobSpec => ({
      modelPath,
      steps,
      batch: 1,
      tokens: options.tokens ?? 64,
      seed: 0,
      maxVramGib: options.maxVramGiB ?? 0.06,
      policy,
      noStream: false,
      executorId: "",
      paramsBackend: "",
      load: "",
      verify: false,
      contextTokens: 0,
      shift: false,
      inputs: [],
    });
    // Calibration: the scheduler learns β, the compute rate and δ from these steps.
    for (const policy of ["sdcpp", "ferry"]) {
      await cluster.client.runJob(spec(policy, 4));
    }
    const rows: PredictBenchRow[] = [];
    for (const policy of ["sdcpp", "ferry"]) {
      const { plan } = await cluster.client.getPlan(spec(policy, options.steps ?? 6));
      const result = await cluster.client.runJob(spec(policy, options.steps ?? 6));
      const measured = median(result.steps.slice(1).map((step) => step.stepSeconds));
      const predicted = plan!.predictedStepS;
      rows.push({
        policy,
        slots: plan!.slots,
        predicted_step_s: predicted,
        measured_step_s: measured,
        lower_bound_s: plan!.lowerBoundS,
        error: Math.abs(predicted - measured) / measured,
      });
      log(`${policy}: predicted ${predicted.toFixed(4)} s, measured ${measured.toFixed(4)} s`);
    }
    return rows;
  } finally {
    await cluster.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

export function formatPredictBench(rows: PredictBenchRow[]): string {
  const lines = [
    "| policy | slots | predicted step | measured step | lower bound | error |",
    "|---|--:|--:|--:|--:|--:|",
    ...rows.map(
      (row) =>
        `| ${row.policy} | ${row.slots} | ${(row.predicted_step_s * 1000).toFixed(1)} ms | ` +
        `${(row.measured_step_s * 1000).toFixed(1)} ms | ${(row.lower_bound_s * 1000).toFixed(1)} ms | ` +
        `${(100 * row.error).toFixed(1)}% |`,
    ),
  ];
  return `${lines.join("\n")}\n`;
}

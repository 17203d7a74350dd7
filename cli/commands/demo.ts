import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Command } from "commander";
import type { JobResult } from "../../gen/ferry/v1/scheduler";
import { startCluster, type Cluster } from "../../services/cluster/localCluster";
import { parseIntegerFlag, parseNumberFlag } from "../../lib/config/config";
import { formatBytes, parseBytes } from "../../lib/config/units";
import { genModel, GEN_MODEL_FLOAT_DTYPES, type GenModelDtype } from "../../lib/model/genModel";
import { planFromMessage } from "../../services/scheduler/planProto";
import { formatPlan } from "../../lib/planner/formatPlan";
import { describeFlux, fluxImageTokens } from "../../lib/model/flux";
import { genFluxModel } from "../../lib/model/genFlux";
import { action } from "../action";
import { formatStep } from "./run";

interface DemoFlags {
  blocks: string;
  hidden: string;
  heads: string;
  channels: string;
  dtype: string;
  steps: string;
  tokens: string;
  vram: string;
  linkGbps: string;
  policies: string;
  keep?: boolean;
  flux: boolean;
}

const out = (line = "") => process.stdout.write(`${line}\n`);

/** Where the job's time went, from the executor's per-step measurements. */
function summarize(result: JobResult): string[] {
  const steps = result.steps;
  const sum = (pick: (s: (typeof steps)[number]) => number, from = 0) =>
    steps.slice(from).reduce((total, step) => total + pick(step), 0);
  // Step 1 reads from disk what the executor's params cache does not hold yet (a later plan on
  // the same model finds it there) and uploads what the plan keeps resident.
  const firstRead = steps[0]?.diskBytes ?? 0;
  const lines = [
    `total ${result.totalSeconds.toFixed(2)} s over ${steps.length} steps`,
    `  step 1 (${firstRead > 0 ? "cold: reads weights from disk" : "weights already in the host cache"}): ` +
      `${steps[0]?.stepSeconds.toFixed(3) ?? "?"} s, ${formatBytes(firstRead)} read`,
  ];
  if (steps.length > 1) {
    const warm = steps.length - 1;
    lines.push(
      `  steps 2..${steps.length} (warm): ${(sum((s) => s.stepSeconds, 1) / warm).toFixed(3)} s per step`,
    );
  }
  const step = sum((s) => s.stepSeconds);
  const share = (seconds: number) =>
    `${seconds.toFixed(3)} s (${((100 * seconds) / step).toFixed(0)}%)`;
  const h2dSeconds = sum((s) => s.h2dSeconds);
  const h2dBytes = sum((s) => s.h2dBytes);
  lines.push(
    `  prepare_params ${share(sum((s) => s.prepareSeconds))}`,
    `  h2d            ${share(h2dSeconds)}, ${formatBytes(h2dBytes)}` +
      (h2dSeconds > 0 ? `, ${(h2dBytes / h2dSeconds / 1e9).toFixed(2)} GB/s` : ""),
    `  compute        ${share(sum((s) => s.computeSeconds))}`,
    `  peak device memory in use: ${formatBytes(Math.max(...steps.map((s) => s.arenaPeakBytes)))}`,
    `checksum ${result.checksum}`,
  );
  return lines;
}

export function register(program: Command): void {
  program
    .command("demo")
    .description(
      "the main job, embedded: a scheduler, one executor and a generated model that does not " +
        "fit the executor's memory, run end to end on loopback",
    )
    .option("--blocks <n>", "model blocks", "8")
    .option("--hidden <n>", "model hidden width", "1024")
    .option("--heads <n>", "attention heads", "16")
    .option("--channels <n>", "latent channels", "16")
    .option("--dtype <type>", `weight type: ${GEN_MODEL_FLOAT_DTYPES.join(", ")}`, "f32")
    .option("--steps <n>", "sampling steps", "4")
    .option("--tokens <n>", "tokens per sample", "64")
    .option("--vram <size>", "the executor's device memory", "768MiB")
    .option("--link-gbps <rate>", "emulated host→device link, GB/s (0 = memory speed)", "8")
    .option("--policies <list>", "planning policies to run, in order", "sdcpp,ferry")
    .option("--keep", "keep the generated model")
    .option("--no-flux", "skip the FLUX.1-shaped run after the DiT's")
    .action(
      action("demo", async (flags: DemoFlags) => {
        if (!(GEN_MODEL_FLOAT_DTYPES as readonly string[]).includes(flags.dtype)) {
          throw new Error(`--dtype must be one of ${GEN_MODEL_FLOAT_DTYPES.join(", ")}`);
        }
        const linkGbps = parseNumberFlag("--link-gbps", flags.linkGbps, 0, 10_000);
        parseBytes(flags.vram);
        const dir = await mkdtemp(join(tmpdir(), "ferry-demo-"));
        const modelPath = join(dir, "demo-dit.safetensors");
        const fluxPath = join(dir, "demo-flux.safetensors");
        let cluster: Cluster | undefined;
        try {
          out(`1. generating a synthetic DiT model in ${dir}`);
          let lastPercent = -10;
          const model = await genModel(modelPath, {
            blocks: parseIntegerFlag("--blocks", flags.blocks, 1, 10_000),
            hidden: parseIntegerFlag("--hidden", flags.hidden, 1, 65_536),
            heads: parseIntegerFlag("--heads", flags.heads, 1, 1024),
            channels: parseIntegerFlag("--channels", flags.channels, 1, 65_536),
            dtype: flags.dtype as GenModelDtype,
            onProgress: (written, total) => {
              const percent = Math.floor((100 * written) / total);
              if (percent >= lastPercent + 10) {
                lastPercent = percent;
                process.stderr.write(`   ${percent}% of ${formatBytes(total)}\n`);
              }
            },
          });
          out(
            `   ${model.config.blocks} blocks × hidden ${model.config.hidden}, ${flags.dtype}: ` +
              `${(model.params / 1e6).toFixed(1)} M params, ${formatBytes(model.bytes)}`,
          );

          cluster = await startCluster(
            // Device memory committed at start-up, as a GPU's is: the first step's copies then run
            // at the link's rate, not at the rate this VM serves first-touch page faults.
            [
              {
                id: "demo-gpu0",
                vram: flags.vram,
                linkGbps,
                env: process.env,
                args: ["--commit-memory"],
              },
            ],
            { modelDirs: [dir] },
          );
          out(`2. scheduler listening on ${cluster.server.address}`);
          out(
            `3. executor demo-gpu0 connected: CPU device with ${flags.vram} of device memory` +
              (linkGbps > 0 ? `, emulated ${linkGbps} GB/s host→device link` : ""),
          );

          // The same job under each policy: sd.cpp's baseline first, then Ferry's cost model.
          const policies = flags.policies.split(",").map((name) => name.trim());
          const steps = parseIntegerFlag("--steps", flags.steps, 1, 10_000);
          let section = 4;
          const runPolicies = async (
            label: string,
            path: string,
            bytes: number,
            job: { tokens: number; contextTokens: number; guidance?: number; shift: boolean },
          ) => {
            const summaries: string[] = [];
            for (const policy of policies) {
              const spec = {
                modelPath: path,
                steps,
                batch: 1,
                tokens: job.tokens,
                seed: 0,
                maxVramGib: undefined,
                policy,
                noStream: false,
                executorId: "",
                paramsBackend: "",
                load: "",
                verify: false,
                contextTokens: job.contextTokens,
                guidance: job.guidance,
                shift: job.shift,
                inputs: [],
              };
              const { plan } = await cluster!.client.getPlan(spec);
              out(
                `${section++}. the ${policy} plan for the ${label} (model ${formatBytes(bytes)} vs device ${flags.vram}):`,
              );
              for (const line of formatPlan(planFromMessage(plan!)).split("\n")) out(`   ${line}`);
              out(
                `${section++}. running ${spec.steps} steps of the ${label} with the ${policy} plan`,
              );
              const result = await cluster!.client.runJob(spec, (progress) =>
                out(`   ${formatStep(progress)}`),
              );
              out(`${section++}. where the time went (${label}, ${policy})`);
              for (const line of summarize(result)) out(`   ${line}`);
              const warm = result.steps.slice(1);
              const perStep = warm.length
                ? warm.reduce((sum, step) => sum + step.stepSeconds, 0) / warm.length
                : result.steps[0].stepSeconds;
              summaries.push(
                `${policy}: ${perStep.toFixed(3)} s per warm step, checksum ${result.checksum.slice(0, 16)}…`,
              );
            }
            if (summaries.length > 1) {
              out(`${section++}. side by side (${label}: same model, same executor, same output)`);
              for (const line of summaries) out(`   ${line}`);
            }
          };
          await runPolicies("DiT", modelPath, model.bytes, {
            tokens: parseIntegerFlag("--tokens", flags.tokens, 1, 1_000_000),
            contextTokens: 0,
            shift: false,
          });

          if (flags.flux) {
            // A FLUX.1-dev-shaped transformer (BFL's names and blocks, fewer and narrower; 700 MiB
            // in f32, more than the device's budget) on the same executor: a 128×128-pixel image (L = 64) and 32 text tokens, inputs
            // generated from the seed.
            out(`${section++}. generating a FLUX.1-dev-shaped model in ${fluxPath}`);
            const flux = await genFluxModel(fluxPath, {
              hidden: 1024,
              depth: 2,
              depthSingle: 6,
              guidance: true,
              dtype: flags.dtype as GenModelDtype,
              seed: 1,
            });
            out(
              `   ${describeFlux(flux.config)}, ${flags.dtype}: ` +
                `${(flux.params / 1e6).toFixed(1)} M params, ${formatBytes(flux.bytes)}`,
            );
            await runPolicies("FLUX.1-shaped model", fluxPath, flux.bytes, {
              tokens: fluxImageTokens(128, 128),
              contextTokens: 32,
              guidance: 3.5,
              shift: true,
            });
          }
        } finally {
          await cluster?.stop();
          if (!flags.keep) await rm(dir, { recursive: true, force: true });
          else out(`models kept in ${dir}`);
        }
      }),
    );
}

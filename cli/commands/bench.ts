/**
 * `ferry bench`: benchmarks that need no GPU.
 * - `ferry bench plan [--json | --markdown]`: the `sdcpp` and `ferry` policies' predicted step
 *   times against the lower bound on real models' profiles (bench/plan.ts), and the planner's
 *   speed on a 1,000-segment profile.
 * - `ferry bench predict [--json]`: predicted vs measured step time on a real executor with an
 *   emulated link, for both policies, after the scheduler calibrated the executor (bench/predict.ts).
 * - `ferry bench executor [--json]`: sdcpp vs ferry plans run on one executor, copy efficiency,
 *   gRPC overhead (bench/executor.ts).
 * - `ferry bench load [--json]`: loader vs raw read rate and cold-start step 1 per load mode
 *   (bench/load.ts).
 * - `ferry bench scheduler [--json]`: the scheduler under failure — executors SIGKILLed mid-job,
 *   the scheduler restarted — with every job's outcome and checksum checked (bench/scheduler.ts).
 * - `ferry bench profiles --out DIR`: writes those profiles as profile files
 *   (DIR/models/*.json, DIR/devices/*.json) for `ferry plan --profile … --device-profile …`.
 */
import { mkdir, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { Command } from "commander";
import {
  formatPlanBench,
  measurePlannerSpeed,
  planBenchJson,
  planBenchMarkdown,
  runPlanBench,
} from "../../bench/plan";
import { registerBenchExecutor } from "../../bench/executor";
import { registerBenchLoad } from "../../bench/load";
import { registerBenchReliability } from "../../bench/reliability";
import { registerBenchScheduler } from "../../bench/scheduler";
import { registerBenchTracing } from "../../bench/tracing";
import { formatPredictBench, runPredictBench } from "../../bench/predict";
import { profileFiles } from "../../bench/profiles";

/** Where the commands write; tests pass sinks, the CLI the process streams. */
export interface BenchCommandIo {
  stdout(text: string): void;
  stderr(text: string): void;
  /** Records a failure's exit code. @default sets process.exitCode */
  setExitCode?(code: number): void;
}

const processIo: BenchCommandIo = {
  stdout: (text) => void process.stdout.write(text),
  stderr: (text) => void process.stderr.write(text),
  setExitCode: (code) => {
    process.exitCode = code;
  },
};

/** `ferry bench plan`'s options. */
export interface BenchPlanOptions {
  /** Print the rows as JSON. @default false */
  json: boolean;
  /** Print bench/RESULTS-plan.md. @default false */
  markdown: boolean;
  /** Measure the planner on a synthetic profile of this many segments; 0 skips it. @default 1000 */
  speedSegments: number;
}

/** The output of `ferry bench plan` for these options. */
export function benchPlanOutput(options: BenchPlanOptions): string {
  const result = runPlanBench();
  if (options.json) return `${JSON.stringify(planBenchJson(result), null, 2)}\n`;
  const speed = options.speedSegments > 0 ? measurePlannerSpeed(options.speedSegments) : undefined;
  return options.markdown ? planBenchMarkdown(result, speed) : formatPlanBench(result, speed);
}

/** Writes every bench profile under `dir`; returns the paths written. */
export async function writeProfiles(dir: string): Promise<string[]> {
  const written: string[] = [];
  for (const file of profileFiles()) {
    const path = join(dir, file.path);
    await mkdir(dirname(path), { recursive: true });
    await writeFile(path, `${JSON.stringify(file.json, null, 2)}\n`);
    written.push(path);
  }
  return written;
}

function parseCount(text: string): number {
  const value = Number(text);
  if (text.trim() === "" || !Number.isSafeInteger(value) || value < 0) {
    throw new Error("--speed-segments must be a whole number ≥ 0.");
  }
  return value;
}

/** Runs an action with cli/action.ts-style error reporting: one line, exit code 1. */
function guarded(
  io: BenchCommandIo,
  name: string,
  action: () => Promise<void>,
): () => Promise<void> {
  return async () => {
    try {
      await action();
    } catch (error) {
      io.stderr(`ferry bench ${name}: ${(error as Error)?.message ?? String(error)}\n`);
      (io.setExitCode ?? processIo.setExitCode!)(1);
    }
  };
}

/** Adds `bench` (with `plan` and `profiles`) to a `ferry` program. */
export function register(program: Command, io: BenchCommandIo = processIo): void {
  const bench = program.command("bench").description("benchmarks that need no GPU");
  bench
    .command("plan")
    .description(
      "predicted step time of the sdcpp and ferry policies vs the lower bound on real models, " +
        "and the planner's speed",
    )
    .option("--json", "print the rows as JSON", false)
    .option("--markdown", "print the results as Markdown (bench/RESULTS-plan.md)", false)
    .option(
      "--speed-segments <n>",
      "segments of the synthetic profile the planner is timed on (0 = skip)",
      parseCount,
      1000,
    )
    .action(function (this: Command) {
      const options = this.opts<BenchPlanOptions>();
      return guarded(io, "plan", async () => io.stdout(benchPlanOutput(options)))();
    });
  bench
    .command("predict")
    .description("the cost model's predicted step time vs the measured one on a live executor")
    .option("--json", "print the rows as JSON", false)
    .option("--link-gbps <rate>", "emulated host→device link, GB/s", "2")
    .action(function (this: Command) {
      const { json, linkGbps } = this.opts<{ json: boolean; linkGbps: string }>();
      return guarded(io, "predict", async () => {
        const rows = await runPredictBench({
          linkGbps: Number(linkGbps),
          log: (line) => io.stderr(`${line}\n`),
        });
        io.stdout(json ? `${JSON.stringify(rows, null, 2)}\n` : formatPredictBench(rows));
      })();
    });
  registerBenchExecutor(bench);
  registerBenchLoad(bench);
  registerBenchScheduler(bench);
  registerBenchReliability(bench);
  registerBenchTracing(bench);
  bench
    .command("profiles")
    .description("write the bench's model and device profiles as profile files")
    .requiredOption("--out <dir>", "directory for models/*.json and devices/*.json")
    .action(function (this: Command) {
      const { out } = this.opts<{ out: string }>();
      return guarded(io, "profiles", async () => {
        for (const path of await writeProfiles(out)) io.stdout(`wrote ${path}\n`);
      })();
    });
}

/**
 * `ferry plan`: show which merged segments of a model stay resident on a GPU and which stream
 * every step, without running anything. The model comes from a model file (header only) or a
 * profile JSON; the device from `--device-memory` or the profile.
 */
import { Command, CommanderError, InvalidArgumentError } from "commander";
import { resolve } from "node:path";
import { SchedulerClient } from "../../lib/client/schedulerClient";
import { loadToken } from "../../lib/wire/credentials";
import { formatBytes, parseSize } from "../../lib/config/units";
import { deviceProfileOf, planFromMessage } from "../../services/scheduler/planProto";
import type { DeviceProfile, ModelProfile } from "../../lib/model/profile";
import { modelProfileFromFile } from "../../lib/model/segments";
import {
  costExplanationJson,
  explainCosts,
  formatCostExplanation,
} from "../../lib/planner/explainFerry";
import { formatPlan } from "../../lib/planner/formatPlan";
import { KNOWN_POLICIES, planJob } from "../../lib/planner/planJob";
import { formatPlanJson, planToJson } from "../../lib/planner/planJson";
import { readProfileFile } from "../../lib/planner/profileFile";
import type { Plan, PolicyName } from "../../lib/planner/types";
import { addFluxShapeOptions, resolveJobShape } from "../jobShapeFlags";

/** Tokens per sample when planning a model file. Matches the scheduler's job default. */
export const DEFAULT_PLAN_TOKENS = 64;
/** Samples per step when planning a model file. */
export const DEFAULT_PLAN_BATCH = 1;

/** Where the command writes; tests pass sinks, the CLI the process streams. */
export interface PlanCommandIo {
  stdout(text: string): void;
  stderr(text: string): void;
  /** Records a failure's exit code. @default sets process.exitCode */
  setExitCode?(code: number): void;
}

const processIo: PlanCommandIo = {
  stdout: (text) => void process.stdout.write(text),
  stderr: (text) => void process.stderr.write(text),
  setExitCode: (code) => {
    process.exitCode = code;
  },
};

/** `ferry plan`'s options after commander has parsed them. */
export interface PlanCommandOptions {
  /** Profile JSON with the model's segments and the device. @default none */
  profile?: string;
  /** Profile JSON whose device replaces the --profile's (a `{"device": …}` file). @default none */
  deviceProfile?: string;
  /** sd.cpp `--max-vram`, GiB: > 0 limit, 0 no split, < 0 free minus that. @default all free memory */
  maxVram?: number;
  /** Stream what does not fit (`--no-stream` turns it off). @default true */
  stream: boolean;
  /** Planning policy. @default "sdcpp" */
  policy: string;
  /** Samples per step, for a model file's activation sizes. @default 1 */
  batch: number;
  /** Tokens per sample (FLUX: image tokens L), for a model file's activation sizes. @default 64 */
  tokens: number;
  /** FLUX: image tokens L (overrides --tokens). @default none */
  imgTokens?: string;
  /** FLUX: image size in pixels, L = (H/16)·(W/16) (overrides --tokens). @default none */
  width?: string;
  height?: string;
  /** FLUX: text tokens T. @default 512 */
  txtTokens?: string;
  /** Device memory in bytes (total = free), required with a model file unless --profile. @default none */
  deviceMemory?: number;
  /** Print the plan as JSON (planToJson). @default false */
  json: boolean;
  /**
   * Add the cost model's breakdown: per merged segment copy, compute and stall, the lower bound,
   * and the other policy's prediction on the same input. @default false
   */
  explain?: boolean;
  /** Ask this scheduler (HOST:PORT) to plan for one of its live executors. @default none */
  scheduler?: string;
  /** With --scheduler: the executor to plan for. @default the one a job would be placed on */
  executor?: string;
  /** With --scheduler: "auto", "single", "batch" or "pipeline" (see JobSpec.multi_gpu). @default "auto" */
  multiGpu?: string;
}

/** sd.cpp's `--max-vram`: any finite number of GiB, negatives included. */
export function parseMaxVram(text: string): number {
  const value = Number(text);
  if (text.trim() === "" || !Number.isFinite(value)) {
    throw new InvalidArgumentError(
      "--max-vram takes a number of GiB: positive = limit, 0 = no split, negative = free minus that.",
    );
  }
  return value;
}

function parsePositiveInteger(flag: string): (text: string) => number {
  return (text) => {
    const value = Number(text);
    if (text.trim() === "" || !Number.isSafeInteger(value) || value < 1) {
      throw new InvalidArgumentError(`${flag} must be a whole number ≥ 1.`);
    }
    return value;
  };
}

function parseDeviceMemory(text: string): number {
  try {
    const bytes = parseSize(text);
    if (bytes <= 0) throw new InvalidArgumentError("--device-memory must be more than 0 bytes.");
    return bytes;
  } catch (error) {
    if (error instanceof InvalidArgumentError) throw error;
    throw new InvalidArgumentError(`${(error as Error).message}.`);
  }
}

/** A plan with what is needed to explain it. */
export interface PlanOutcome {
  plan: Plan;
  /** The model's name for the heading (a model file's base name, a profile's model name). */
  modelName: string;
  /** The device planned for, when known here. */
  device?: DeviceProfile;
  /** The model planned, when known here (needed by --explain). */
  model?: ModelProfile;
  /** Lines to show on stderr (e.g. unknown fields of a profile file). */
  warnings: string[];
  /** With --scheduler: one executor or a batch split, and why (the scheduler's lines). */
  multiGpu?: string[];
}

/**
 * Makes the plan here, from a model file or a profile file: the model from the file (header only)
 * or the profile, the device from `--device-memory` or the profile.
 */
export async function planLocally(
  modelPath: string | undefined,
  options: PlanCommandOptions,
): Promise<PlanOutcome> {
  if (modelPath === undefined && options.profile === undefined) {
    throw new Error("give a model file or --profile p.json (see ferry plan --help)");
  }
  const warnings: string[] = [];
  let model: ModelProfile | undefined;
  let device: DeviceProfile | undefined;

  if (options.profile !== undefined) {
    // With a model file as well, the profile supplies only the device.
    const profile = await readProfileFile(options.profile, {
      modelOptional: modelPath !== undefined,
      deviceOptional: options.deviceProfile !== undefined,
    });
    warnings.push(...profile.warnings);
    model = profile.model;
    device = profile.device;
    if (modelPath !== undefined && profile.model !== undefined) {
      warnings.push(`${options.profile}: model ignored; planning the model file ${modelPath}`);
    }
  }
  if (options.deviceProfile !== undefined) {
    const file = await readProfileFile(options.deviceProfile, { modelOptional: true });
    warnings.push(...file.warnings);
    if (file.model !== undefined) {
      warnings.push(
        `${options.deviceProfile}: model ignored; --device-profile supplies the device`,
      );
    }
    device = file.device;
  }
  if (options.deviceMemory !== undefined) {
    const bytes = options.deviceMemory;
    device = {
      name: device
        ? `${device.name} with --device-memory`
        : `--device-memory ${formatBytes(bytes)}`,
      total_bytes: bytes,
      free_bytes: bytes,
      h2d_gbps: device?.h2d_gbps ?? 0,
      tflops: device?.tflops ?? 0,
      dispatch_us: device?.dispatch_us ?? 0,
    };
  }
  if (device === undefined) {
    throw new Error("--device-memory is required with a model file (e.g. --device-memory 12GiB)");
  }
  if (modelPath !== undefined) {
    model = await modelProfileFromFile(modelPath, jobShapeOf(options));
  }
  if (model === undefined) throw new Error(`${options.profile}: model is missing`);

  const plan = planJob(model, device, {
    policy: options.policy as PolicyName,
    stream: options.stream,
    maxVramGiB: options.maxVram,
  });
  return { plan, modelName: model.name, device, model, warnings };
}

/**
 * Asks a live scheduler for the plan a job would get on one of its executors: the device is
 * that executor's, with the rates the scheduler has calibrated from its measured steps.
 */
export async function planOnScheduler(
  modelPath: string | undefined,
  options: PlanCommandOptions,
): Promise<PlanOutcome> {
  if (modelPath === undefined) throw new Error("--scheduler needs a model file");
  if (options.profile !== undefined || options.deviceProfile !== undefined) {
    throw new Error("--scheduler plans for a live executor: drop --profile/--device-profile");
  }
  // FERRY_TOKEN / FERRY_TOKEN_FILE, as for every client.
  const client = new SchedulerClient(options.scheduler!, {
    token: loadToken(process.env.FERRY_TOKEN_FILE || undefined),
  });
  try {
    await client.ready();
    const job = jobShapeOf(options);
    const response = await client.getPlan({
      modelPath: resolve(modelPath),
      steps: 1,
      batch: job.batch,
      tokens: job.tokens,
      seed: 0,
      maxVramGib: options.maxVram,
      policy: options.policy,
      noStream: !options.stream,
      executorId: options.executor ?? "",
      paramsBackend: "",
      load: "",
      verify: false,
      contextTokens: job.contextTokens,
      shift: false,
      inputs: [],
      multiGpu: options.multiGpu ?? "",
    });
    const model = await modelProfileFromFile(modelPath, job);
    const device = deviceProfileOf(response.device!);
    device.name = `${response.executorId} (${device.name})`;
    return {
      plan: planFromMessage(response.plan!),
      modelName: model.name,
      device,
      model,
      warnings: [],
      multiGpu: response.multiGpu?.explanation,
    };
  } finally {
    client.close();
  }
}

/** Where `ferry plan`'s plan comes from: made here, or by a live scheduler (`--scheduler`). */
export async function obtainPlan(
  modelPath: string | undefined,
  options: PlanCommandOptions,
): Promise<PlanOutcome> {
  return options.scheduler !== undefined
    ? planOnScheduler(modelPath, options)
    : planLocally(modelPath, options);
}

/**
 * The command's stdout: the plan JSON, or the human explanation; with --explain, the cost
 * breakdown too (appended under `"explain"` in JSON).
 */
export function renderPlanOutcome(outcome: PlanOutcome, options: PlanCommandOptions): string {
  const explanation = options.explain ? explainOutcome(outcome, options) : undefined;
  if (options.json) {
    if (!explanation) return formatPlanJson(outcome.plan);
    const json = { ...planToJson(outcome.plan), explain: costExplanationJson(explanation) };
    return `${JSON.stringify(json, null, 2)}\n`;
  }
  const text = formatPlan(outcome.plan, {
    modelName: outcome.modelName,
    device: outcome.device,
    maxVramGiB: options.maxVram,
  });
  return explanation ? `${text}\n${formatCostExplanation(explanation)}` : text;
}

function explainOutcome(outcome: PlanOutcome, options: PlanCommandOptions) {
  if (outcome.model === undefined || outcome.device === undefined) {
    throw new Error("--explain needs the model and the device the plan was made for");
  }
  return explainCosts(outcome.plan, outcome.model, outcome.device, {
    policy: outcome.plan.policy,
    stream: options.stream,
    maxVramGiB: options.maxVram,
  });
}

/** An error as one line for the user: no stack, file errors in plain words. */
function messageOf(error: unknown): string {
  const err = error as NodeJS.ErrnoException;
  if (err?.code === "ENOENT" && err.path) return `file not found: ${err.path}`;
  if (err?.code === "EACCES" && err.path) return `permission denied: ${err.path}`;
  if (err?.code === "EISDIR") return `is a directory, not a file: ${err.path ?? err.message}`;
  return err?.message ?? String(error);
}

/** The job the plan is for: --batch, and --tokens or FLUX's --img-tokens/--width/--height. */
function jobShapeOf(options: PlanCommandOptions): {
  batch: number;
  tokens: number;
  contextTokens: number;
} {
  const { tokens, contextTokens } = resolveJobShape(
    {
      imgTokens: options.imgTokens,
      width: options.width,
      height: options.height,
      txtTokens: options.txtTokens,
    },
    options.tokens,
  );
  return { batch: options.batch, tokens, contextTokens };
}

/** Adds `plan` to a `ferry` program. */
export function register(program: Command, io: PlanCommandIo = processIo): void {
  const command = program
    .command("plan")
    .description(
      "show which merged segments of a model stay resident on a GPU and which stream each step",
    )
    .argument("[model]", "model file (safetensors or GGUF); only its header is read")
    .option("--profile <file>", "profile JSON with the model's segments and the device")
    .option(
      "--device-profile <file>",
      'profile JSON with the device ({"device": …}); replaces the --profile\'s device',
    )
    .option(
      "--max-vram <GiB>",
      "VRAM limit as sd.cpp's --max-vram: >0 GiB, 0 = no split, <0 = free memory minus that " +
        "(default: all free memory)",
      parseMaxVram,
    )
    .option("--no-stream", "never stream: every segment must stay resident")
    .option("--policy <name>", `planning policy: ${KNOWN_POLICIES.join(", ")}`, "sdcpp")
    .option("--batch <n>", "samples per step", parsePositiveInteger("--batch"), DEFAULT_PLAN_BATCH)
    .option(
      "--tokens <n>",
      "tokens per sample",
      parsePositiveInteger("--tokens"),
      DEFAULT_PLAN_TOKENS,
    );
  addFluxShapeOptions(command)
    .option(
      "--device-memory <size>",
      "device memory, e.g. 12GiB (total = free); required with a model file unless --profile",
      parseDeviceMemory,
    )
    .option("--json", "print the plan as JSON", false)
    .option(
      "--scheduler <host:port>",
      "ask this scheduler to plan for a live executor (its calibrated rates included)",
    )
    .option("--executor <id>", "with --scheduler: plan for this executor")
    .option(
      "--multi-gpu <mode>",
      "with --scheduler: auto (the cost model chooses one executor, a batch split or a pipeline), single, batch or pipeline",
    )
    .option(
      "--explain",
      "add the cost model's breakdown: copy, compute and stall per segment, the lower bound, " +
        "and the other policy's prediction",
      false,
    )
    .allowExcessArguments(false)
    .addHelpText(
      "after",
      [
        "",
        "Examples:",
        "  ferry plan model.safetensors --device-memory 12GiB --max-vram -1",
        "  ferry plan --profile zimage-rtx3060.json --max-vram -1 --json",
        "  ferry plan --profile models/flux1-dev-q8_0.json --device-profile devices/rtx4090-24gb.json \\",
        "      --policy ferry --max-vram 12 --explain",
        "  ferry plan model.safetensors --profile rtx3060.json --no-stream",
        "  ferry plan model.safetensors --scheduler 127.0.0.1:7400 --policy ferry --explain",
        "  ferry plan flux1-dev-Q8_0.gguf --device-memory 24GiB --max-vram 12 --policy ferry \\",
        "      --width 1024 --height 1024 --txt-tokens 512",
      ].join("\n"),
    )
    .action(async (modelPath: string | undefined, options: PlanCommandOptions) => {
      // As cli/action.ts does for every command: one line, no stack unless FERRY_DEBUG is set,
      // a non-zero exit code without process.exit (so buffered output and telemetry flush).
      try {
        const outcome = await obtainPlan(modelPath, options);
        for (const warning of outcome.warnings) io.stderr(`ferry plan: warning: ${warning}\n`);
        // The scheduler's multi-GPU reasoning, when asked for (--explain, --multi-gpu).
        if (options.explain || options.multiGpu) {
          for (const line of outcome.multiGpu ?? []) io.stderr(`ferry plan: multi-GPU: ${line}\n`);
        }
        io.stdout(renderPlanOutcome(outcome, options));
      } catch (error) {
        io.stderr(`ferry plan: ${messageOf(error)}\n`);
        const stack = (error as Error)?.stack;
        if (process.env.FERRY_DEBUG && stack) io.stderr(`${stack}\n`);
        (io.setExitCode ?? processIo.setExitCode!)(1);
      }
    });
  // Commander's own errors (bad option values, unknown options) read like ours.
  command.configureOutput({
    outputError: (text, write) => write(text.replace(/^error: /, "ferry plan: ")),
  });
}

/**
 * Runs `ferry plan <args>` in-process and returns its exit code: what tests use, and what a
 * host program can call without exiting.
 */
export async function runPlanCommand(
  args: string[],
  io: PlanCommandIo = processIo,
): Promise<number> {
  let exitCode = 0;
  const recording: PlanCommandIo = {
    stdout: io.stdout,
    stderr: io.stderr,
    setExitCode: (code) => {
      exitCode = code;
      io.setExitCode?.(code);
    },
  };
  const program = new Command("ferry")
    .exitOverride()
    .configureOutput({ writeOut: io.stdout, writeErr: io.stderr });
  register(program, recording);
  try {
    await program.parseAsync(["plan", ...args], { from: "user" });
    return exitCode;
  } catch (error) {
    if (error instanceof CommanderError) return error.exitCode;
    throw error;
  }
}

/**
 * The executor bench (`ferry bench executor`): does the native executor run a plan at the speed
 * the plan predicts, and how much faster than sd.cpp's serial execution?
 *
 * On one CPU executor, one model, one VRAM budget B (`--max-vram`), one run each:
 * 1. Calibration: an all-resident run measures each base segment's compute time (and fills the
 *    host params cache, so no later run reads the disk).
 * 2. The link: the CPU device's emulated host→device link is set so that the `ferry` plan's
 *    streamed bytes per step take about as long as a step's compute (β = streamed / Σcompute,
 *    re-planned until the plan and β agree) — the regime where overlap matters most.
 * 3. `sdcpp`: the sdcpp policy's plan (merged segments, resident prefix, slots 0) run serially.
 *    `sdcpp-prefetch`: the same plan run as sd.cpp runs it since PR #1905 (the next segment's
 *    copy queued while the current one computes, fresh buffers, within a step).
 *    `ferry`: the ferry policy's plan (planned with the measured compute times and β) run
 *    overlapped (its slots). All plan for the same device: B + 512 MiB free, so sd.cpp's
 *    E = min(B, free − 512 MiB) = B, as it would be on a GPU with that much headroom.
 * 4. lower bound = max(Σcompute, ferry's streamed bytes / peak copy rate) per step, with Σcompute
 *    the least a step's compute took in any of the runs (all resident, serial, ferry's own: on
 *    ggml's CPU backend a compute that follows a copy on the same cores, or waits for one, runs
 *    slower than back to back, so no single run's figure is a floor) and the peak copy rate
 *    measured on the device (`measureCopyRate`).
 * 5. h2d: ferry's copied bytes over the time its copies took (the h2d events), vs that peak.
 * 6. gRPC: the same job through a real scheduler and an executor process (the built CLI), vs the
 *    plan the scheduler made for it run directly on the addon.
 * Step times are steady-state: the mean over steps 2..S (step 1 uploads the resident weights).
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import type { Command } from "commander";
import type { JobResult, JobSpec, Plan as PlanMessage } from "../gen/ferry/v1/scheduler";
import { startCluster } from "../services/cluster/localCluster";
import { formatBytes, GiB, MiB } from "../lib/config/units";
import { genModel, type GenModelDtype } from "../lib/model/genModel";
import { genFluxModel } from "../lib/model/genFlux";
import { readModelHeader, requireModelArchitecture } from "../lib/model/modelFile";
import type { DeviceProfile, ModelProfile } from "../lib/model/profile";
import { modelProfileFromFile } from "../lib/model/segments";
import { loadAddon, mapNativeError } from "../lib/native/addon";
import type {
  NativeAddon,
  NativeDevice,
  NativeModel,
  NativeRunRequest,
  NativeStepReport,
} from "../lib/native/AddonTypes";
import { planFromMessage } from "../services/scheduler/planProto";
import { executionOf } from "../lib/planner/execution";
import { planJob } from "../lib/planner/planJob";
import type { Plan } from "../lib/planner/types";

/** sd.cpp's streaming margin: the bench device has this much above the budget. */
const SDCPP_MARGIN_BYTES = 512 * MiB;

export interface ExecutorBenchOptions {
  /** A model file (a DiT or FLUX.1); default: one generated with the shape below into a temp directory. */
  modelPath?: string;
  /**
   * The generated model's architecture: Ferry's DiT, or a FLUX.1-dev-shaped transformer (`hidden`,
   * `depth` double and `depthSingle` single blocks, bf16). @default "dit"
   */
  arch?: "dit" | "flux";
  /** FLUX: double blocks. @default 4 */
  depth?: number;
  /** FLUX: single blocks (FLUX.1 has twice its double blocks). @default 8 */
  depthSingle?: number;
  /** FLUX: text tokens per sample (a model file that is not FLUX ignores them). @default 16 */
  contextTokens?: number;
  /**
   * Shape of the generated model. @default 24 blocks, hidden 1536, 12 heads, 16 channels, bf16
   * (1.3 GiB: fine-grained enough that a staging slot costs little residency)
   */
  blocks?: number;
  hidden?: number;
  heads?: number;
  channels?: number;
  dtype?: GenModelDtype;
  /** @default 1 */
  batch?: number;
  /** @default 16 */
  tokens?: number;
  /** Steps per run (step 1 is not timed). @default 8 */
  steps?: number;
  /** Kernel threads. @default 0 (one per core) */
  threads?: number;
  /** The budget B both policies plan for, GiB. @default 0.85 × the model's weights */
  budgetGiB?: number;
  /** Emulated link, GB/s. @default chosen so the ferry plan's copies ≈ its compute */
  linkGbps?: number;
  /** Also run the job through a scheduler and an executor process. @default true */
  grpc?: boolean;
  log?: (line: string) => void;
}

/** The bench's JSON contract: these eleven keys. */
export interface ExecutorBenchSummary {
  sdcpp_step_s: number;
  sdcpp_prefetch_step_s: number;
  ferry_step_s: number;
  lower_bound_s: number;
  speedup_vs_sdcpp: number;
  speedup_vs_sdcpp_prefetch: number;
  ferry_over_lower_bound: number;
  /** Bytes ferry copied over the time its copies took, GB/s. */
  h2d_gbps: number;
  /** The device's measured peak copy rate, GB/s. */
  h2d_peak_gbps: number;
  h2d_efficiency: number;
  /** Steady step time through scheduler + executor process over the same plan run directly; null if not run. */
  grpc_over_direct: number | null;
}

export interface ExecutorBenchDetails {
  model: string;
  params_bytes: number;
  batch: number;
  tokens: number;
  /** FLUX: text tokens per sample (0 for the DiT). */
  context_tokens: number;
  steps: number;
  threads: number;
  budget_bytes: number;
  link_gbps: number;
  /** Σ compute per step, seconds: the serial run's, the all-resident calibration's, ferry's own. */
  compute_s: number;
  calibration_compute_s: number;
  ferry_compute_s: number;
  /** How long ferry's compute waited for copies per step. */
  ferry_stall_s: number;
  ferry_predicted_step_s: number;
  ferry_slots: number;
  ferry_segments: number;
  ferry_resident_segments: number;
  ferry_streamed_bytes: number;
  sdcpp_segments: number;
  sdcpp_resident_segments: number;
  sdcpp_streamed_bytes: number;
  sdcpp_steps_s: number[];
  sdcpp_prefetch_steps_s: number[];
  /** How long sdcpp-prefetch's compute waited for copies per step. */
  sdcpp_prefetch_stall_s: number;
  ferry_steps_s: number[];
  /** Whether the three runs gave the same output bits. */
  outputs_identical: boolean;
  /** Step 1 of a second ferry job on the same device: bytes it did not copy (kept resident). */
  second_job_resident_hit_bytes: number;
  grpc?: {
    plan_policy: string;
    plan_slots: number;
    plan_segments: number;
    plan_resident_segments: number;
    steps_s: number[];
    direct_steps_s: number[];
    step_s: number;
    direct_step_s: number;
    checksum_matches: boolean;
  };
}

export interface ExecutorBenchResult extends ExecutorBenchSummary {
  details: ExecutorBenchDetails;
}

const mean = (values: number[]) => values.reduce((a, b) => a + b, 0) / Math.max(1, values.length);

function requestOf(
  plan: Plan,
  batch: number,
  tokens: number,
  steps: number,
  contextTokens = 0,
): NativeRunRequest {
  return {
    batch,
    tokens,
    contextTokens,
    steps,
    seed: 0,
    segments: plan.segments.map((s) => ({
      firstBase: s.base[0],
      lastBase: s.base[1],
      resident: s.resident,
    })),
    execution: executionOf(plan),
    slots: plan.slots ?? 0,
  };
}

async function runPlan(
  addon: NativeAddon,
  device: NativeDevice,
  model: NativeModel,
  request: NativeRunRequest,
): Promise<{ reports: NativeStepReport[]; output: Float32Array }> {
  const reports: NativeStepReport[] = [];
  const run = addon.startRun(device, model, request, (report) => reports.push(report));
  const { output } = await run.done.catch((error: unknown) => {
    throw mapNativeError(error);
  });
  return { reports, output };
}

const stepSeconds = (r: NativeStepReport) => (r.stepEndUs - r.stepStartUs) / 1e6;
const sumEvents = (r: NativeStepReport, kind: string) =>
  r.events.filter((e) => e.kind === kind).reduce((s, e) => s + (e.endUs - e.startUs) / 1e6, 0);

/** Steady-state step times: every step but the first. */
const steady = (reports: NativeStepReport[]) => reports.slice(1);

function benchDevice(budget: number, linkGbps: number): DeviceProfile {
  return {
    name: "cpu (bench)",
    total_bytes: budget + SDCPP_MARGIN_BYTES,
    free_bytes: budget + SDCPP_MARGIN_BYTES,
    h2d_gbps: linkGbps,
    tflops: 0,
    dispatch_us: 0,
  };
}

/** Runs the bench; see the module comment. */
export async function runExecutorBench(
  options: ExecutorBenchOptions = {},
): Promise<ExecutorBenchResult> {
  const log = options.log ?? (() => undefined);
  const batch = options.batch ?? 1;
  const tokens = options.tokens ?? 16;
  const steps = Math.max(2, options.steps ?? 8);
  const threads = options.threads ?? 0;
  const addon = loadAddon();
  const dir = await mkdtemp(join(tmpdir(), "ferry-bench-executor-"));
  const devices: NativeDevice[] = [];
  let model: NativeModel | undefined;
  try {
    let path = options.modelPath;
    if (!path && options.arch === "flux") {
      path = join(dir, "bench-flux.safetensors");
      log(`generating a FLUX.1-dev-shaped model in ${path}`);
      await genFluxModel(path, {
        hidden: options.hidden ?? 1536,
        depth: options.depth ?? 4,
        depthSingle: options.depthSingle ?? 8,
        guidance: true,
        dtype: options.dtype ?? "bf16",
        seed: 1,
      });
    } else if (!path) {
      path = join(dir, "bench.safetensors");
      log(`generating a model in ${path}`);
      await genModel(path, {
        blocks: options.blocks ?? 24,
        hidden: options.hidden ?? 1536,
        heads: options.heads ?? 12,
        channels: options.channels ?? 16,
        dtype: options.dtype ?? "bf16",
        seed: 1,
      });
    }
    const isFlux = requireModelArchitecture(await readModelHeader(path)).arch === "flux";
    const contextTokens = isFlux ? (options.contextTokens ?? 16) : 0;
    const profile: ModelProfile = await modelProfileFromFile(path, {
      batch,
      tokens,
      contextTokens,
    });
    const paramsBytes = profile.segments.reduce((s, x) => s + x.param_bytes, 0);
    const budget = Math.floor((options.budgetGiB ?? (0.85 * paramsBytes) / GiB) * GiB);
    model = await addon.openModel(path);

    // 1. Compute per base segment, all resident, no link.
    log("calibrating compute (all resident)");
    const calibration = new addon.CpuDevice({
      capacityBytes: paramsBytes + 512 * MiB,
      threads,
    });
    devices.push(calibration);
    const allResident: NativeRunRequest = {
      batch,
      tokens,
      contextTokens,
      steps: 3,
      seed: 0,
      segments: profile.segments.map((segment, i) => ({
        firstBase: i,
        lastBase: i,
        resident: true,
      })),
      slots: 1,
    };
    const calibrated = await runPlan(addon, calibration, model, allResident);
    const computeSeconds = profile.segments.map((_, i) =>
      mean(
        steady(calibrated.reports).map((r) =>
          r.events
            .filter((e) => e.kind === "compute" && e.segment === i)
            .reduce((s, e) => s + (e.endUs - e.startUs) / 1e6, 0),
        ),
      ),
    );
    calibration.dispose();
    const computePerStep = computeSeconds.reduce((a, b) => a + b, 0);
    log(`compute ≈ ${computePerStep.toFixed(3)} s/step`);

    // 2. The link: ferry's streamed bytes / β ≈ compute.
    const cost = { computeSeconds };
    const planFerry = (gbps: number) =>
      planJob(profile, benchDevice(budget, gbps), {
        policy: "ferry",
        stream: true,
        maxVramGiB: budget / GiB,
        cost,
      });
    let linkGbps =
      options.linkGbps ?? Math.max(0.01, (paramsBytes - budget) / computePerStep / 1e9);
    let ferryPlan = planFerry(linkGbps);
    if (options.linkGbps === undefined) {
      for (let i = 0; i < 6 && ferryPlan.streamed_bytes_per_step > 0; i++) {
        const next = ferryPlan.streamed_bytes_per_step / computePerStep / 1e9;
        const settled = Math.abs(next - linkGbps) <= 0.02 * linkGbps;
        linkGbps = next;
        ferryPlan = planFerry(linkGbps);
        if (settled) break;
      }
    }
    const sdcppPlan = planJob(profile, benchDevice(budget, linkGbps), {
      policy: "sdcpp",
      stream: true,
      maxVramGiB: budget / GiB,
    });
    const prefetchPlan = planJob(profile, benchDevice(budget, linkGbps), {
      policy: "sdcpp-prefetch",
      stream: true,
      maxVramGiB: budget / GiB,
    });
    log(
      `budget ${formatBytes(budget)}, link ${linkGbps.toFixed(3)} GB/s; ferry streams ` +
        `${formatBytes(ferryPlan.streamed_bytes_per_step)}/step with ${ferryPlan.slots} slots, ` +
        `sdcpp ${formatBytes(sdcppPlan.streamed_bytes_per_step)}/step`,
    );

    // 3. Both plans on one device with that link.
    const device = new addon.CpuDevice({
      capacityBytes: budget + SDCPP_MARGIN_BYTES,
      linkGbps,
      threads,
    });
    devices.push(device);
    const peak = device.measureCopyRate();
    log(`peak copy rate ${peak.toFixed(3)} GB/s; running sdcpp`);
    const sdcpp = await runPlan(
      addon,
      device,
      model,
      requestOf(sdcppPlan, batch, tokens, steps, contextTokens),
    );
    log("running sdcpp-prefetch");
    const prefetch = await runPlan(
      addon,
      device,
      model,
      requestOf(prefetchPlan, batch, tokens, steps, contextTokens),
    );
    device.clearResidency();
    log("running ferry");
    const ferry = await runPlan(
      addon,
      device,
      model,
      requestOf(ferryPlan, batch, tokens, steps, contextTokens),
    );
    // The same job again: its resident weights are still on the device.
    const again = await runPlan(
      addon,
      device,
      model,
      requestOf(ferryPlan, batch, tokens, 2, contextTokens),
    );

    const sdcppSteps = steady(sdcpp.reports).map(stepSeconds);
    const ferrySteps = steady(ferry.reports).map(stepSeconds);
    const prefetchSteps = steady(prefetch.reports).map(stepSeconds);
    const sdcppStep = mean(sdcppSteps);
    const prefetchStep = mean(prefetchSteps);
    const ferryStep = mean(ferrySteps);
    const compute = mean(steady(sdcpp.reports).map((r) => sumEvents(r, "compute")));
    const ferryCompute = mean(steady(ferry.reports).map((r) => sumEvents(r, "compute")));
    const floorCompute = Math.min(computePerStep, compute, ferryCompute);
    const lowerBound = Math.max(floorCompute, ferryPlan.streamed_bytes_per_step / (peak * 1e9));
    const h2dBytes = steady(ferry.reports).reduce(
      (s, r) => s + r.events.filter((e) => e.kind === "h2d").reduce((t, e) => t + e.bytes, 0),
      0,
    );
    const h2dSeconds = steady(ferry.reports).reduce((s, r) => s + sumEvents(r, "h2d"), 0);
    const h2dGbps = h2dSeconds > 0 ? h2dBytes / h2dSeconds / 1e9 : 0;

    const details: ExecutorBenchDetails = {
      model: profile.name,
      params_bytes: paramsBytes,
      batch,
      tokens,
      context_tokens: contextTokens,
      steps,
      threads,
      budget_bytes: budget,
      link_gbps: linkGbps,
      compute_s: compute,
      calibration_compute_s: computePerStep,
      ferry_compute_s: ferryCompute,
      ferry_stall_s: mean(steady(ferry.reports).map((r) => r.stallUs / 1e6)),
      ferry_predicted_step_s: ferryPlan.predicted_step_s ?? 0,
      ferry_slots: ferryPlan.slots ?? 0,
      ferry_segments: ferryPlan.segments.length,
      ferry_resident_segments: ferryPlan.segments.filter((s) => s.resident).length,
      ferry_streamed_bytes: ferryPlan.streamed_bytes_per_step,
      sdcpp_segments: sdcppPlan.segments.length,
      sdcpp_resident_segments: sdcppPlan.segments.filter((s) => s.resident).length,
      sdcpp_streamed_bytes: sdcppPlan.streamed_bytes_per_step,
      sdcpp_steps_s: sdcppSteps,
      sdcpp_prefetch_steps_s: prefetchSteps,
      sdcpp_prefetch_stall_s: mean(steady(prefetch.reports).map((r) => r.stallUs / 1e6)),
      ferry_steps_s: ferrySteps,
      outputs_identical:
        Buffer.compare(bytesOf(sdcpp.output), bytesOf(ferry.output)) === 0 &&
        Buffer.compare(bytesOf(prefetch.output), bytesOf(ferry.output)) === 0,
      second_job_resident_hit_bytes: again.reports[0]?.residentHitBytes ?? 0,
    };

    // 6. Through gRPC, vs the scheduler's plan run directly.
    let grpcOverDirect: number | null = null;
    if (options.grpc ?? true) {
      log("running the job through a scheduler and an executor process");
      const cluster = await startCluster(
        [{ id: "bench", vram: String(budget + SDCPP_MARGIN_BYTES), linkGbps, threads }],
        { modelDirs: [dirname(path)] },
      );
      const spec: JobSpec = {
        modelPath: path,
        steps,
        batch,
        tokens,
        seed: 0,
        policy: "ferry",
        maxVramGib: budget / GiB,
        noStream: false,
        executorId: "bench",
        paramsBackend: "",
        load: "",
        verify: false,
        contextTokens,
        shift: false,
        inputs: [],
      };
      let viaGrpc: JobResult;
      let planMessage: PlanMessage | undefined;
      try {
        // The plan the scheduler made for this job (it plans for the executor it registered).
        viaGrpc = await cluster.client.runJob(spec, undefined, (submitted) => {
          planMessage = submitted.plan;
        });
      } finally {
        await cluster.stop();
      }
      if (!planMessage) throw new Error("the scheduler did not say which plan it ran");
      const plan = planFromMessage(planMessage);
      device.clearResidency();
      const direct = await runPlan(
        addon,
        device,
        model,
        requestOf(plan, batch, tokens, steps, contextTokens),
      );
      const grpcSteps = viaGrpc.steps.slice(1).map((s) => s.stepSeconds);
      const directSteps = steady(direct.reports).map(stepSeconds);
      details.grpc = {
        plan_policy: plan.policy,
        plan_slots: plan.slots ?? 0,
        plan_segments: plan.segments.length,
        plan_resident_segments: plan.segments.filter((s) => s.resident).length,
        steps_s: grpcSteps,
        direct_steps_s: directSteps,
        step_s: mean(grpcSteps),
        direct_step_s: mean(directSteps),
        checksum_matches: (await sha256(direct.output)) === viaGrpc.checksum,
      };
      grpcOverDirect = mean(grpcSteps) / mean(directSteps);
    }

    return {
      sdcpp_step_s: sdcppStep,
      sdcpp_prefetch_step_s: prefetchStep,
      ferry_step_s: ferryStep,
      lower_bound_s: lowerBound,
      speedup_vs_sdcpp: sdcppStep / ferryStep,
      speedup_vs_sdcpp_prefetch: prefetchStep / ferryStep,
      ferry_over_lower_bound: ferryStep / lowerBound,
      h2d_gbps: h2dGbps,
      h2d_peak_gbps: peak,
      h2d_efficiency: peak > 0 ? h2dGbps / peak : 0,
      grpc_over_direct: grpcOverDirect,
      details,
    };
  } finally {
    for (const d of devices) d.dispose();
    model?.dispose();
    await rm(dir, { recursive: true, force: true });
  }
}

const bytesOf = (values: Float32Array) =>
  Buffer.from(values.buffer, values.byteOffset, values.byteLength);

async function sha256(values: Float32Array): Promise<string> {
  const { createHash } = await import("node:crypto");
  return createHash("sha256")
    .update(Buffer.from(values.buffer, values.byteOffset, values.byteLength))
    .digest("hex");
}

/** The eleven keys of the bench's JSON contract, in order. */
export function executorBenchSummary(result: ExecutorBenchResult): ExecutorBenchSummary {
  return {
    sdcpp_step_s: result.sdcpp_step_s,
    sdcpp_prefetch_step_s: result.sdcpp_prefetch_step_s,
    ferry_step_s: result.ferry_step_s,
    lower_bound_s: result.lower_bound_s,
    speedup_vs_sdcpp: result.speedup_vs_sdcpp,
    speedup_vs_sdcpp_prefetch: result.speedup_vs_sdcpp_prefetch,
    ferry_over_lower_bound: result.ferry_over_lower_bound,
    h2d_gbps: result.h2d_gbps,
    h2d_peak_gbps: result.h2d_peak_gbps,
    h2d_efficiency: result.h2d_efficiency,
    grpc_over_direct: result.grpc_over_direct,
  };
}

const fmt = (v: number | null, digits = 3) => (v === null ? "—" : v.toFixed(digits));

/** A Markdown report of one run (bench/RESULTS-executor.md's measured section). */
export function executorBenchMarkdown(result: ExecutorBenchResult): string {
  const d = result.details;
  const goal = (ok: boolean) => (ok ? "met" : "**missed**");
  const lines = [
    "| metric | value | goal |",
    "| --- | --- | --- |",
    `| sdcpp_step_s | ${fmt(result.sdcpp_step_s)} | |`,
    `| sdcpp_prefetch_step_s | ${fmt(result.sdcpp_prefetch_step_s)} | |`,
    `| ferry_step_s | ${fmt(result.ferry_step_s)} | |`,
    `| lower_bound_s | ${fmt(result.lower_bound_s)} | |`,
    `| speedup_vs_sdcpp | ${fmt(result.speedup_vs_sdcpp, 2)} | ≥ 1.6: ${goal(result.speedup_vs_sdcpp >= 1.6)} |`,
    `| speedup_vs_sdcpp_prefetch | ${fmt(result.speedup_vs_sdcpp_prefetch, 2)} | ≥ 1.3: ${goal(result.speedup_vs_sdcpp_prefetch >= 1.3)} |`,
    `| ferry_over_lower_bound | ${fmt(result.ferry_over_lower_bound, 3)} | ≤ 1.10: ${goal(result.ferry_over_lower_bound <= 1.1)} |`,
    `| h2d_gbps | ${fmt(result.h2d_gbps)} | |`,
    `| h2d_peak_gbps | ${fmt(result.h2d_peak_gbps)} | |`,
    `| h2d_efficiency | ${fmt(result.h2d_efficiency, 3)} | ≥ 0.90: ${goal(result.h2d_efficiency >= 0.9)} |`,
    `| grpc_over_direct | ${fmt(result.grpc_over_direct, 3)} | ≤ 1.03: ${result.grpc_over_direct === null ? "not run" : goal(result.grpc_over_direct <= 1.03)} |`,
    "",
    `Model ${d.model}: ${formatBytes(d.params_bytes)} of weights; batch ${d.batch} × tokens ${d.tokens}` +
      `${d.context_tokens ? ` (+ ${d.context_tokens} text tokens)` : ""}, ` +
      `${d.steps} steps (step 1 not timed), ${d.threads || "all"} kernel threads. Budget ` +
      `${formatBytes(d.budget_bytes)}; emulated link ${d.link_gbps.toFixed(3)} GB/s.`,
    "",
    `- sdcpp plan: ${d.sdcpp_segments} merged segments, ${d.sdcpp_resident_segments} resident, ` +
      `${formatBytes(d.sdcpp_streamed_bytes)} streamed per step, serial; the same plan with ` +
      `sd.cpp's one-segment lookahead (sdcpp-prefetch) stalled ${fmt(d.sdcpp_prefetch_stall_s)} s ` +
      "per step.",
    `- ferry plan: ${d.ferry_segments} segments, ${d.ferry_resident_segments} resident, ` +
      `${formatBytes(d.ferry_streamed_bytes)} streamed per step, ${d.ferry_slots} slots; predicted ` +
      `${fmt(d.ferry_predicted_step_s)} s/step.`,
    `- Σcompute per step: ${fmt(d.calibration_compute_s)} s all resident, ${fmt(d.compute_s)} s ` +
      `serial, ${fmt(d.ferry_compute_s)} s in the ferry run (the bound takes the least); ferry ` +
      `stalled ${fmt(d.ferry_stall_s)} s per step waiting for copies.`,
    `- A second ferry job on the same device found ${formatBytes(d.second_job_resident_hit_bytes)} ` +
      "of its resident weights still there (not copied).",
    `- Steps (s): sdcpp ${d.sdcpp_steps_s.map((s) => s.toFixed(3)).join(", ")}; ` +
      `sdcpp-prefetch ${d.sdcpp_prefetch_steps_s.map((s) => s.toFixed(3)).join(", ")}; ferry ` +
      `${d.ferry_steps_s.map((s) => s.toFixed(3)).join(", ")}.`,
    `- Outputs of the three runs: ${d.outputs_identical ? "bitwise identical" : "DIFFERENT"}.`,
  ];
  if (d.grpc) {
    lines.push(
      `- gRPC: the scheduler's ${d.grpc.plan_policy} plan (${d.grpc.plan_segments} segments, ` +
        `${d.grpc.plan_resident_segments} resident, ${d.grpc.plan_slots} slots), ` +
        `${fmt(d.grpc.step_s)} s/step through the executor process vs ${fmt(d.grpc.direct_step_s)} ` +
        `s/step directly; outputs ${d.grpc.checksum_matches ? "identical" : "DIFFERENT"}.`,
    );
  }
  return `${lines.join("\n")}\n`;
}

/** `ferry bench executor`'s options as commander parses them. */
interface ExecutorBenchFlags {
  model?: string;
  arch: string;
  depth: string;
  depthSingle: string;
  txtTokens: string;
  blocks: string;
  hidden: string;
  heads: string;
  tokens: string;
  batch: string;
  steps: string;
  threads: string;
  budget?: string;
  linkGbps?: string;
  grpc: boolean;
  json: boolean;
  details: boolean;
}

function archFlag(text: string): "dit" | "flux" {
  if (text !== "dit" && text !== "flux")
    throw new Error(`--arch must be dit or flux (got ${text})`);
  return text;
}

function positive(name: string, text: string | undefined, integer: boolean): number | undefined {
  if (text === undefined) return undefined;
  const value = Number(text);
  if (!Number.isFinite(value) || value <= 0 || (integer && !Number.isInteger(value))) {
    throw new Error(`${name} must be a positive ${integer ? "whole " : ""}number (got ${text})`);
  }
  return value;
}

/** Adds `executor` to a `bench` command (`ferry bench executor`). */
export function registerBenchExecutor(bench: Command): void {
  bench
    .command("executor")
    .description(
      "the native executor on one CPU device: sdcpp's serial plan and sd.cpp's prefetch vs " +
        "ferry's overlapped plan vs the lower bound, copy efficiency, and gRPC overhead",
    )
    .option("--model <path>", "a DiT or FLUX.1 model file (default: generate one)")
    .option("--arch <arch>", "the generated model: dit, or flux (FLUX.1-dev's layout, bf16)", "dit")
    .option("--blocks <n>", "dit: blocks of the generated model", "24")
    .option("--depth <n>", "flux: double blocks of the generated model", "4")
    .option("--depth-single <n>", "flux: single blocks of the generated model", "8")
    .option("--txt-tokens <n>", "flux: text tokens per sample", "16")
    .option("--hidden <n>", "hidden width of the generated model", "1536")
    .option("--heads <n>", "attention heads of the generated model", "12")
    .option("--batch <n>", "samples per job", "1")
    .option("--tokens <n>", "tokens per sample (flux: image tokens)", "16")
    .option("--steps <n>", "steps per run (the first is not timed)", "8")
    .option("--threads <n>", "kernel threads; 0 = one per core", "0")
    .option("--budget <gib>", "the --max-vram both policies plan for, GiB (default 0.85 × weights)")
    .option("--link-gbps <rate>", "emulated link, GB/s (default: copies ≈ compute)")
    .option("--no-grpc", "skip the run through a scheduler and an executor process")
    .option("--json", "print the eleven result keys as JSON", false)
    .option("--details", "with --json: add the details", false)
    .action(async function (this: Command) {
      const f = this.opts<ExecutorBenchFlags>();
      try {
        const result = await runExecutorBench({
          modelPath: f.model,
          arch: archFlag(f.arch),
          depth: positive("--depth", f.depth, true),
          depthSingle: positive("--depth-single", f.depthSingle, true),
          contextTokens: positive("--txt-tokens", f.txtTokens, true),
          blocks: positive("--blocks", f.blocks, true),
          hidden: positive("--hidden", f.hidden, true),
          heads: positive("--heads", f.heads, true),
          batch: positive("--batch", f.batch, true),
          tokens: positive("--tokens", f.tokens, true),
          steps: positive("--steps", f.steps, true),
          threads: f.threads === "0" ? 0 : positive("--threads", f.threads, true),
          budgetGiB: positive("--budget", f.budget, false),
          linkGbps: positive("--link-gbps", f.linkGbps, false),
          grpc: f.grpc,
          log: (line) => void process.stderr.write(`ferry bench executor: ${line}\n`),
        });
        if (f.json) {
          const out = f.details ? result : executorBenchSummary(result);
          process.stdout.write(`${JSON.stringify(out, null, 2)}\n`);
        } else {
          process.stdout.write(executorBenchMarkdown(result));
        }
      } catch (error) {
        process.stderr.write(`ferry bench executor: ${(error as Error)?.message ?? error}\n`);
        process.exitCode = 1;
      }
    });
}

import { createHash, randomUUID } from "node:crypto";
import { hostname } from "node:os";
import { status as grpcStatus, type ClientDuplexStream } from "@grpc/grpc-js";
import {
  ConnectRequest,
  JobResult,
  JobState,
  SchedulerServiceClient,
  type ConnectResponse,
  type DeviceInfo,
  type Holdings,
  type InputTensor,
  type LoadModelCommand,
  type PipelineStage,
  type RunJob,
  type SetBudgetCommand,
  type StepStats,
  type UnloadModelCommand,
} from "../../gen/ferry/v1/scheduler";
import { openRegularFile } from "../../lib/model/openRegularFile";
import { ferryVersion } from "../../lib/packageInfo";
import { contextFromTraceparent } from "../../lib/telemetry/api";
import {
  bearerInterceptor,
  channelCredentials,
  type ClientTlsFiles,
  type ServerTlsFiles,
} from "../../lib/wire/credentials";
import { GRPC_MESSAGE_LIMIT } from "../../lib/wire/limits";
import { StepHistory } from "../../lib/wire/stepHistory";
import { StatusError, statusName, toStatusError } from "../../lib/wire/statusError";
import { loadAddon, mapNativeError } from "../../lib/native/addon";
import type {
  NativeCpuDeviceInfo,
  NativeGpuDeviceInfo,
  NativeDevice,
  NativeModel,
  NativeRun,
  NativeStepReport,
} from "../../lib/native/AddonTypes";
import { executionOf } from "../../lib/planner/execution";
import { ExecutorMetrics } from "./executorMetrics";
import { OutboundQueue } from "./outboundQueue";
import { HandoffSender, PeerServer, PendingHandoffs, type HandoffTensors } from "./peer";
import { probeCompute, type ComputeProbe } from "./probe";
import { StepSpanRecorder } from "./stepSpans";

export interface ExecutorOptions {
  /** The scheduler's HOST:PORT. */
  scheduler: string;
  /**
   * Device kind: "cpu" (ggml's CPU backend, memory capped at `vramBytes`) runs everywhere; "cuda"
   * is ggml's CUDA backend (a build with FERRY_CUDA=1 on a machine with a GPU). @default "cpu"
   */
  device?: "cpu" | "cuda";
  /** Device memory (the CPU device's arena capacity), bytes. */
  vramBytes: number;
  /** Emulated host→device link rate, GB/s; 0 = copy at memory speed. @default 0 */
  linkGbps?: number;
  /** Kernel threads; 0 = one per core. @default 0 */
  threads?: number;
  /** CPU device: commit all its memory at start-up (see CpuDeviceOptions). @default false */
  commitMemory?: boolean;
  /** Executor id; defaults to host name + a random suffix. */
  id?: string;
  /** How many opened models (and their host params caches) to keep warm. @default 2 */
  maxWarmModels?: number;
  /** Params backend of jobs that do not choose one: "cpu" (kept in host memory) or "disk". @default "cpu" */
  paramsBackend?: ParamsBackend;
  /** Load mode of jobs that do not choose one. @default "background" */
  load?: LoadMode;
  /** Measure the compute rate and dispatch overhead at start-up. @default true */
  probe?: boolean;
  /** Bearer token the scheduler wants. @default undefined (none) */
  token?: string;
  /** TLS to the scheduler (a client certificate when it verifies executors). @default plaintext */
  tls?: ClientTlsFiles;
  /**
   * HOST:PORT this executor takes pipeline handoffs from other executors on (port 0: any free
   * one); "" = none (it cannot be a pipeline stage). @default "127.0.0.1:0"
   */
  peerListen?: string;
  /** HOST:PORT other executors reach the peer address at. @default the address it listens on */
  peerAdvertise?: string;
  /**
   * TLS for the peer address (a certificate other executors verify with their `tls.caFile`;
   * with a client CA, handoffs must come with a client certificate it signed). Handoffs to other
   * executors use `tls` (CA and client certificate). @default plaintext
   */
  peerTls?: ServerTlsFiles;
  /**
   * With TLS: the DNS name every executor's certificate carries for its peer address (pod IPs
   * change; one name in every certificate does not). @default the peer address's host
   */
  peerTlsName?: string;
  /**
   * Build spans from each step's native events. Only `ferry bench tracing` turns this off, to
   * measure what the span code costs against not having it. @default true
   */
  stepSpans?: boolean;
  log?: (line: string) => void;
}

interface WarmModel {
  model: NativeModel;
  mtimeMs: number;
  size: number;
  /** Opened by LoadModel: kept until UnloadModel, never evicted for another model. */
  pinned: boolean;
}

/** Results kept for the scheduler until it acknowledges them (one job runs at a time). */
const OUTBOX_LIMIT = 4;

type Lifecycle = "starting" | "running" | "draining" | "stopped";

export type ParamsBackend = "cpu" | "disk";
export type LoadMode = "lazy" | "eager" | "background";
export const PARAMS_BACKENDS: readonly ParamsBackend[] = ["cpu", "disk"];
export const LOAD_MODES: readonly LoadMode[] = ["lazy", "eager", "background"];

/** A job's option, or the executor's default; an unknown value is the job's error. */
function jobOption<T extends string>(
  name: string,
  value: string,
  known: readonly T[],
  fallback: T,
): T {
  if (!value) return fallback;
  if (!known.includes(value as T)) {
    throw Object.assign(new Error(`unknown ${name} '${value}' (known: ${known.join(", ")})`), {
      name: "InvalidArgumentError",
    });
  }
  return value as T;
}

/**
 * A job's input tensors by name as float32 (copied: request bytes need not be aligned). The
 * scheduler checked names and shapes against the model; the native run checks the sizes again.
 */
function inputsOf(inputs: readonly InputTensor[]): Record<string, Float32Array> {
  const out: Record<string, Float32Array> = {};
  for (const input of inputs) {
    if (input.data.length % 4 !== 0) {
      throw Object.assign(new Error(`input "${input.name}" is not whole float32 values`), {
        name: "InvalidArgumentError",
      });
    }
    const values = new Float32Array(input.data.length / 4);
    new Uint8Array(values.buffer).set(input.data);
    out[input.name] = values;
  }
  return out;
}

/**
 * An executor process's runtime: owns the native device, dials the scheduler's Connect stream,
 * registers, heartbeats, and runs the jobs it is sent in native code — several at once when the
 * scheduler finds their plans fit the device's budget together (the device's memory arbiter
 * admits each, evicting idle models' cached weights first).
 * If the scheduler goes away it keeps running its job, reconnects with backoff, registers again
 * with the same identity (id + this process's instance) and what it holds, and sends the
 * results the scheduler has not acknowledged.
 */
export class Executor {
  readonly id: string;
  /** Picked once per process: the scheduler tells this executor's reconnects from an impostor's. */
  readonly instance = randomUUID();
  private readonly outbox = new Map<string, JobResult>();
  private readonly addon = loadAddon();
  private readonly device: NativeDevice<NativeCpuDeviceInfo | NativeGpuDeviceInfo>;
  private readonly client: SchedulerServiceClient;
  private readonly log: (line: string) => void;
  private readonly warm = new Map<string, WarmModel>();
  private stream: ClientDuplexStream<ConnectRequest, ConnectResponse> | undefined;
  /** The current stream's sender (progress coalesced while the stream is full). */
  private outbound: OutboundQueue | undefined;
  private heartbeat: NodeJS.Timeout | undefined;
  private reconnectTimer: NodeJS.Timeout | undefined;
  private reconnectDelayMs = 250;
  private readonly runs = new Map<string, RunningJob>();
  private lifecycle: Lifecycle = "starting";
  private computeProbe: ComputeProbe | undefined;
  private metrics: ExecutorMetrics | undefined;
  private registeredResolve: (() => void) | undefined;
  private peer: PeerServer | undefined;
  private peerAddress = "";
  /** Handoffs for stage jobs that have not started here yet. */
  private readonly pendingHandoffs = new PendingHandoffs();
  /** Resolves once the scheduler has acknowledged the first registration. */
  readonly registered: Promise<void>;

  constructor(private readonly options: ExecutorOptions) {
    this.log = options.log ?? ((line) => console.error(line));
    this.id = options.id ?? `${hostname()}-${randomUUID().slice(0, 6)}`;
    if (options.device === "cuda") {
      if (this.addon.gpuDeviceCount() === 0) {
        throw new Error(
          "--device cuda: no GPU is available to this build on this machine (build with FERRY_CUDA=1 where the CUDA toolkit and cuBLAS are installed)",
        );
      }
      this.device = new this.addon.GpuDevice({ capacityBytes: options.vramBytes });
    } else {
      this.device = new this.addon.CpuDevice({
        capacityBytes: options.vramBytes,
        linkGbps: options.linkGbps ?? 0,
        threads: options.threads ?? 0,
        commitMemory: options.commitMemory ?? false,
      });
    }
    // The copy rate the planner starts from, measured on this device's own copy engine (the
    // emulated link included); the scheduler refines it from real jobs.
    this.device.measureCopyRate();
    this.client = new SchedulerServiceClient(options.scheduler, channelCredentials(options.tls), {
      "grpc.max_receive_message_length": GRPC_MESSAGE_LIMIT,
      "grpc.max_send_message_length": GRPC_MESSAGE_LIMIT,
      interceptors: options.token ? [bearerInterceptor(options.token)] : [],
    });
    this.registered = new Promise((resolveRegistered) => {
      this.registeredResolve = resolveRegistered;
    });
  }

  deviceInfo(): DeviceInfo {
    const info = this.device.info();
    return {
      name: info.name,
      kind: info.kind,
      totalBytes: info.totalBytes,
      freeBytes: info.freeBytes,
      h2dGbps: info.peakCopyGbps,
      threads: "threads" in info ? Number(info.threads) : 0,
      // From the start-up probe; the scheduler refines both from this executor's jobs.
      tflops: this.computeProbe?.tflops ?? 0,
      dispatchUs: this.computeProbe?.dispatchUs ?? 0,
    };
  }

  /** What this executor holds: device memory, resident weights, open models, jobs, results. */
  holdings(): Holdings {
    const stats = this.device.stats();
    return {
      freeBytes: this.device.info().freeBytes,
      usedBytes: stats.inUseBytes,
      residentBytes: stats.residentCacheBytes,
      residentSegments: stats.residentCacheEntries,
      models: [...this.warm].map(([path, warm]) => ({
        path,
        hostCacheBytes: warm.model.hostCacheBytes(),
        pinned: warm.pinned,
      })),
      runningJobIds: [...this.runs.keys()],
      heldResultJobIds: [...this.outbox.keys()],
      budgetBytes: this.device.info().budgetBytes,
    };
  }

  /** Probes the device's compute rate (unless disabled), then dials the scheduler. */
  async start(): Promise<void> {
    if (this.lifecycle !== "starting") return;
    this.lifecycle = "running";
    // Made here, not in the constructor: the process sets up its meter provider in between.
    this.metrics = new ExecutorMetrics({
      executorId: this.id,
      memory: () => this.device.info(),
      warmModels: () => [...this.warm.keys()],
    });
    const peerListen = this.options.peerListen ?? "127.0.0.1:0";
    if (peerListen) {
      this.peer = new PeerServer({
        sink: (jobId, step, tensors) => this.takeHandoff(jobId, step, tensors),
        // The stage cannot get its activations: it fails rather than wait for them for ever.
        refused: (jobId, message) => {
          const running = this.runs.get(jobId);
          if (!running) return;
          running.failure ??= new StatusError(
            grpcStatus.INVALID_ARGUMENT,
            `the previous pipeline stage's activations were refused: ${message}`,
          );
          cancelRunning(running);
        },
        token: this.options.token,
        tls: this.options.peerTls,
        log: this.log,
      });
      const bound = await this.peer.listen(peerListen);
      this.peerAddress = this.options.peerAdvertise || bound;
    }
    if (this.options.probe ?? true) {
      try {
        this.computeProbe = await probeCompute(this.addon, this.device);
      } catch (error) {
        // Not fatal: the scheduler calibrates from the first real job instead.
        this.log(`ferry executor ${this.id}: compute probe failed: ${(error as Error).message}`);
      }
    }
    this.connect();
  }

  private connect(): void {
    if (this.lifecycle !== "running") return;
    const stream = this.client.connect();
    this.stream = stream;
    this.outbound = new OutboundQueue(stream);
    stream.on("data", (message: ConnectResponse) => this.onMessage(message));
    const lost = (why: string) => {
      if (this.stream !== stream) return;
      this.stream = undefined;
      this.outbound = undefined;
      clearInterval(this.heartbeat);
      this.heartbeat = undefined;
      if (this.lifecycle !== "running") return;
      // The job keeps running: the scheduler learns of it (and of its result) on reconnect, and
      // cancels it there if it no longer wants it.
      this.log(`ferry executor ${this.id}: lost the scheduler (${why}); reconnecting`);
      this.reconnectTimer = setTimeout(() => this.connect(), this.reconnectDelayMs);
      this.reconnectDelayMs = Math.min(this.reconnectDelayMs * 2, 5000);
    };
    stream.on("error", (error: Error) => lost(error.message));
    stream.on("end", () => lost("stream ended"));
    stream.write(
      ConnectRequest.fromPartial({
        message: {
          $case: "register",
          value: {
            executorId: this.id,
            device: this.deviceInfo(),
            version: ferryVersion(),
            instance: this.instance,
            holdings: this.holdings(),
            peerAddress: this.peerAddress,
          },
        },
      }),
    );
  }

  private send(message: ConnectRequest["message"]): void {
    this.outbound?.send(message);
  }

  private onMessage(message: ConnectResponse): void {
    const body = message.message;
    if (!body) return;
    switch (body.$case) {
      case "registered": {
        this.reconnectDelayMs = 250;
        clearInterval(this.heartbeat);
        this.heartbeat = setInterval(() => {
          const holdings = this.holdings();
          this.send({ $case: "heartbeat", value: { freeBytes: holdings.freeBytes, holdings } });
        }, body.value.heartbeatIntervalMs || 1000);
        this.heartbeat.unref();
        this.log(`ferry executor ${this.id}: registered with ${this.options.scheduler}`);
        this.registeredResolve?.();
        // Results the scheduler may not have: it acknowledges each, and drops a repeat.
        for (const result of this.outbox.values()) {
          this.send({ $case: "jobUpdate", value: { update: { $case: "result", value: result } } });
        }
        break;
      }
      case "resultReceived":
        this.outbox.delete(body.value.jobId);
        break;
      case "loadModel":
        void this.loadModelCommand(body.value);
        break;
      case "unloadModel":
        void this.unloadModelCommand(body.value);
        break;
      case "runJob":
        void this.runJob(body.value);
        break;
      case "cancelRun": {
        const running = this.runs.get(body.value.jobId);
        if (running) cancelRunning(running);
        break;
      }
      case "setBudget":
        this.setBudgetCommand(body.value);
        break;
    }
  }

  /**
   * SetBudget: the device's budget first (idle cached weights over it are evicted at once), then
   * each running job listed gets its new plan, which it takes at its next step boundary.
   */
  private setBudgetCommand(command: SetBudgetCommand): void {
    try {
      const change = this.device.setBudget(command.budgetBytes);
      this.log(
        `ferry executor ${this.id}: budget ${change.budgetBytes} bytes (${change.evictedBytes} bytes of idle weights evicted, ${change.overBytes} over it until running jobs re-plan)`,
      );
      for (const { jobId, plan } of command.plans) {
        const running = this.runs.get(jobId);
        if (!running?.run || !plan) continue;
        running.run.swapPlan({
          segments: plan.segments.map((segment) => ({
            firstBase: segment.firstBase,
            lastBase: segment.lastBase,
            resident: segment.resident,
          })),
          slots: Math.max(1, plan.slots),
        });
      }
      this.commandDone(command.commandId);
    } catch (error) {
      const status = toStatusError(mapNativeError(error), this.log);
      this.commandDone(command.commandId, {
        code: statusName(status.code),
        message: status.message,
      });
    }
  }

  /**
   * Opens a model, or reuses the warm one (its host params cache included) if unchanged. Only a
   * regular file is opened (checked without blocking, so a FIFO cannot hang the executor).
   * `pin` keeps it open until UnloadModel.
   */
  private async openModel(path: string, pin = false): Promise<NativeModel> {
    const { fh, info } = await openRegularFile(path);
    await fh.close();
    const cached = this.warm.get(path);
    if (cached && cached.mtimeMs === info.mtimeMs && cached.size === info.size) {
      // Refresh its place in the LRU order.
      this.warm.delete(path);
      this.warm.set(path, { ...cached, pinned: cached.pinned || pin });
      return cached.model;
    }
    if (cached) {
      cached.model.dispose();
      this.warm.delete(path);
    }
    // Laid out for this device's memory (a GPU pads quantized rows), so a segment's host bytes
    // copy to a staging slot as they are.
    const model = await this.addon
      .openModel(path, { device: this.device })
      .catch((error: unknown) => {
        throw mapNativeError(error);
      });
    this.warm.set(path, { model, mtimeMs: info.mtimeMs, size: info.size, pinned: pin });
    const limit = this.options.maxWarmModels ?? 2;
    const unpinned = [...this.warm].filter(([, warm]) => !warm.pinned);
    for (const [oldPath, old] of unpinned.slice(0, Math.max(0, unpinned.length - limit))) {
      old.model.dispose();
      this.warm.delete(oldPath);
    }
    return model;
  }

  private commandDone(commandId: string, error?: { code: string; message: string }): void {
    this.send({
      $case: "commandDone",
      value: { commandId, error, holdings: this.holdings() },
    });
  }

  /**
   * LoadModel: open and pin the model; with a warm-up plan, run one step of batch 1 through it
   * (weights read eagerly into the host params cache; the plan's resident segments stay in the
   * device's residency cache, which staging slots keep across jobs). The scheduler sends it only
   * while no job runs here.
   */
  private async loadModelCommand(command: LoadModelCommand): Promise<void> {
    try {
      const busyWith = [...this.runs.keys()][0];
      if (busyWith) throw new Error(`executor ${this.id} is running job ${busyWith}`);
      const model = await this.openModel(command.modelPath, true);
      const plan = command.warmUp;
      if (plan) {
        const run = this.addon.startRun(this.device, model, {
          batch: 1,
          tokens: command.warmUpTokens || 64,
          contextTokens: command.warmUpContextTokens,
          steps: 1,
          seed: 0,
          segments: plan.segments.map((segment) => ({
            firstBase: segment.firstBase,
            lastBase: segment.lastBase,
            resident: segment.resident,
          })),
          execution: "pooled",
          slots: Math.max(1, plan.slots),
          paramsBackend: "cpu",
          load: "eager",
        });
        await run.done.catch((error: unknown) => {
          throw mapNativeError(error);
        });
      }
      this.commandDone(command.commandId);
    } catch (error) {
      const status = toStatusError(error, this.log);
      this.commandDone(command.commandId, {
        code: statusName(status.code),
        message: status.message,
      });
    }
  }

  /**
   * UnloadModel: close the model (its host params cache goes with it; a run using it keeps it
   * until the run ends) and free the device's resident weights. The addon's residency cache can
   * only be cleared whole, so other models' resident segments go too (they are re-copied on
   * their next job).
   */
  private async unloadModelCommand(command: UnloadModelCommand): Promise<void> {
    const warm = this.warm.get(command.modelPath);
    if (warm) {
      warm.model.dispose();
      this.warm.delete(command.modelPath);
    }
    try {
      this.device.clearResidency();
    } catch (error) {
      this.log(`ferry executor ${this.id}: clearing residency: ${(error as Error).message}`);
    }
    this.commandDone(command.commandId);
  }

  /** Sends a job's final result and keeps it until the scheduler acknowledges it. */
  private deliverResult(result: JobResult): void {
    this.outbox.set(result.jobId, result);
    for (const jobId of this.outbox.keys()) {
      if (this.outbox.size <= OUTBOX_LIMIT) break;
      this.outbox.delete(jobId);
    }
    this.send({ $case: "jobUpdate", value: { update: { $case: "result", value: result } } });
  }

  /** A pipeline handoff from the previous stage's executor, for a stage job of this one. */
  private takeHandoff(jobId: string, step: number, tensors: HandoffTensors): void {
    const run = this.runs.get(jobId)?.run;
    if (run) {
      run.deliver(step, tensors);
      return;
    }
    if (!this.pendingHandoffs.add(jobId, step, tensors)) {
      this.log(
        `ferry executor ${this.id}: dropped a handoff for job ${jobId} (step ${step}): ${this.pendingHandoffs.heldBytes} bytes already wait for jobs that have not started`,
      );
    }
  }

  /** The stream a stage job hands its activations to the next stage over. */
  private stageSender(stage: PipelineStage, current: RunningJob): HandoffSender {
    if (!stage.nextPeerAddress || !stage.nextJobId) {
      throw Object.assign(
        new Error(`pipeline stage ${stage.index} has no next stage to hand its activations to`),
        { name: "InvalidArgumentError" },
      );
    }
    return new HandoffSender(
      stage.nextPeerAddress,
      stage.nextJobId,
      channelCredentials(this.options.tls),
      this.options.token,
      (message) => {
        // The next stage cannot take this stage's activations: the job cannot go on this way.
        current.failure ??= new StatusError(
          grpcStatus.UNAVAILABLE,
          `pipeline stage ${stage.index}: the next stage's executor (${message})`,
        );
        cancelRunning(current);
      },
      this.options.peerTlsName,
    );
  }

  private async runJob(request: RunJob): Promise<void> {
    const { jobId, spec, plan, stage } = request;
    if (this.runs.has(jobId)) return; // a repeated RunJob for a job already running here
    const current: RunningJob = { jobId, run: undefined, cancelled: false };
    this.runs.set(jobId, current);
    const spans =
      this.options.stepSpans === false
        ? undefined
        : new StepSpanRecorder(contextFromTraceparent(request.traceparent), {
            jobId,
            policy: plan?.policy || spec?.policy || "",
            device: this.device.info().name,
          });
    const steps = new StepHistory();
    const started = performance.now();
    let sender: HandoffSender | undefined;
    try {
      if (!spec || !plan) throw new Error("RunJob without a spec or a plan");
      const model = await this.openModel(spec.modelPath);
      if (current.cancelled)
        throw Object.assign(new Error("cancelled"), { name: "CancelledError" });
      const names = model.info().baseSegments.map((segment) => segment.name);
      if (names.join(",") !== plan.baseSegmentNames.join(",")) {
        throw Object.assign(
          new Error(
            `the plan's base segments (${plan.baseSegmentNames.length}) do not match the model's (${names.length}); was the file changed?`,
          ),
          { name: "InvalidArgumentError" },
        );
      }
      this.metrics?.jobStarted(spec.modelPath, plan.residentBytes, plan.slots);
      // A pipeline stage: computes its base segments, handing activations to the next stage.
      const staged = stage !== undefined && stage.stages > 1;
      const lastStage = !staged || stage.index === stage.stages - 1;
      if (staged) sender = this.stageSender(stage, current);
      // A stage's step starts when its activations have arrived: the wait before it is a span.
      let waitFromUs = (performance.timeOrigin + performance.now()) * 1000;
      const run = this.addon.startRun(
        this.device,
        model,
        {
          batch: spec.batch || 1,
          tokens: spec.tokens || 64,
          contextTokens: spec.contextTokens,
          steps: spec.steps,
          seed: spec.seed,
          // A batch split's share: its generated inputs continue the whole batch's.
          firstSample: request.firstSample,
          guidance: spec.guidance,
          shift: spec.shift,
          inputs: inputsOf(spec.inputs),
          segments: plan.segments.map((segment) => ({
            firstBase: segment.firstBase,
            lastBase: segment.lastBase,
            resident: segment.resident,
          })),
          execution: executionOf(plan),
          slots: plan.slots,
          paramsBackend: jobOption(
            "params backend",
            spec.paramsBackend,
            PARAMS_BACKENDS,
            this.options.paramsBackend ?? "cpu",
          ),
          load: jobOption("load mode", spec.load, LOAD_MODES, this.options.load ?? "background"),
          verify: spec.verify,
          ...(staged ? { stage: { firstBase: stage.firstBase, lastBase: stage.lastBase } } : {}),
        },
        (report: NativeStepReport) => {
          if (staged && !(stage.index === 0 && report.step === 1)) {
            spans?.recordHandoffWait(report.step, waitFromUs, report.stepStartUs, stage.index);
          }
          waitFromUs = report.stepEndUs;
          spans?.record(report);
          this.metrics?.recordStep(report, plan.policy, plan.slots);
          const stats = stepStatsOf(report);
          // The result repeats every step's totals; the events went out with the progress.
          steps.push({ ...stats, events: [] });
          this.send({
            $case: "jobUpdate",
            value: {
              update: {
                $case: "progress",
                value: { jobId, steps: spec.steps, stats },
              },
            },
          });
        },
        staged ? (step, tensors) => sender?.send(step, tensors) : undefined,
      );
      current.run = run;
      for (const held of this.pendingHandoffs.take(jobId)) run.deliver(held.step, held.tensors);
      if (current.cancelled) run.cancel();
      this.send({ $case: "jobUpdate", value: { update: { $case: "started", value: { jobId } } } });
      const output = await run.done.catch((error: unknown) => {
        throw mapNativeError(current.failure ?? error);
      });
      sender?.close();
      // Only the last stage's latent is the job's output; the others' is a step behind.
      const bytes = lastStage
        ? Buffer.from(output.output.buffer, output.output.byteOffset, output.output.byteLength)
        : Buffer.alloc(0);
      this.deliverResult(
        JobResult.fromPartial({
          jobId,
          state: JobState.JOB_STATE_SUCCEEDED,
          checksum: createHash("sha256").update(bytes).digest("hex"),
          output: bytes,
          outputShape: lastStage ? output.shape : [],
          steps: steps.steps(),
          stepsOmitted: steps.omitted,
          totalSeconds: (performance.now() - started) / 1000,
          executorId: this.id,
        }),
      );
    } catch (error) {
      sender?.abort();
      const status = toStatusError(current.failure ?? error, this.log);
      const state =
        statusName(status.code) === "CANCELLED"
          ? JobState.JOB_STATE_CANCELLED
          : JobState.JOB_STATE_FAILED;
      this.sendResult(
        jobId,
        state,
        { code: statusName(status.code), message: status.message },
        steps.steps(),
        steps.omitted,
      );
    } finally {
      if (this.runs.get(jobId) === current) this.runs.delete(jobId);
    }
  }

  private sendResult(
    jobId: string,
    state: JobState,
    error: { code: string; message: string },
    steps: StepStats[] = [],
    stepsOmitted = 0,
  ): void {
    this.deliverResult(
      JobResult.fromPartial({ jobId, state, error, steps, stepsOmitted, executorId: this.id }),
    );
  }

  /** running → draining → stopped: finish (or after `graceMs`, cancel) the jobs, then dispose. */
  async stop(graceMs = 5000): Promise<void> {
    if (this.lifecycle === "stopped" || this.lifecycle === "draining") return;
    this.lifecycle = "draining";
    clearTimeout(this.reconnectTimer);
    const deadline = Date.now() + graceMs;
    while (this.runs.size > 0 && Date.now() < deadline) {
      await new Promise((resolveWait) => setTimeout(resolveWait, 20));
    }
    if (this.runs.size > 0) {
      for (const running of this.runs.values()) cancelRunning(running);
      while (this.runs.size > 0) await new Promise((resolveWait) => setTimeout(resolveWait, 20));
    }
    clearInterval(this.heartbeat);
    this.stream?.end();
    this.stream = undefined;
    this.outbound = undefined;
    this.client.close();
    this.peer?.stop();
    for (const { model } of this.warm.values()) model.dispose();
    this.warm.clear();
    this.device.dispose();
    this.lifecycle = "stopped";
  }
}

/** A job running here: its native run once started, and whether it was asked to stop. */
interface RunningJob {
  jobId: string;
  run: NativeRun | undefined;
  cancelled: boolean;
  /** Why the run was stopped when it was not asked to (a pipeline's next stage went away). */
  failure?: StatusError;
}

function cancelRunning(running: RunningJob): void {
  running.cancelled = true;
  running.run?.cancel();
}

function stepStatsOf(report: NativeStepReport): StepStats {
  const seconds = (event: { startUs: number; endUs: number }) =>
    (event.endUs - event.startUs) / 1e6;
  const total = (kind: string) =>
    report.events.filter((event) => event.kind === kind).reduce((sum, e) => sum + seconds(e), 0);
  const segments = report.events
    .filter((event) => event.kind === "segment")
    .map((segment) => {
      const own = report.events.filter(
        (e) => e.segment === segment.segment && e.kind !== "segment",
      );
      const part = (kind: string) =>
        own.filter((e) => e.kind === kind).reduce((sum, e) => sum + seconds(e), 0);
      return {
        index: segment.segment,
        h2dBytes: own.filter((e) => e.kind === "h2d").reduce((sum, e) => sum + e.bytes, 0),
        h2dSeconds: part("h2d"),
        computeSeconds: part("compute"),
        prepareSeconds: part("prepare_params"),
        source: segment.source ?? "",
      };
    });
  return {
    step: report.step,
    stepSeconds: (report.stepEndUs - report.stepStartUs) / 1e6,
    prepareSeconds: total("prepare_params"),
    h2dSeconds: total("h2d"),
    computeSeconds: total("compute"),
    h2dBytes: report.h2dBytes,
    diskBytes: report.diskBytes,
    arenaPeakBytes: report.arenaPeakBytes,
    segments,
    stallSeconds: report.stallUs / 1e6,
    // Native times carry fractions of a µs; the wire's int64 fields take whole ones.
    startUs: Math.round(report.stepStartUs),
    endUs: Math.round(report.stepEndUs),
    // Every event, reads ahead of use included: timelines are drawn from these.
    events: report.events.map((event) => ({
      kind: event.kind,
      segment: event.segment,
      startUs: Math.round(event.startUs),
      endUs: Math.round(event.endUs),
      bytes: event.bytes,
      source: event.source ?? "",
      cold: event.cold ?? false,
      stallUs: Math.round(event.stallUs ?? 0),
    })),
  };
}

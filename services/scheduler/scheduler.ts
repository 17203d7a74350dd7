import { createHash, randomUUID } from "node:crypto";
import { status } from "@grpc/grpc-js";
import { ROOT_CONTEXT, SpanStatusCode, trace, type Context, type Span } from "@opentelemetry/api";
import {
  JobInfo,
  JobProgress,
  JobResult,
  JobState,
  SubmitJobRequest,
  type MultiGpuChoice,
  type InputTensor,
  type PipelineStage,
  type ConnectRequest,
  type DeviceInfo,
  type ExecutorInfo,
  type Holdings,
  type JobSpec,
  type JobUpdate,
  type ModelInfo,
  type Plan as PlanMessage,
  type Register,
} from "../../gen/ferry/v1/scheduler";
import { planJob } from "../../lib/planner/planJob";
import { KNOWN_POLICIES } from "../../lib/planner/planJob";
import type { DeviceProfile, PlanOptions, PolicyName } from "../../lib/planner/types";
import { ferryTracer, traceparentOf } from "../../lib/telemetry/api";
import {
  CLIENT_MESSAGE_LIMIT,
  PROGRESS_MESSAGE_LIMIT,
  MAX_BATCH,
  MAX_DEVICE_BYTES,
  MAX_ID_LENGTH,
  MAX_OUTPUT_BYTES,
  MAX_PAGE_SIZE,
  MAX_PRIORITY,
  MAX_RATE,
  MAX_STEPS,
  MAX_THREADS,
  MAX_TOKENS,
  MAX_VRAM_GIB,
  DEFAULT_PAGE_SIZE,
} from "../../lib/wire/limits";

/** |guidance|: FLUX.1-dev is run at 1–10; anything far outside is a mistake. */
const MAX_GUIDANCE = 1000;
/** An executor's peer address (HOST:PORT) at most. */
const MAX_ADDRESS_LENGTH = 256;
import { checkDecoded } from "../../lib/wire/decoding";
import {
  checkInputBytes,
  checkJobInputs,
  jobInputSpecs,
  resolvedContextTokens,
} from "../../lib/model/jobInputs";
import { boundSteps } from "../../lib/wire/stepHistory";
import { SchedulerMetrics } from "./schedulerMetrics";
import { StatusError, statusName, toStatusError } from "../../lib/wire/statusError";
import {
  checkChoice,
  checkInteger,
  checkNumber,
  checkString,
  ID_PATTERN,
  quote,
} from "../../lib/wire/validate";
import {
  ExecutorEntry,
  planClaimBytes,
  type ExecutorCommand,
  type ExecutorStream,
} from "./executors";
import { Job, JobQueue, type ResolvedJobSpec } from "./jobs";
import { JobStore, type JobRow } from "./jobStore";
import { ModelRepository, type ResolvedModel } from "./modelRepository";
import { ASSUMED_DISK_GBPS, choosePlacement, type PlacementCandidate } from "./placement";
import { planToMessage } from "./planProto";
import {
  chooseMultiGpu,
  HandoffCalibration,
  handoffBytesOf,
  PEER_HANDOFF_GBPS,
  MAX_SPLIT,
  MULTI_GPU_MODES,
  possibleShareSizes,
  type MultiGpuDecision,
  type MultiGpuMode,
  type SplitCandidate,
} from "./multiGpu";
import { predictedFinishS } from "./placement";
import type { ModelHeader } from "../../lib/model/modelFile";
import type { ModelProfile } from "../../lib/model/profile";

/** Queued jobs a placement pass tries behind ones that must wait (at least; 2 per executor). */
const PLACEMENT_BACKFILL_MIN = 16;

export const DEFAULT_TOKENS = 64;
/** A placement estimate is reused this long (plans move only as calibration refines rates). */
const ESTIMATE_TTL_MS = 1000;
/** Finished jobs are swept at most this often. */
const SWEEP_INTERVAL_MS = 5000;
/**
 * Steps whose events a job keeps: the status page draws a job's first steps, and keeping every
 * step's events would grow the scheduler's memory with the length of a job.
 */
const TIMELINE_STEPS_KEPT = 16;
/** A ListJobs page stops short of this many bytes (a stock client accepts 4 MiB). */
const LIST_RESPONSE_BYTES = CLIENT_MESSAGE_LIMIT - 64 * 1024;

/**
 * A progress event as watchers get it: within PROGRESS_MESSAGE_LIMIT, its step's events and
 * then its per-segment figures dropped when an executor sends more (the totals stay).
 */
function fitProgress(progress: JobProgress): JobProgress {
  const stats = progress.stats;
  if (!stats || JobProgress.encode(progress).finish().length <= PROGRESS_MESSAGE_LIMIT) {
    return progress;
  }
  const lean = { ...progress, stats: { ...stats, events: [] } };
  if (JobProgress.encode(lean).finish().length <= PROGRESS_MESSAGE_LIMIT) return lean;
  return { ...progress, stats: { ...stats, events: [], segments: [] } };
}

export interface SchedulerOptions {
  /** How often executors heartbeat. @default 1000 */
  heartbeatIntervalMs?: number;
  /**
   * An executor silent (or disconnected) for this many intervals is lost: its running job is
   * re-queued or failed. @default 5
   */
  heartbeatMissLimit?: number;
  /** Where jobs are kept. @default an in-memory database (nothing survives the process) */
  store?: JobStore;
  /** The model repository. @default none: every job is refused until one is configured */
  models?: ModelRepository;
  /** Finished jobs (and lost executors) are kept this long, then dropped. @default 3_600_000 */
  retentionMs?: number;
  /**
   * Times a job is started before a lost executor fails it instead of re-queueing it.
   * @default 3
   */
  maxAttempts?: number;
  /** Jobs that may wait in the queue at once; more are refused with RESOURCE_EXHAUSTED. @default 10_000 */
  maxQueuedJobs?: number;
  log?: (line: string) => void;
}

interface Estimate {
  atMs: number;
  plan: PlanMessage;
  segmentFlops: number[];
  /** Predicted seconds of the whole run. */
  runS: number;
}

export interface SubmitOutcome {
  job: Job;
  /** An earlier submit with the same idempotency key created the job. */
  existing: boolean;
  /** The plan it runs with, or while queued the one placement would give it now. */
  plan: PlanMessage | undefined;
  executorId: string;
  device: DeviceInfo | undefined;
}

const DONE_STATES = new Set([
  JobState.JOB_STATE_SUCCEEDED,
  JobState.JOB_STATE_FAILED,
  JobState.JOB_STATE_CANCELLED,
]);

/**
 * The scheduler's state and rules, independent of gRPC: the executor registry, the job queue,
 * placement, planning and durable state.
 *
 * Jobs wait in one queue, by priority then submission. Whenever something changes (a job
 * arrives, an executor registers or finishes), a placement pass walks the queue and starts each
 * job on the executor placement.ts chooses, or leaves it waiting for a busy one that will finish
 * it sooner. Each executor runs one job at a time.
 */
export class Scheduler {
  private readonly executors = new Map<string, ExecutorEntry>();
  private readonly jobs = new Map<string, Job>();
  private readonly byKey = new Map<string, Job>();
  private readonly queue = new JobQueue();
  private readonly estimates = new Map<string, Estimate>();
  /** What a pipeline handoff costs, learnt from the pipelines that ran. */
  private readonly handoffs = new HandoffCalibration();
  private readonly preparing = new Set<Job>();
  readonly store: JobStore;
  readonly models: ModelRepository | undefined;
  private readonly heartbeatIntervalMs: number;
  private readonly lostAfterMs: number;
  private readonly retentionMs: number;
  private readonly maxAttempts: number;
  private readonly maxQueuedJobs: number;
  private readonly log: (line: string) => void;
  private readonly monitor: NodeJS.Timeout;
  private readonly startedMs = Date.now();
  private lastSweepMs = 0;
  private readonly tickIntervalMs: number;
  private lastTickMs: number;
  private seq: number;
  private passQueued = false;
  private lifecycle: "running" | "draining" | "stopped" = "running";
  private readonly metrics: SchedulerMetrics;

  constructor(options: SchedulerOptions = {}) {
    this.heartbeatIntervalMs = options.heartbeatIntervalMs ?? 1000;
    this.lostAfterMs = this.heartbeatIntervalMs * (options.heartbeatMissLimit ?? 5);
    this.retentionMs = options.retentionMs ?? 3_600_000;
    this.maxAttempts = options.maxAttempts ?? 3;
    this.maxQueuedJobs = options.maxQueuedJobs ?? 10_000;
    this.log = options.log ?? ((line) => console.error(line));
    this.store = options.store ?? new JobStore(":memory:");
    this.models = options.models;
    this.seq = this.store.maxSeq();
    // Before restore(): a restored job may finish at once, and finishing counts in the metrics.
    this.metrics = new SchedulerMetrics({
      jobs: () => this.allJobs(),
      executorIds: () => [...this.executors.keys()],
    });
    this.restore();
    this.tickIntervalMs = Math.min(this.heartbeatIntervalMs, 1000);
    this.lastTickMs = Date.now();
    // The heartbeat deadline is judged in the check phase (setImmediate), after the event loop
    // has read what arrived: a timer that fires right after the scheduler itself was busy would
    // otherwise blame executors whose messages sit unread in its sockets.
    this.monitor = setInterval(() => setImmediate(() => this.tick()), this.tickIntervalMs);
    this.monitor.unref();
  }

  get durable(): boolean {
    return this.store.path !== ":memory:";
  }

  // ---- restore ----

  /** Jobs from the store: queued ones queue again; running ones wait for their executor. */
  private restore(): void {
    let queued = 0;
    let running = 0;
    for (const row of this.store.loadAll()) {
      const job = new Job(row);
      this.jobs.set(job.id, job);
      if (job.idempotencyKey) this.byKey.set(job.idempotencyKey, job);
      if (job.state === JobState.JOB_STATE_QUEUED) {
        this.queue.push(job);
        queued++;
      } else if (job.state === JobState.JOB_STATE_RUNNING) {
        running++;
      }
      if (!job.finished) job.span = this.jobSpan(job, ROOT_CONTEXT, true);
    }
    if (queued + running > 0) {
      this.log(
        `ferry scheduler: restored ${queued} queued and ${running} running jobs from ${this.store.path}; running jobs wait ${this.lostAfterMs} ms for their executors to report back`,
      );
    }
  }

  // ---- executors ----

  /** Handles one executor's Connect stream for its whole life. */
  attachExecutor(stream: ExecutorStream): void {
    let entry: ExecutorEntry | undefined;
    stream.on("data", (request: ConnectRequest) => {
      const message = request?.message;
      try {
        checkDecoded(request);
        if (!message) return;
        if (message.$case === "register") {
          if (entry) return;
          entry = this.register(stream, message.value);
          return;
        }
        if (!entry) {
          throw new StatusError(status.FAILED_PRECONDITION, "send Register before anything else");
        }
        // A stream replaced by a newer one of the same executor is only heard until it closes.
        if (entry.stream !== stream) return;
        entry.lastSeenMs = Date.now();
        if (message.$case === "heartbeat") {
          const wasIdle = entry.idle;
          this.updateHoldings(entry, message.value.holdings, message.value.freeBytes);
          // It no longer runs jobs the scheduler did not place (stages of an abandoned
          // pipeline winding down, a job from before a restart): queued jobs may start there.
          if (!wasIdle && entry.idle) this.schedulePass();
        } else if (message.$case === "jobUpdate") {
          this.onJobUpdate(entry, message.value);
        } else if (message.$case === "commandDone") {
          this.onCommandDone(entry, message.value);
        }
      } catch (error) {
        if (!entry || error instanceof StatusError) {
          stream.emit("error", toStatusError(error, this.log));
        } else {
          this.log(`ferry scheduler: bad message from executor ${entry.id}: ${String(error)}`);
        }
      }
    });
    const detach = () => {
      if (entry && entry.stream === stream) this.disconnect(entry);
    };
    stream.on("end", () => {
      detach();
      stream.end();
    });
    stream.on("error", detach);
    stream.on("cancelled", detach);
    stream.on("close", detach);
  }

  private validDevice(device: DeviceInfo | undefined): DeviceInfo {
    if (!device)
      throw new StatusError(status.INVALID_ARGUMENT, "Register must describe the device");
    checkString("device.name", device.name, 256);
    checkChoice("device.kind", device.kind, ["cpu", "cuda"], false);
    checkInteger("device.total_bytes", device.totalBytes, 1, MAX_DEVICE_BYTES);
    checkInteger("device.free_bytes", device.freeBytes, 0, MAX_DEVICE_BYTES);
    checkNumber("device.h2d_gbps", device.h2dGbps, 0, MAX_RATE);
    checkInteger("device.threads", device.threads, 0, MAX_THREADS);
    checkNumber("device.tflops", device.tflops, 0, MAX_RATE);
    checkNumber("device.dispatch_us", device.dispatchUs, 0, MAX_RATE);
    return device;
  }

  private register(stream: ExecutorStream, request: Register): ExecutorEntry {
    checkString("executor_id", request.executorId, MAX_ID_LENGTH, ID_PATTERN);
    checkString("instance", request.instance, MAX_ID_LENGTH);
    checkString("version", request.version, MAX_ID_LENGTH);
    checkString("peer_address", request.peerAddress, MAX_ADDRESS_LENGTH);
    const device = this.validDevice(request.device);
    if (this.lifecycle !== "running") {
      throw new StatusError(status.UNAVAILABLE, "the scheduler is shutting down");
    }
    const id = request.executorId || `executor-${randomUUID().slice(0, 8)}`;
    const instance = request.instance || randomUUID();
    let entry = this.executors.get(id);
    if (entry?.connected && entry.stream !== stream && entry.instance !== instance) {
      throw new StatusError(
        status.ALREADY_EXISTS,
        `executor id ${quote(id)} is held by a connected executor; give this one another --id`,
      );
    }
    const previous = entry?.stream;
    const newInstance = entry !== undefined && entry.instance !== instance;
    if (!entry) {
      entry = new ExecutorEntry(id, device);
      this.executors.set(id, entry);
    }
    if (newInstance) entry.measurements.length = 0;
    entry.instance = instance;
    entry.device = device;
    entry.peerAddress = request.peerAddress;
    entry.stream = stream;
    entry.state = "connected";
    entry.lastSeenMs = Date.now();
    // The same process reconnecting on a new stream: the old one is closed and no longer heard.
    if (previous && previous !== stream) previous.end();
    entry.send({
      $case: "registered",
      value: { executorId: id, heartbeatIntervalMs: this.heartbeatIntervalMs },
    });
    this.updateHoldings(entry, request.holdings, device.freeBytes);
    this.log(
      `ferry scheduler: executor ${id} registered (${device.name}, ${device.totalBytes} bytes${newInstance ? ", a new instance" : ""})`,
    );
    this.reconcile(entry, request.holdings);
    this.schedulePass();
    return entry;
  }

  /**
   * After a (re)registration: jobs the scheduler has running there that the executor no longer
   * runs (nor holds a result for) are re-queued; jobs it runs that are not its to run are
   * cancelled on it.
   */
  private reconcile(entry: ExecutorEntry, holdings: Holdings | undefined): void {
    const reported = new Set(holdings?.runningJobIds ?? []);
    const held = new Set(holdings?.heldResultJobIds ?? []);
    for (const job of [...this.jobs.values()]) {
      if (job.state !== JobState.JOB_STATE_RUNNING || job.executorId !== entry.id) continue;
      // A split job runs as its shares (each reconciled on its own executor).
      if (job.shares) continue;
      if (reported.has(job.id) || held.has(job.id)) {
        entry.running.add(job);
        if (!job.profile) void this.prepare(job);
      } else {
        entry.running.delete(job);
        this.requeueOrFail(
          job,
          `executor ${entry.id} came back without the job (it restarted while running it)`,
        );
      }
    }
    for (const id of new Set([...reported, ...held])) {
      const job = this.jobs.get(id);
      if (job && entry.running.has(job)) continue;
      // Re-queued while its executor was away, and not started elsewhere yet: it still runs
      // here (or its result is on its way), so it carries on here.
      if (
        job &&
        job.state === JobState.JOB_STATE_QUEUED &&
        job.executorId === entry.id &&
        !job.cancelRequested &&
        this.queue.remove(job)
      ) {
        job.state = JobState.JOB_STATE_RUNNING;
        entry.running.add(job);
        this.save(job);
        this.log(
          `ferry scheduler: job ${job.id} carries on where it ran: executor ${entry.id} still has it`,
        );
        if (!job.profile) void this.prepare(job);
        continue;
      }
      if (reported.has(id)) entry.send({ $case: "cancelRun", value: { jobId: id } });
    }
  }

  private updateHoldings(
    entry: ExecutorEntry,
    holdings: Holdings | undefined,
    freeBytes: number,
  ): void {
    if (!holdings) {
      entry.holdings.freeBytes = freeBytes;
      return;
    }
    entry.holdings = {
      ...holdings,
      models: holdings.models.slice(0, 256),
      runningJobIds: holdings.runningJobIds.slice(0, 64),
      heldResultJobIds: holdings.heldResultJobIds.slice(0, 64),
    };
    entry.device = { ...entry.device, freeBytes: holdings.freeBytes };
    if (holdings.budgetBytes > 0) entry.budgetBytes = holdings.budgetBytes;
  }

  private disconnect(entry: ExecutorEntry): void {
    entry.stream = undefined;
    if (entry.state !== "connected") return;
    entry.state = "disconnected";
    this.log(
      `ferry scheduler: executor ${entry.id} disconnected; its jobs stay assigned for ${this.lostAfterMs} ms`,
    );
    this.failCommands(entry, "disconnected");
  }

  private failCommands(entry: ExecutorEntry, why: string): void {
    const commands = [...entry.commands.splice(0)];
    if (entry.commandInFlight) commands.push(entry.commandInFlight);
    entry.commandInFlight = undefined;
    for (const command of commands) {
      command.reject(new StatusError(status.UNAVAILABLE, `executor ${entry.id} ${why}`));
    }
  }

  private markLost(entry: ExecutorEntry, why: string): void {
    entry.state = "lost";
    entry.lostAtMs = Date.now();
    const stream = entry.stream;
    entry.stream = undefined;
    this.log(`ferry scheduler: executor ${entry.id} lost: ${why}`);
    stream?.emit("error", new StatusError(status.DEADLINE_EXCEEDED, "no heartbeat; reconnect"));
    this.failCommands(entry, "was lost");
    for (const job of [...entry.running]) {
      entry.running.delete(job);
      this.requeueOrFail(
        job,
        `executor ${entry.id} ${why} while running the job (after step ${job.lastStep} of ${job.spec.steps})`,
      );
    }
    for (const job of [...this.queue]) {
      if (job.spec.executorId === entry.id) {
        this.queue.remove(job);
        this.finishJob(
          job,
          JobState.JOB_STATE_FAILED,
          status.UNAVAILABLE,
          `executor ${entry.id} the job asked for was lost`,
        );
      }
    }
  }

  /** The heartbeat deadline, orphaned jobs after a restart, and retention. */
  private tick(): void {
    if (this.lifecycle === "stopped") return;
    const now = Date.now();
    // Time this process did not listen (its event loop was blocked: a burst of messages, a long
    // GC, a starved CPU) is not silence from executors: their deadlines move by as much.
    const stalledMs = now - this.lastTickMs - 2 * this.tickIntervalMs;
    this.lastTickMs = now;
    if (stalledMs > 0) {
      for (const entry of this.executors.values()) {
        if (entry.state !== "lost") entry.lastSeenMs = Math.min(now, entry.lastSeenMs + stalledMs);
      }
    }
    const deadline = now - this.lostAfterMs;
    for (const entry of [...this.executors.values()]) {
      if (entry.state !== "lost" && entry.lastSeenMs < deadline) {
        this.markLost(
          entry,
          entry.state === "connected"
            ? "stopped heartbeating"
            : "disconnected and did not come back",
        );
      } else if (entry.state === "lost" && entry.lostAtMs < now - this.retentionMs) {
        this.executors.delete(entry.id);
      }
    }
    if (this.startedMs < deadline) {
      for (const job of [...this.jobs.values()]) {
        if (job.state !== JobState.JOB_STATE_RUNNING || job.shares) continue;
        const entry = this.executors.get(job.executorId);
        if (entry && entry.state !== "lost") continue;
        if (entry?.running.has(job)) continue;
        this.requeueOrFail(
          job,
          `the scheduler restarted while the job ran on executor ${job.executorId}, which did not report back within ${this.lostAfterMs} ms`,
        );
      }
    }
    if (now - this.lastSweepMs >= Math.min(SWEEP_INTERVAL_MS, this.retentionMs)) {
      this.lastSweepMs = now;
      this.sweep(now);
    }
  }

  /** Drops finished jobs whose retention has passed, from memory and the store. */
  private sweep(now: number): void {
    const before = now - this.retentionMs;
    for (const id of this.store.expire(before)) this.forget(id);
    for (const job of [...this.jobs.values()]) {
      if (job.finished && job.finishedMs < before) this.forget(job.id);
    }
  }

  private forget(id: string): void {
    const job = this.jobs.get(id);
    if (!job) return;
    this.jobs.delete(id);
    if (job.idempotencyKey && this.byKey.get(job.idempotencyKey) === job) {
      this.byKey.delete(job.idempotencyKey);
    }
  }

  listExecutors(): ExecutorInfo[] {
    const nameOf = (path: string) => this.models?.nameOf(path) ?? path;
    return [...this.executors.values()]
      .sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0))
      .map((entry) => entry.info(nameOf));
  }

  /** The executor's device as registered, for responses. */
  deviceOf(executorId: string): DeviceInfo | undefined {
    return this.executors.get(executorId)?.device;
  }

  calibratedDeviceOf(executorId: string): DeviceInfo | undefined {
    return this.executors.get(executorId)?.info((path) => path).calibrated;
  }

  // ---- jobs ----

  /** Every job the scheduler holds (queued, running, finished), oldest first. */
  allJobs(): Job[] {
    return [...this.jobs.values()].filter((job) => !job.parent).sort((a, b) => a.seq - b.seq);
  }

  /** Validates a spec's fields and fills in the defaults (the model is resolved separately). */
  resolveSpec(spec: JobSpec | undefined): ResolvedJobSpec {
    if (!spec) throw new StatusError(status.INVALID_ARGUMENT, "the request has no job spec");
    if (!spec.modelPath) throw new StatusError(status.INVALID_ARGUMENT, "model_path is required");
    checkInteger("steps", spec.steps, 1, MAX_STEPS);
    checkInteger("batch", spec.batch, 0, MAX_BATCH);
    checkInteger("tokens", spec.tokens, 0, MAX_TOKENS);
    checkInteger("seed", spec.seed, 0, Number.MAX_SAFE_INTEGER);
    if (spec.maxVramGib !== undefined) {
      checkNumber("max_vram_gib", spec.maxVramGib, -MAX_VRAM_GIB, MAX_VRAM_GIB);
    }
    const policy = checkChoice("policy", spec.policy, KNOWN_POLICIES) || "sdcpp";
    checkChoice("params backend", spec.paramsBackend, ["cpu", "disk"]);
    checkChoice("load mode", spec.load, ["lazy", "eager", "background"]);
    checkString("executor_id", spec.executorId, MAX_ID_LENGTH, ID_PATTERN);
    checkInteger("context_tokens", spec.contextTokens, 0, MAX_TOKENS);
    if (spec.guidance !== undefined) {
      checkNumber("guidance", spec.guidance, -MAX_GUIDANCE, MAX_GUIDANCE);
    }
    try {
      checkInputBytes(spec.inputs);
    } catch (error) {
      throw new StatusError(status.INVALID_ARGUMENT, (error as Error).message);
    }
    checkChoice("multi_gpu", spec.multiGpu ?? "", MULTI_GPU_MODES);
    return {
      ...spec,
      policy,
      batch: spec.batch || 1,
      tokens: spec.tokens || DEFAULT_TOKENS,
    };
  }

  private requireModels(): ModelRepository {
    if (!this.models) {
      throw new StatusError(
        status.FAILED_PRECONDITION,
        "the scheduler has no model repository: start it with --model-dir DIR (repeatable)",
      );
    }
    return this.models;
  }

  /** Resolves the job's model and reads its base segments; the output must fit a message. */
  private async loadModelFor(spec: ResolvedJobSpec): Promise<{
    model: ResolvedModel;
    profile: Job["profile"];
    shareProfiles: Map<number, ModelProfile>;
    minShare: number;
  }> {
    const models = this.requireModels();
    const model = await models.resolve(spec.modelPath);
    const header = await models.header(model);
    // FLUX's text tokens default to 512; the executor runs the job with the resolved number.
    spec.contextTokens = resolvedContextTokens(header, spec.contextTokens);
    const job = { batch: spec.batch, tokens: spec.tokens, contextTokens: spec.contextTokens };
    const inputs = jobInputSpecs(header, job);
    const latent = inputs.find((input) => input.role === "latent");
    const outputBytes = 4 * (latent?.shape.reduce((a, b) => a * b, 1) ?? 0);
    if (outputBytes > MAX_OUTPUT_BYTES) {
      throw new StatusError(
        status.INVALID_ARGUMENT,
        `the output would be ${outputBytes} bytes (float32 [${latent!.shape.join(", ")}]); at most ${MAX_OUTPUT_BYTES}`,
      );
    }
    checkJobInputs(inputs, spec.inputs);
    const profile = await models.profile(model, spec.batch, spec.tokens, spec.contextTokens);
    // The base segments of every share a batch split of this job may use, measured now: the
    // placement pass that decides on a split cannot wait for native measurements. (A share's
    // generated inputs continue the whole batch's, RunJob.first_sample; inputs sent with the
    // job are cut by sample.)
    const shareProfiles = new Map<number, ModelProfile>();
    const minShare = minShareSamples(header);
    if (multiGpuMode(spec) !== "single" && multiGpuMode(spec) !== "pipeline") {
      for (const samples of possibleShareSizes(spec.batch, MAX_SPLIT, minShare)) {
        shareProfiles.set(
          samples,
          await models.profile(model, samples, spec.tokens, spec.contextTokens),
        );
      }
    }
    return { model, profile, shareProfiles, minShare };
  }

  /** A queued or restored job's model and profile, read again (the file may have changed). */
  private async prepare(job: Job): Promise<void> {
    if (this.preparing.has(job)) return;
    this.preparing.add(job);
    try {
      const { model, profile, shareProfiles, minShare } = await this.loadModelFor({
        ...job.spec,
        modelPath: job.modelRef,
      });
      job.model = model;
      job.profile = profile;
      for (const [samples, shareProfile] of shareProfiles) {
        job.shareProfiles.set(samples, shareProfile);
      }
      job.minShareSamples = minShare;
      job.spec = { ...job.spec, modelPath: model.path };
      if (job.plan && job.segmentFlops.length === 0) {
        job.segmentFlops = job.plan.segments.map((segment) =>
          profile!.segments
            .slice(segment.firstBase, segment.lastBase + 1)
            .reduce((sum, base) => sum + base.flops, 0),
        );
      }
    } catch (error) {
      if (job.finished) return;
      const err = toStatusError(error, this.log);
      // A running job may still finish on its executor; a queued one cannot start any more.
      if (!this.queue.remove(job)) {
        this.log(`ferry scheduler: job ${job.id}: ${err.message}`);
        return;
      }
      this.finishJob(
        job,
        JobState.JOB_STATE_FAILED,
        err.code,
        `cannot run the job any more: ${err.message}`,
      );
    } finally {
      this.preparing.delete(job);
      this.schedulePass();
    }
  }

  /**
   * The plan a job gets on an executor: against what is left of its budget beside the jobs
   * running there, or (`whole`) against all of it, as when the executor would be free.
   */
  private plan(
    job: Pick<Job, "spec" | "profile"> & { stage?: PipelineStage },
    entry: ExecutorEntry,
    whole = false,
  ): Estimate {
    return estimateOn(job, entry.plannedDevice(whole));
  }

  /**
   * The plan a job asked about would get on an executor: beside its running jobs when it fits in
   * what they leave, else with the whole budget once they are done (the job would queue).
   */
  private planBesideOrAfter(
    job: Pick<Job, "spec" | "profile">,
    entry: ExecutorEntry,
  ): { estimate: Estimate; beside: boolean } {
    try {
      return { estimate: this.plan(job, entry), beside: true };
    } catch (error) {
      if (entry.running.size === 0) throw error;
      return { estimate: this.plan(job, entry, true), beside: false };
    }
  }

  /** The plan a job would get on an executor, cached briefly; undefined when it cannot fit. */
  private estimate(job: Job, entry: ExecutorEntry, whole = false): Estimate | undefined {
    const s = job.spec;
    const free = whole ? entry.budgetBytes : entry.leftBytes();
    const key = `${entry.id}|${free}|${s.modelPath}|${job.model?.mtimeMs}|${s.batch}|${s.tokens}|${s.contextTokens}|${s.steps}|${s.policy}|${s.maxVramGib}|${s.noStream}`;
    const cached = this.estimates.get(key);
    if (cached && Date.now() - cached.atMs < ESTIMATE_TTL_MS) return cached;
    let estimate: Estimate | undefined;
    try {
      estimate = this.plan(job, entry, whole);
    } catch {
      estimate = undefined;
    }
    if (this.estimates.size > 4096) this.estimates.clear();
    if (estimate) this.estimates.set(key, estimate);
    return estimate;
  }

  private remainingS(entry: ExecutorEntry): number {
    if (entry.commandInFlight) return 1;
    let remaining = 0;
    const now = Date.now();
    for (const job of entry.running) {
      const predicted = job.spec.steps * (job.plan?.predictedStepS || 1e-3);
      const began = job.startedMs || job.dispatchedMs || now;
      remaining += Math.max(0, began / 1000 + predicted - now / 1000);
    }
    return remaining;
  }

  private candidates(
    job: Job,
    entries: Iterable<ExecutorEntry>,
    extraWaitS: ReadonlyMap<string, number> = new Map(),
  ): { candidate: PlacementCandidate; entry: ExecutorEntry }[] {
    const out: { candidate: PlacementCandidate; entry: ExecutorEntry }[] = [];
    for (const entry of entries) {
      if (!entry.connected) continue;
      if (job.spec.executorId && job.spec.executorId !== entry.id) continue;
      // It starts now if a plan fits in what is left beside the running jobs; else it would wait
      // for them, with a plan against the whole budget.
      const now = entry.canStart ? this.estimate(job, entry) : undefined;
      const estimate = now ?? this.estimate(job, entry, true);
      if (!estimate) continue;
      out.push({
        entry,
        candidate: {
          id: entry.id,
          idle: now !== undefined,
          warm: entry.isWarm(job.spec.modelPath),
          availableInS: now ? 0 : this.remainingS(entry) + (extraWaitS.get(entry.id) ?? 0),
          // Jobs sharing a device take turns computing on it: beside n others, a run stretches
          // about (n + 1)-fold.
          runS: now ? estimate.runS * (1 + entry.running.size) : estimate.runS,
          coldLoadS: (job.model?.bytes ?? 0) / (ASSUMED_DISK_GBPS * 1e9),
        },
      });
    }
    return out;
  }

  /** Runs a placement pass soon (once, however many changes ask for one meanwhile). */
  schedulePass(): void {
    if (this.passQueued) return;
    this.passQueued = true;
    setImmediate(() => {
      this.passQueued = false;
      this.placementPass();
    });
  }

  private placementPass(): void {
    if (this.lifecycle !== "running") return;
    for (const entry of this.executors.values()) {
      entry.waitingJobs = 0;
      this.sendNextCommand(entry);
    }
    // Several jobs may start on one executor in a pass: each is planned against what the ones
    // before it left.
    const open = [...this.executors.values()].filter((entry) => entry.canStart);
    if (open.length === 0) return;
    const extraWaitS = new Map<string, number>();
    // FIFO within a priority, with a little backfill: jobs behind ones that must wait are tried
    // only up to a window, so a pass costs O(window × executors) plans, not O(queue × executors)
    // — with thousands queued, every start or finish re-planning all of them stalled the service.
    const window = Math.max(PLACEMENT_BACKFILL_MIN, 2 * this.executors.size);
    let waiting = 0;
    for (const job of [...this.queue]) {
      if (!open.some((entry) => entry.canStart)) break;
      if (waiting >= window) break;
      if (!job.profile) {
        void this.prepare(job);
        continue;
      }
      const options = this.candidates(job, this.executors.values(), extraWaitS);
      const choice = choosePlacement(options.map((option) => option.candidate));
      if (this.splittable(job)) {
        const decision = this.multiGpuDecision(
          job,
          choice,
          choice && options.find((o) => o.candidate === choice)!.entry,
        );
        if (decision.mode !== "single") {
          this.startSplit(job, decision);
          continue;
        }
      }
      if (!choice) {
        waiting++;
        continue;
      }
      const entry = options.find((option) => option.candidate === choice)!.entry;
      if (choice.idle) {
        this.start(job, entry);
      } else {
        waiting++;
        entry.waitingJobs++;
        extraWaitS.set(entry.id, (extraWaitS.get(entry.id) ?? 0) + choice.runS);
      }
    }
  }

  private save(job: Job): void {
    // A share lives only in this process: after a restart its parent runs again.
    if (!job.parent) this.store.save(job);
  }

  /** A job the cost model may split across executors (by batch or as a pipeline). */
  private splittable(job: Job): boolean {
    return !job.parent && !job.spec.executorId && multiGpuMode(job.spec) !== "single";
  }

  /**
   * One executor or a batch split across the idle ones (of the kind `single` has, so every share
   * runs the same kernels), priced with each executor's calibrated cost model.
   */
  private multiGpuDecision(
    job: Pick<Job, "spec" | "profile" | "model" | "shareProfiles" | "minShareSamples">,
    single: PlacementCandidate | undefined,
    singleEntry: ExecutorEntry | undefined,
  ): MultiGpuDecision<PlanMessage> {
    const kind = singleEntry?.device.kind;
    const idleEntries = [...this.executors.values()]
      .filter((entry) => entry.idle && (kind === undefined || entry.device.kind === kind))
      .sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
    const coldLoadS = (entry: ExecutorEntry) =>
      entry.isWarm(job.spec.modelPath) ? 0 : (job.model?.bytes ?? 0) / (ASSUMED_DISK_GBPS * 1e9);
    const idle: SplitCandidate<PlanMessage>[] = (job.shareProfiles.size > 0 ? idleEntries : []).map(
      (entry) => ({
        id: entry.id,
        price: (samples: number) => {
          const estimate = this.shareEstimate(job, entry, samples);
          if (!estimate) return undefined;
          return { plan: estimate.plan, runS: estimate.runS, coldLoadS: coldLoadS(entry) };
        },
      }),
    );
    const mode = multiGpuMode(job.spec);
    const profile = job.profile!;
    // A pipeline saves transfers only: where the model fits the chosen executor, nothing streams
    // and a pipeline would only add handoffs (asked for one, it is still priced).
    const streams =
      singleEntry === undefined ||
      (this.estimate(job as Job, singleEntry, true)?.plan.streamedBytesPerStep ?? 1) > 0;
    const peers = idleEntries.filter((entry) => entry.peerAddress);
    const handoffBytes = handoffBytesOf(profile.segments);
    return chooseMultiGpu({
      mode,
      batch: job.spec.batch,
      single: single && { id: single.id, finishS: predictedFinishS(single), idle: single.idle },
      idle,
      baseSegments: profile.segments.length,
      minShareSamples: job.minShareSamples,
      pipeline: {
        baseBytes: profile.segments.map((segment) => segment.param_bytes),
        steps: job.spec.steps,
        handoffS: this.handoffs.latencyS + handoffBytes / (PEER_HANDOFF_GBPS * 1e9),
        candidates: peers.map((entry) => ({
          id: entry.id,
          price: (first: number, last: number) => {
            const estimate = this.stageEstimate(job, entry, first, last);
            if (!estimate) return undefined;
            return {
              plan: estimate.plan,
              stepS: estimate.runS / job.spec.steps,
              coldLoadS: coldLoadS(entry),
            };
          },
        })),
        unavailable:
          mode === "auto" && !streams
            ? "the model fits one executor without streaming; a pipeline would only add handoffs"
            : undefined,
      },
    });
  }

  /** The plan and predicted run of base segments first..last of the job on an executor. */
  private stageEstimate(
    job: Pick<Job, "spec" | "model" | "profile">,
    entry: ExecutorEntry,
    first: number,
    last: number,
  ): Estimate | undefined {
    const s = job.spec;
    const key = `stage|${entry.id}|${entry.budgetBytes}|${s.modelPath}|${job.model?.mtimeMs}|${s.batch}|${s.tokens}|${s.contextTokens}|${s.steps}|${s.policy}|${s.maxVramGib}|${s.noStream}|${first}|${last}`;
    const cached = this.estimates.get(key);
    if (cached && Date.now() - cached.atMs < ESTIMATE_TTL_MS) return cached;
    let estimate: Estimate | undefined;
    try {
      estimate = estimateOn(
        {
          spec: s,
          profile: job.profile,
          stage: {
            index: 0,
            stages: 0,
            firstBase: first,
            lastBase: last,
            nextPeerAddress: "",
            nextJobId: "",
          },
        },
        entry.plannedDevice(true),
      );
    } catch {
      estimate = undefined;
    }
    if (this.estimates.size > 4096) this.estimates.clear();
    if (estimate) this.estimates.set(key, estimate);
    return estimate;
  }

  /** The plan and predicted run of `samples` of the job on an executor (cached like estimate). */
  private shareEstimate(
    job: Pick<Job, "spec" | "model" | "shareProfiles">,
    entry: ExecutorEntry,
    samples: number,
  ): Estimate | undefined {
    const profile = job.shareProfiles.get(samples);
    if (!profile) return undefined;
    const s = job.spec;
    const key = `${entry.id}|${s.modelPath}|${job.model?.mtimeMs}|${samples}|${s.tokens}|${s.steps}|${s.policy}|${s.maxVramGib}|${s.noStream}`;
    const cached = this.estimates.get(key);
    if (cached && Date.now() - cached.atMs < ESTIMATE_TTL_MS) return cached;
    let estimate: Estimate | undefined;
    try {
      estimate = this.plan({ spec: { ...s, batch: samples }, profile }, entry);
    } catch {
      estimate = undefined;
    }
    if (this.estimates.size > 4096) this.estimates.clear();
    if (estimate) this.estimates.set(key, estimate);
    return estimate;
  }

  /**
   * Runs a job split across executors, as hidden jobs that each run like any other and finish
   * into this one: a batch split's shares (each its samples of the batch; re-queued alone if its
   * executor is lost), or a pipeline's stages (each the whole batch through its base segments,
   * handing its activations to the next stage's executor directly; they start together and a
   * stage waits for its activations natively).
   */
  private startSplit(job: Job, decision: MultiGpuDecision<PlanMessage>): void {
    const found = decision.shares.map((share) => this.executors.get(share.executorId));
    if (found.some((entry) => !entry?.idle)) return;
    const entries = found as ExecutorEntry[];
    const pipeline = decision.mode === "pipeline";
    this.queue.remove(job);
    job.state = JobState.JOB_STATE_RUNNING;
    job.executorId = decision.shares[0].executorId;
    job.plan = decision.shares[0].plan;
    job.attempts++;
    job.dispatchedMs = Date.now();
    job.startedMs = 0;
    job.resetProgress();
    job.multiGpu = multiGpuMessage(decision);
    const k = decision.shares.length;
    // A pipeline runs again whole, and a stage of an abandoned attempt may still be winding
    // down: its stages' ids name the attempt.
    const ids = decision.shares.map((_, index) =>
      pipeline ? `${job.id}.a${job.attempts}.s${index}` : `${job.id}.${index}`,
    );
    job.shares = decision.shares.map((share, index) => {
      const child = new Job({
        ...job,
        id: ids[index],
        idempotencyKey: "",
        spec: {
          ...job.spec,
          batch: pipeline ? job.spec.batch : share.samples,
          inputs: pipeline
            ? job.spec.inputs
            : samplesOf(job.spec.inputs, share.firstSample, share.samples),
          executorId: "",
          multiGpu: "single",
        },
        state: JobState.JOB_STATE_QUEUED,
        executorId: "",
        plan: undefined,
        attempts: 0,
        startedMs: 0,
        finishedMs: 0,
      });
      child.parent = job;
      child.model = job.model;
      if (pipeline) {
        child.profile = job.profile;
        child.stage = {
          index,
          stages: k,
          firstBase: share.firstBase,
          lastBase: share.lastBase,
          nextPeerAddress: entries[(index + 1) % k].peerAddress,
          nextJobId: ids[(index + 1) % k],
        };
      } else {
        child.firstSample = share.firstSample;
        child.profile = job.shareProfiles.get(share.samples);
      }
      this.jobs.set(child.id, child);
      return child;
    });
    this.save(job);
    job.span?.setAttribute("ferry.multi_gpu", decision.mode);
    job.span?.setAttribute("ferry.shares", k);
    const parts = decision.shares.map((s) =>
      pipeline
        ? `${s.firstBase}–${s.lastBase} on ${s.executorId}`
        : `${s.samples} on ${s.executorId}`,
    );
    this.log(
      `ferry scheduler: job ${job.id} ${pipeline ? "runs as a pipeline over" : "split across"} ${k} executors (${parts.join(", ")})`,
    );
    for (const [index, child] of job.shares.entries()) this.start(child, entries[index]);
  }

  /**
   * A pipeline stage cannot go on (its executor was lost or went away, or its neighbour did): the
   * other stages would wait for it for ever, so they are cancelled and the whole job runs again.
   */
  private restartPipeline(stage: Job, reason: string): void {
    const job = stage.parent!;
    this.jobs.delete(stage.id);
    if (job.finished || !job.shares?.includes(stage)) return;
    this.handoffs.forget(`${job.id}#${job.attempts}`);
    const stages = job.shares;
    job.shares = undefined;
    for (const sibling of stages) {
      if (sibling === stage || sibling.finished) continue;
      sibling.cancelRequested = true;
      this.executors.get(sibling.executorId)?.send({
        $case: "cancelRun",
        value: { jobId: sibling.id },
      });
    }
    this.requeueOrFail(
      job,
      `pipeline stage ${stage.stage!.index} (base segments ${stage.stage!.firstBase}–${stage.stage!.lastBase}, on executor ${stage.executorId || "none"}): ${reason}`,
    );
  }

  /**
   * A share finished: the job fails with it, or succeeds with every share's output concatenated
   * (a pipeline: with its last stage's output).
   */
  private shareFinished(share: Job, result: JobResult): void {
    const job = share.parent!;
    share.finish(result, Date.now());
    this.jobs.delete(share.id);
    if (job.finished) return;
    // A stage of an earlier attempt of a pipeline, winding down.
    if (!job.shares?.includes(share)) return;
    const shares = job.shares;
    const index = shares.indexOf(share);
    const last = share.firstSample + share.spec.batch - 1;
    const what = share.stage
      ? `stage ${index} of the pipeline (base segments ${share.stage.firstBase}–${share.stage.lastBase}, on executor ${share.executorId || "none"})`
      : `share ${index} of the batch split (samples ${share.firstSample}–${last}, on executor ${share.executorId || "none"})`;
    if (result.state !== JobState.JOB_STATE_SUCCEEDED) {
      for (const sibling of shares) {
        if (sibling === share || sibling.finished) continue;
        sibling.cancelRequested = true;
        if (this.queue.remove(sibling)) {
          sibling.state = JobState.JOB_STATE_CANCELLED;
          this.jobs.delete(sibling.id);
        } else {
          this.executors
            .get(sibling.executorId)
            ?.send({ $case: "cancelRun", value: { jobId: sibling.id } });
        }
      }
      const cancelled = job.cancelRequested || result.state === JobState.JOB_STATE_CANCELLED;
      this.completeJob(
        job,
        JobResult.fromPartial({
          jobId: job.id,
          state: cancelled ? JobState.JOB_STATE_CANCELLED : JobState.JOB_STATE_FAILED,
          error: {
            code: result.error?.code || (cancelled ? "CANCELLED" : "INTERNAL"),
            message: `${what}: ${result.error?.message ?? "failed"}`,
          },
          steps: result.steps,
          executorId: share.executorId,
        }),
      );
      return;
    }
    share.shareOutput = result;
    if (!shares.every((s) => s.shareOutput)) return;
    if (share.stage) this.handoffs.forget(`${job.id}#${job.attempts}`);
    const pipeline = shares[0].stage !== undefined;
    const lastStage = shares[shares.length - 1].shareOutput!;
    const output = pipeline
      ? lastStage.output
      : Buffer.concat(shares.map((s) => s.shareOutput!.output));
    const shape = [...(pipeline ? lastStage.outputShape : shares[0].shareOutput!.outputShape)];
    if (!pipeline) {
      shape[0] = shares.reduce((sum, s) => sum + (s.shareOutput!.outputShape[0] ?? 0), 0);
    }
    this.completeJob(
      job,
      JobResult.fromPartial({
        jobId: job.id,
        state: job.cancelRequested ? JobState.JOB_STATE_CANCELLED : JobState.JOB_STATE_SUCCEEDED,
        error: job.cancelRequested
          ? { code: "CANCELLED", message: "cancelled while its shares finished" }
          : undefined,
        checksum: job.cancelRequested ? "" : createHash("sha256").update(output).digest("hex"),
        output: job.cancelRequested ? Buffer.alloc(0) : output,
        outputShape: shape,
        // The first share's steps stand for the job's (every share runs every step); a
        // pipeline's last stage's, whose steps end the job's.
        steps: (pipeline ? lastStage : shares[0].shareOutput!).steps,
        stepsOmitted: (pipeline ? lastStage : shares[0].shareOutput!).stepsOmitted,
        totalSeconds: (Date.now() - job.dispatchedMs) / 1000,
        executorId: pipeline ? shares[shares.length - 1].executorId : shares[0].executorId,
      }),
    );
  }

  private start(job: Job, entry: ExecutorEntry): void {
    let estimate: Estimate;
    try {
      estimate = this.plan(job, entry);
    } catch {
      return;
    }
    this.queue.remove(job);
    job.state = JobState.JOB_STATE_RUNNING;
    job.executorId = entry.id;
    job.plan = estimate.plan;
    job.segmentFlops = estimate.segmentFlops;
    job.attempts++;
    job.dispatchedMs = Date.now();
    job.startedMs = 0;
    job.resetProgress();
    entry.running.add(job);
    this.save(job);
    job.span?.setAttribute("ferry.executor.id", entry.id);
    job.span?.setAttribute("ferry.resident_bytes", estimate.plan.residentBytes);
    job.span?.setAttribute("ferry.streamed_bytes_per_step", estimate.plan.streamedBytesPerStep);
    // A share's executor spans join its job's trace.
    const span = job.parent ? job.parent.span : job.span;
    entry.send({
      $case: "runJob",
      value: {
        jobId: job.id,
        spec: job.spec,
        plan: job.plan,
        traceparent: span ? traceparentOf(trace.setSpan(ROOT_CONTEXT, span)) : "",
        firstSample: job.firstSample,
        stage: job.stage,
      },
    });
  }

  private requestHash(request: SubmitJobRequest): string {
    const canonical = JSON.stringify(SubmitJobRequest.toJSON({ ...request, idempotencyKey: "" }));
    return createHash("sha256").update(canonical).digest("hex");
  }

  private jobSpan(job: Job, parent: Context, restored = false): Span {
    return ferryTracer().startSpan(
      "ferry.job",
      {
        attributes: {
          "ferry.job.id": job.id,
          "ferry.model": job.spec.modelPath,
          "ferry.steps": job.spec.steps,
          "ferry.batch": job.spec.batch,
          "ferry.tokens": job.spec.tokens,
          "ferry.policy": job.spec.policy,
          "ferry.priority": job.priority,
          ...(restored ? { "ferry.job.restored": true } : {}),
        },
      },
      parent,
    );
  }

  /**
   * Accepts a job: validated, its model resolved and checked against every connected executor,
   * persisted, queued, and started at once if an executor is free. `cancelled` tells whether the
   * caller has given up (deadline passed): then nothing is created.
   */
  async submit(
    request: SubmitJobRequest,
    parent: Context,
    cancelled: () => boolean = () => false,
  ): Promise<SubmitOutcome> {
    if (this.lifecycle !== "running") {
      throw new StatusError(status.UNAVAILABLE, "the scheduler is shutting down");
    }
    const priority = checkInteger("priority", request.priority, -MAX_PRIORITY, MAX_PRIORITY);
    const key = checkString("idempotency_key", request.idempotencyKey, MAX_ID_LENGTH, ID_PATTERN);
    const hash = this.requestHash(request);
    const earlier = key ? this.byKey.get(key) : undefined;
    if (earlier) return this.existingOutcome(earlier, hash);
    const spec = this.resolveSpec(request.spec);
    const { model, profile, shareProfiles, minShare } = await this.loadModelFor(spec);
    const probe = { spec: { ...spec, modelPath: model.path }, profile, model } as Job;
    const entries = [...this.executors.values()].filter((entry) => entry.connected);
    if (spec.executorId) {
      const asked = this.executors.get(spec.executorId);
      if (!asked || asked.state === "lost") {
        throw new StatusError(status.NOT_FOUND, `no executor with id ${quote(spec.executorId)}`);
      }
    } else if (entries.length === 0) {
      throw new StatusError(
        status.UNAVAILABLE,
        "no executor is connected; start one with `ferry executor --scheduler HOST:PORT`",
      );
    }
    // It must fit at least one executor it may run on, else it would wait forever.
    let planError: unknown;
    const eligible = spec.executorId ? [this.executors.get(spec.executorId)!] : entries;
    const priced: { candidate: PlacementCandidate; entry: ExecutorEntry; plan: PlanMessage }[] = [];
    for (const entry of eligible) {
      try {
        const estimate = this.plan(probe, entry, true);
        priced.push({
          entry,
          plan: estimate.plan,
          candidate: {
            id: entry.id,
            idle: entry.idle,
            warm: entry.isWarm(model.path),
            availableInS: entry.idle ? 0 : this.remainingS(entry),
            runS: estimate.runS,
            coldLoadS: model.bytes / (ASSUMED_DISK_GBPS * 1e9),
          },
        });
      } catch (error) {
        planError ??= error;
      }
    }
    if (priced.length === 0) throw toStatusError(planError, this.log);
    const best = choosePlacement(priced.map((p) => p.candidate));
    const chosen = priced.find((p) => p.candidate === best)!;
    const preview = { plan: chosen.plan, entry: chosen.entry };
    // Another submit with the same key may have finished while this one read the model.
    const raced = key ? this.byKey.get(key) : undefined;
    if (raced) return this.existingOutcome(raced, hash);
    if (this.queue.size >= this.maxQueuedJobs) {
      throw new StatusError(
        status.RESOURCE_EXHAUSTED,
        `the queue is full (${this.maxQueuedJobs} jobs wait already); try again later`,
      );
    }
    if (cancelled()) {
      throw new StatusError(status.CANCELLED, "the caller gave up before the job was accepted");
    }
    if (this.lifecycle !== "running") {
      throw new StatusError(status.UNAVAILABLE, "the scheduler is shutting down");
    }
    const row: JobRow = {
      id: `job-${randomUUID().slice(0, 8)}`,
      seq: ++this.seq,
      priority,
      idempotencyKey: key,
      requestHash: hash,
      spec: { ...spec, modelPath: model.path },
      modelRef: spec.modelPath,
      state: JobState.JOB_STATE_QUEUED,
      executorId: "",
      plan: undefined,
      submittedMs: Date.now(),
      startedMs: 0,
      finishedMs: 0,
      attempts: 0,
      lastStep: 0,
      errorCode: "",
      errorMessage: "",
      checksum: "",
      outputShape: [],
      totalSeconds: 0,
    };
    const job = new Job(row);
    job.model = model;
    job.profile = profile;
    for (const [samples, shareProfile] of shareProfiles) {
      job.shareProfiles.set(samples, shareProfile);
    }
    job.minShareSamples = minShare;
    this.save(job);
    this.jobs.set(job.id, job);
    if (key) this.byKey.set(key, job);
    job.span = this.jobSpan(job, parent);
    this.queue.push(job);
    // Place it now, so a job that can start at once is running when the caller hears back.
    this.placementPass();
    const running = job.state === JobState.JOB_STATE_RUNNING;
    return {
      job,
      existing: false,
      plan: running ? job.plan : preview.plan,
      executorId: running ? job.executorId : "",
      device: running ? this.deviceOf(job.executorId) : preview.entry.device,
    };
  }

  private existingOutcome(job: Job, hash: string): SubmitOutcome {
    if (job.requestHash !== hash) {
      throw new StatusError(
        status.ALREADY_EXISTS,
        `idempotency key ${quote(job.idempotencyKey)} was used for job ${job.id} with a different request`,
      );
    }
    return {
      job,
      existing: true,
      plan: job.plan,
      executorId: job.executorId,
      device: this.deviceOf(job.executorId),
    };
  }

  /** The plan a spec would get, on the executor asked for or the one placement would choose. */
  async getPlan(
    spec: JobSpec | undefined,
  ): Promise<{ plan: PlanMessage; executorId: string; multiGpu: MultiGpuChoice }> {
    const resolved = this.resolveSpec(spec);
    const { model, profile, shareProfiles, minShare } = await this.loadModelFor(resolved);
    const probe = {
      spec: { ...resolved, modelPath: model.path },
      profile,
      model,
      shareProfiles,
      minShareSamples: minShare,
    } as Job;
    if (resolved.executorId) {
      const entry = this.executors.get(resolved.executorId);
      if (!entry || !entry.connected) {
        throw new StatusError(
          status.NOT_FOUND,
          `no executor with id ${quote(resolved.executorId)}`,
        );
      }
      return {
        plan: this.planBesideOrAfter(probe, entry).estimate.plan,
        executorId: entry.id,
        multiGpu: {
          mode: "single",
          shares: [],
          singlePredictedS: 0,
          splitPredictedS: 0,
          explanation: [`chose one executor: the job asked for executor ${entry.id}`],
        },
      };
    }
    const entries = [...this.executors.values()].filter((entry) => entry.connected);
    if (entries.length === 0) {
      throw new StatusError(
        status.UNAVAILABLE,
        "no executor is connected; start one with `ferry executor --scheduler HOST:PORT`",
      );
    }
    let firstError: unknown;
    const priced: { candidate: PlacementCandidate; plan: PlanMessage; entry: ExecutorEntry }[] = [];
    for (const entry of entries) {
      try {
        const { estimate, beside } = this.planBesideOrAfter(probe, entry);
        priced.push({
          entry,
          plan: estimate.plan,
          candidate: {
            id: entry.id,
            idle: entry.idle && beside,
            warm: entry.isWarm(model.path),
            availableInS: entry.idle && beside ? 0 : this.remainingS(entry),
            runS: estimate.runS,
            coldLoadS: model.bytes / (ASSUMED_DISK_GBPS * 1e9),
          },
        });
      } catch (error) {
        firstError ??= error;
      }
    }
    const best = choosePlacement(priced.map((p) => p.candidate));
    const chosen = priced.find((p) => p.candidate === best);
    const decision = this.multiGpuDecision(probe, best, chosen?.entry);
    if (decision.mode !== "single") {
      const first = decision.shares[0];
      return {
        plan: first.plan,
        executorId: first.executorId,
        multiGpu: multiGpuMessage(decision),
      };
    }
    if (!chosen) throw toStatusError(firstError, this.log);
    return { plan: chosen.plan, executorId: chosen.entry.id, multiGpu: multiGpuMessage(decision) };
  }

  private onJobUpdate(entry: ExecutorEntry, update: JobUpdate): void {
    const body = update.update;
    if (!body) return;
    const jobId = body.value.jobId;
    const job = this.jobs.get(jobId);
    // Only the executor a job was sent to may speak for it.
    const mine = job !== undefined && entry.running.has(job);
    if (body.$case === "result") {
      entry.send({ $case: "resultReceived", value: { jobId } });
      entry.finishedRunning(jobId);
      if (!mine) {
        this.log(
          `ferry scheduler: ignored a result for job ${quote(jobId)} from executor ${entry.id}: the job is not running there`,
        );
        // The executor is done with it: what waited for it may start.
        this.schedulePass();
        return;
      }
      entry.running.delete(job);
      entry.markWarm(job.spec.modelPath);
      const result = body.value;
      // UNAVAILABLE from an executor is transient (it was busy, or its device went away): the
      // job goes back to the queue while it has attempts left.
      if (
        result.state === JobState.JOB_STATE_FAILED &&
        result.error?.code === "UNAVAILABLE" &&
        !job.cancelRequested
      ) {
        this.requeueOrFail(job, `executor ${entry.id}: ${result.error.message}`);
        this.schedulePass();
        return;
      }
      const { steps, omitted } = boundSteps(result.steps);
      let state = result.state;
      if (!DONE_STATES.has(state)) state = JobState.JOB_STATE_FAILED;
      if (job.cancelRequested && state !== JobState.JOB_STATE_SUCCEEDED) {
        state = JobState.JOB_STATE_CANCELLED;
      }
      this.completeJob(job, {
        ...result,
        state,
        steps,
        stepsOmitted: result.stepsOmitted + omitted,
        executorId: entry.id,
      });
      this.schedulePass();
      return;
    }
    if (!mine) return;
    const parent = job.parent;
    if (body.$case === "started") {
      job.startedMs = Date.now();
      this.save(job);
      // A split job has started when its first share has.
      if (parent && !parent.startedMs) {
        parent.startedMs = job.startedMs;
        this.save(parent);
      }
      return;
    }
    if (!job.startedMs) job.startedMs = Date.now();
    if (body.value.stats) entry.recordStep(body.value.stats, job.segmentFlops);
    if (body.value.stats && job.stage && parent?.profile) {
      this.handoffs.record(
        `${parent.id}#${parent.attempts}`,
        job.stage.stages,
        job.stage.index,
        body.value.stats.step,
        body.value.stats.stepSeconds,
        body.value.stats.startUs,
        handoffBytesOf(parent.profile.segments),
      );
    }
    if (body.value.stats && body.value.stats.step > TIMELINE_STEPS_KEPT) {
      body.value.stats.events = [];
    }
    job.addProgress(fitProgress(body.value));
    // A split job's watchers hear a step once every share has done it (from the last one).
    if (parent?.shares && !parent.finished) {
      const done = Math.min(...parent.shares.map((share) => share.lastStep));
      if (done > parent.lastStep)
        parent.addProgress(fitProgress({ ...body.value, jobId: parent.id }));
    }
  }

  /** Back to the queue after its executor was lost, or failed when it has had its attempts. */
  private requeueOrFail(job: Job, reason: string): void {
    if (job.finished) return;
    if (job.parent?.finished) {
      this.jobs.delete(job.id);
      return;
    }
    // A pipeline runs again as a whole: its other stages wait on this one's activations.
    if (job.stage) {
      this.restartPipeline(job, reason);
      return;
    }
    if (job.cancelRequested) {
      this.finishJob(job, JobState.JOB_STATE_CANCELLED, status.CANCELLED, `cancelled (${reason})`);
      return;
    }
    // A job that asked for one executor can only wait for that one while it may come back.
    const asked = job.spec.executorId ? this.executors.get(job.spec.executorId) : undefined;
    if (job.spec.executorId && (!asked || asked.state === "lost")) {
      this.finishJob(
        job,
        JobState.JOB_STATE_FAILED,
        status.UNAVAILABLE,
        `${reason}; the job asked for executor ${job.spec.executorId}, which is gone`,
      );
      return;
    }
    if (job.attempts < this.maxAttempts && this.lifecycle === "running") {
      this.log(`ferry scheduler: job ${job.id} queued again: ${reason}`);
      job.state = JobState.JOB_STATE_QUEUED;
      job.resetProgress();
      this.save(job);
      this.queue.push(job);
      this.schedulePass();
      return;
    }
    this.finishJob(
      job,
      JobState.JOB_STATE_FAILED,
      status.UNAVAILABLE,
      `${reason}; it was not run again (attempt ${job.attempts} of ${this.maxAttempts})`,
    );
  }

  getJob(id: string): Job {
    checkString("job_id", id, MAX_ID_LENGTH);
    if (id === "") throw new StatusError(status.INVALID_ARGUMENT, "job_id is required");
    const job = this.jobs.get(id);
    if (!job) {
      throw new StatusError(
        status.NOT_FOUND,
        `no job with id ${quote(id)} (finished jobs are kept for ${Math.round(this.retentionMs / 1000)} s)`,
      );
    }
    return job;
  }

  /** A finished job's full result, from the store. */
  resultOf(job: Job): JobResult {
    return (
      this.store.result(job.id) ??
      JobResult.fromPartial({
        jobId: job.id,
        state: job.state,
        error: job.errorCode ? { code: job.errorCode, message: job.errorMessage } : undefined,
        checksum: job.checksum,
        outputShape: job.outputShape,
        totalSeconds: job.totalSeconds,
        executorId: job.executorId,
      })
    );
  }

  listJobs(
    states: readonly JobState[],
    pageSize: number,
    pageToken: string,
  ): { jobs: JobInfo[]; nextPageToken: string } {
    const size = checkInteger("page_size", pageSize, 0, MAX_PAGE_SIZE) || DEFAULT_PAGE_SIZE;
    checkString("page_token", pageToken, 32);
    const after = pageToken === "" ? 0 : Number(pageToken);
    if (!Number.isSafeInteger(after) || after < 0) {
      throw new StatusError(
        status.INVALID_ARGUMENT,
        `page_token ${quote(pageToken)} is not one ListJobs gave`,
      );
    }
    for (const state of states) checkInteger("states", state, 1, 5);
    const wanted = new Set(states);
    const jobs = [...this.jobs.values()]
      .filter(
        (job) => !job.parent && job.seq > after && (wanted.size === 0 || wanted.has(job.state)),
      )
      .sort((a, b) => a.seq - b.seq);
    // A page ends at its size or where the next job would take the response past what a stock
    // client accepts (plans make some jobs large).
    const page: JobInfo[] = [];
    let bytes = 0;
    let last = 0;
    for (const job of jobs) {
      if (page.length >= size) break;
      const info = job.info();
      const infoBytes = JobInfo.encode(info).finish().length + 8;
      if (page.length > 0 && bytes + infoBytes > LIST_RESPONSE_BYTES) break;
      page.push(info);
      bytes += infoBytes;
      last = job.seq;
    }
    return {
      jobs: page,
      nextPageToken: jobs.length > page.length ? String(last) : "",
    };
  }

  cancel(id: string): JobState {
    const job = this.getJob(id);
    if (job.finished) return job.state;
    if (this.queue.remove(job)) {
      this.finishJob(
        job,
        JobState.JOB_STATE_CANCELLED,
        status.CANCELLED,
        "cancelled before it started",
      );
      return job.state;
    }
    job.cancelRequested = true;
    if (job.shares) {
      for (const share of job.shares) {
        if (share.finished) continue;
        share.cancelRequested = true;
        if (this.queue.remove(share)) {
          this.finishJob(share, JobState.JOB_STATE_CANCELLED, status.CANCELLED, "cancelled");
        } else {
          this.executors
            .get(share.executorId)
            ?.send({ $case: "cancelRun", value: { jobId: share.id } });
        }
      }
      return job.state;
    }
    // The executor stops at the next segment boundary and reports CANCELLED; an unreachable one
    // is told when it comes back (reconcile), or the job ends CANCELLED when it is lost.
    this.executors.get(job.executorId)?.send({ $case: "cancelRun", value: { jobId: job.id } });
    return job.state;
  }

  private finishJob(job: Job, state: JobState, code: status, message: string): void {
    this.completeJob(
      job,
      JobResult.fromPartial({
        jobId: job.id,
        state,
        error: { code: statusName(code), message },
        executorId: job.executorId,
      }),
    );
  }

  private completeJob(job: Job, result: JobResult): void {
    if (job.parent) {
      if (!job.finished) this.shareFinished(job, result);
      return;
    }
    if (!job.finish(result, Date.now())) return;
    this.metrics.jobFinished(job);
    try {
      this.store.finish(job, result);
    } catch (error) {
      this.log(`ferry scheduler: could not store the result of ${job.id}: ${String(error)}`);
    }
    job.events.emit("event", { event: { $case: "result", value: result } });
    const span = job.span;
    if (span) {
      span.setAttribute("ferry.job.state", JobState[result.state] ?? String(result.state));
      if (result.state === JobState.JOB_STATE_SUCCEEDED) {
        span.setAttribute("ferry.checksum", result.checksum);
      } else {
        const message = result.error?.message ?? "job failed";
        span.recordException({ name: result.error?.code ?? "Error", message });
        span.setStatus({ code: SpanStatusCode.ERROR, message });
      }
      span.end();
      job.span = undefined;
    }
  }

  // ---- models ----

  async listModels(): Promise<ModelInfo[]> {
    return this.models ? this.models.list() : [];
  }

  private command(
    entry: ExecutorEntry,
    build: (id: string) => ExecutorCommand["message"],
    needsIdle: boolean,
  ): Promise<Holdings | undefined> {
    return new Promise((resolveCommand, reject) => {
      const id = `cmd-${randomUUID().slice(0, 8)}`;
      entry.commands.push({ id, message: build(id), needsIdle, resolve: resolveCommand, reject });
      this.sendNextCommand(entry);
    });
  }

  private sendNextCommand(entry: ExecutorEntry): void {
    if (!entry.connected || entry.commandInFlight) return;
    const next = entry.commands[0];
    if (!next || (next.needsIdle && entry.running.size > 0)) return;
    entry.commands.shift();
    entry.commandInFlight = next;
    entry.send(next.message);
  }

  private onCommandDone(
    entry: ExecutorEntry,
    done: {
      commandId: string;
      error: { code: string; message: string } | undefined;
      holdings: Holdings | undefined;
    },
  ): void {
    const command = entry.commandInFlight;
    if (!command || command.id !== done.commandId) return;
    entry.commandInFlight = undefined;
    if (done.holdings) this.updateHoldings(entry, done.holdings, done.holdings.freeBytes);
    if (done.error?.code) {
      const code = (status as unknown as Record<string, number>)[done.error.code] ?? status.UNKNOWN;
      command.reject(new StatusError(code, done.error.message));
    } else {
      command.resolve(done.holdings);
    }
    this.schedulePass();
  }

  /**
   * Warms a model on an executor: a one-step warm-up run (batch 1) with the plan a job of it
   * would get there fills the host params cache and, with `resident`, leaves the plan's resident
   * segments in the device's residency cache. Waits for the executor to be free of jobs.
   */
  async loadModel(
    ref: string,
    executorId: string,
    resident: boolean,
  ): Promise<{
    executorId: string;
    modelPath: string;
    hostCacheBytes: number;
    residentBytes: number;
  }> {
    checkString("executor_id", executorId, MAX_ID_LENGTH, ID_PATTERN);
    const models = this.requireModels();
    const model = await models.resolve(ref);
    const spec = this.resolveSpec({
      modelPath: model.path,
      steps: 1,
      batch: 1,
      tokens: DEFAULT_TOKENS,
      seed: 0,
      maxVramGib: undefined,
      policy: "ferry",
      noStream: false,
      executorId,
      paramsBackend: "cpu",
      load: "eager",
      verify: false,
      contextTokens: 0,
      guidance: undefined,
      shift: false,
      inputs: [],
    });
    spec.contextTokens = resolvedContextTokens(await models.header(model), 0);
    const profile = await models.profile(model, spec.batch, spec.tokens, spec.contextTokens);
    const probe = { spec, profile, model } as Job;
    let entry: ExecutorEntry | undefined;
    if (executorId) {
      entry = this.executors.get(executorId);
      if (!entry || !entry.connected) {
        throw new StatusError(
          status.NOT_FOUND,
          `no connected executor with id ${quote(executorId)}`,
        );
      }
    } else {
      const options = this.candidates(probe, this.executors.values());
      const choice = choosePlacement(options.map((option) => option.candidate));
      entry = options.find((option) => option.candidate === choice)?.entry;
      if (!entry) {
        throw new StatusError(status.UNAVAILABLE, "no connected executor can hold the model");
      }
    }
    const warmUp = this.plan(probe, entry).plan;
    if (!resident) {
      for (const segment of warmUp.segments) segment.resident = false;
      warmUp.residentBytes = 0;
    }
    const target = entry;
    const holdings = await this.command(
      target,
      (commandId) => ({
        $case: "loadModel",
        value: {
          commandId,
          modelPath: model.path,
          warmUp,
          warmUpTokens: spec.tokens,
          warmUpContextTokens: spec.contextTokens,
        },
      }),
      true,
    );
    const held = holdings?.models.find((m) => m.path === model.path);
    return {
      executorId: target.id,
      modelPath: model.path,
      hostCacheBytes: held?.hostCacheBytes ?? 0,
      residentBytes: holdings?.residentBytes ?? 0,
    };
  }

  /**
   * SetBudget: the executor's budget becomes `bytes`; each job running there is re-planned
   * against it (in the order they started, each against what the ones before it claim) and
   * swaps to its new plan at its next step boundary. A job no plan fits keeps its own.
   */
  async setBudget(
    executorId: string,
    bytes: number,
  ): Promise<{ executor: ExecutorInfo; replanned: string[]; unchanged: string[] }> {
    if (!executorId) throw new StatusError(status.INVALID_ARGUMENT, "executor_id is required");
    checkString("executor_id", executorId, MAX_ID_LENGTH, ID_PATTERN);
    const entry = this.executors.get(executorId);
    if (!entry || !entry.connected) {
      throw new StatusError(status.NOT_FOUND, `no connected executor with id ${quote(executorId)}`);
    }
    checkInteger("budget_bytes", bytes, 1, entry.device.totalBytes);
    const previous = entry.budgetBytes;
    entry.budgetBytes = bytes;
    const plans: { jobId: string; plan: PlanMessage }[] = [];
    const replanned: { job: Job; estimate: Estimate }[] = [];
    const unchanged: string[] = [];
    let left = bytes;
    for (const job of entry.running) {
      let estimate: Estimate | undefined;
      try {
        if (job.profile && left > 0) {
          estimate = this.planWithin(job, entry, left);
        }
      } catch {
        estimate = undefined;
      }
      if (!estimate) {
        unchanged.push(job.id);
        left -= job.plan ? planClaimBytes(job.plan) : 0;
        continue;
      }
      left -= planClaimBytes(estimate.plan);
      plans.push({ jobId: job.id, plan: estimate.plan });
      replanned.push({ job, estimate });
    }
    try {
      await this.command(
        entry,
        (commandId) => ({ $case: "setBudget", value: { commandId, budgetBytes: bytes, plans } }),
        false,
      );
    } catch (error) {
      entry.budgetBytes = previous;
      throw error;
    }
    for (const { job, estimate } of replanned) {
      if (!entry.running.has(job)) continue;
      job.plan = estimate.plan;
      job.segmentFlops = estimate.segmentFlops;
      this.store.save(job);
    }
    this.log(
      `ferry scheduler: executor ${entry.id} budget ${bytes} bytes; re-planned ${replanned.length} running job(s)`,
    );
    this.schedulePass();
    return {
      executor: entry.info((path) => this.models?.nameOf(path) ?? path),
      replanned: replanned.map(({ job }) => job.id),
      unchanged,
    };
  }

  /** The plan a job gets on an executor with `freeBytes` of its budget to itself. */
  private planWithin(job: Job, entry: ExecutorEntry, freeBytes: number): Estimate {
    return estimateOn(job, { ...entry.plannedDevice(true), free_bytes: freeBytes });
  }

  /** Evicts a model from one executor, or from every executor that has it open. */
  async unloadModel(ref: string, executorId: string): Promise<string[]> {
    checkString("executor_id", executorId, MAX_ID_LENGTH, ID_PATTERN);
    const models = this.requireModels();
    let path: string;
    try {
      path = (await models.resolve(ref)).path;
    } catch (error) {
      // A file deleted from the repository can still be evicted by the path executors report.
      const held = [...this.executors.values()].some((e) => e.isWarm(ref));
      if (!held) throw error;
      path = ref;
    }
    let targets: ExecutorEntry[];
    if (executorId) {
      const entry = this.executors.get(executorId);
      if (!entry || !entry.connected) {
        throw new StatusError(
          status.NOT_FOUND,
          `no connected executor with id ${quote(executorId)}`,
        );
      }
      targets = [entry];
    } else {
      targets = [...this.executors.values()].filter((e) => e.connected && e.isWarm(path));
    }
    await Promise.all(
      targets.map((entry) =>
        this.command(
          entry,
          (commandId) => ({ $case: "unloadModel", value: { commandId, modelPath: path } }),
          false,
        ),
      ),
    );
    return targets.map((entry) => entry.id);
  }

  // ---- shutdown ----

  /**
   * Stops taking jobs and starting them; waits up to `graceMs` for running jobs to finish. With a
   * database on disk, what is left stays queued or running there for the next start (executors
   * keep running their jobs and report back); with an in-memory one it fails with UNAVAILABLE.
   */
  async drain(graceMs: number): Promise<void> {
    if (this.lifecycle !== "running") return;
    this.lifecycle = "draining";
    const deadline = Date.now() + graceMs;
    const running = () =>
      [...this.jobs.values()].some((j) => j.state === JobState.JOB_STATE_RUNNING);
    while (Date.now() < deadline && running()) {
      await new Promise((resolveWait) => setTimeout(resolveWait, 50));
    }
    for (const job of [...this.jobs.values()]) {
      if (job.finished) continue;
      if (!this.durable) {
        this.queue.remove(job);
        this.finishJob(
          job,
          JobState.JOB_STATE_FAILED,
          status.UNAVAILABLE,
          "the scheduler shut down before the job finished",
        );
      } else {
        // Watchers hear why their stream ends; the job itself carries on after a restart.
        job.events.emit("shutdown");
        job.span?.end();
      }
    }
    this.lifecycle = "stopped";
    clearInterval(this.monitor);
    for (const entry of this.executors.values()) {
      this.failCommands(entry, "was disconnected: the scheduler is shutting down");
      entry.stream?.end();
      entry.stream = undefined;
    }
    this.executors.clear();
    this.store.close();
  }

  get stopping(): boolean {
    return this.lifecycle !== "running";
  }
}

/**
 * A job's plan on a device: for the whole model, or for a pipeline stage's base segments (its
 * plan's segments then count in the whole model's base segments, as the executor runs them).
 */
function estimateOn(
  job: Pick<Job, "spec" | "profile"> & { stage?: PipelineStage },
  device: DeviceProfile,
): Estimate {
  const options: PlanOptions = {
    policy: job.spec.policy as PolicyName,
    stream: !job.spec.noStream,
    maxVramGiB: job.spec.maxVramGib,
  };
  const profile = job.profile!;
  const first = job.stage?.firstBase ?? 0;
  const segments = job.stage
    ? profile.segments.slice(first, job.stage.lastBase + 1)
    : profile.segments;
  const plan = planJob(job.stage ? { ...profile, segments } : profile, device, options);
  const message = planToMessage(plan);
  if (job.stage) {
    for (const segment of message.segments) {
      segment.firstBase += first;
      segment.lastBase += first;
    }
    message.baseSegmentNames = profile.segments.map((segment) => segment.name);
    // A stage runs pooled whatever the policy: activations are handed over at step boundaries
    // of the pooled runner, resident weights stay for every step, copies (if any) run ahead.
    // With nothing streamed, its one slot is never allocated.
    if (message.slots === 0) message.slots = 1;
  }
  const stepS = plan.predicted_step_s ?? 0;
  return {
    atMs: Date.now(),
    plan: message,
    // FLOPs per merged segment: the compute side of the calibration samples this job yields.
    segmentFlops: plan.segments.map((segment) =>
      segments
        .slice(segment.base[0], segment.base[1] + 1)
        .reduce((sum, base) => sum + base.flops, 0),
    ),
    runS: job.spec.steps * (stepS > 0 ? stepS : 1e-3),
  };
}

/**
 * The fewest samples a batch split's share of this model may have: FLUX.1's per-sample vector
 * MLPs (timestep, guidance, pooled text) multiply a [B, 256|768] input, and with B = 1 ggml's
 * CPU backend takes another f32 kernel that rounds differently (measured: f32 shares of one
 * sample differ from the batch in the last bit; bf16 and q8_0 do not). The DiT's matrices always
 * have tokens × samples rows.
 */
function minShareSamples(header: ModelHeader): number {
  return header.ditConfig ? 1 : 2;
}

/**
 * Samples [first, first + count) of a job's input tensors (each batch-major: its first dimension
 * is the batch, as the scheduler checked at submit), for a batch split's share.
 */
export function samplesOf(
  inputs: readonly InputTensor[],
  first: number,
  count: number,
): InputTensor[] {
  return inputs.map((input) => {
    const perSample = input.data.length / (input.shape[0] || 1);
    return {
      name: input.name,
      shape: [count, ...input.shape.slice(1)],
      data: input.data.subarray(first * perSample, (first + count) * perSample),
    };
  });
}

/** A spec's multi-GPU mode ("" = "auto"). */
function multiGpuMode(spec: JobSpec): MultiGpuMode {
  return (spec.multiGpu || "auto") as MultiGpuMode;
}

/** A decision as the API reports it. */
export function multiGpuMessage(decision: MultiGpuDecision<PlanMessage>): MultiGpuChoice {
  return {
    mode: decision.mode,
    // A chosen share carries exactly SplitShare's fields.
    shares: decision.shares,
    singlePredictedS: decision.singleS ?? 0,
    splitPredictedS: decision.splitS ?? 0,
    explanation: decision.explanation,
  };
}

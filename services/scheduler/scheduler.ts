import { randomUUID } from "node:crypto";
import { access, constants } from "node:fs/promises";
import { resolve } from "node:path";
import { status, type ServerDuplexStream } from "@grpc/grpc-js";
import { ROOT_CONTEXT, SpanStatusCode, trace, type Context } from "@opentelemetry/api";
import {
  ConnectResponse,
  JobResult,
  JobState,
  type ConnectRequest,
  type DeviceInfo,
  type ExecutorInfo,
  type JobSpec,
  type StepStats,
  type JobUpdate,
  type Plan as PlanMessage,
} from "../../gen/ferry/v1/scheduler";
import { modelProfileFromFile } from "../../lib/model/segments";
import { ferryTracer, traceparentOf } from "../../lib/telemetry/api";
import { Job, type ResolvedJobSpec } from "./jobs";
import { SchedulerMetrics } from "./schedulerMetrics";
import { deviceProfileOf, planToMessage } from "./planProto";
import { calibrateDevice, type StepMeasurement } from "../../lib/planner/calibration";
import { KNOWN_POLICIES, planJob } from "../../lib/planner/planJob";
import type { DeviceProfile, PlanOptions, PolicyName } from "../../lib/planner/types";
import { StatusError, statusName, toStatusError } from "../../lib/wire/statusError";

export const DEFAULT_TOKENS = 64;
const MAX_STEPS = 1_000_000;
/** Steps of measurements kept per executor for calibration. */
const CALIBRATION_WINDOW_STEPS = 64;
/**
 * Steps whose events a job keeps: the status page draws a job's first steps, and keeping every
 * step's events would grow the scheduler's memory with the length of a job.
 */
const TIMELINE_STEPS_KEPT = 16;

type ExecutorStream = ServerDuplexStream<ConnectRequest, ConnectResponse>;

interface PlannedJob {
  plan: PlanMessage;
  /** FLOPs of each merged segment of the plan. */
  segmentFlops: number[];
}

/** One executor's live connection and the work queued on it. */
export class ExecutorConnection {
  lastHeartbeatMs = Date.now();
  running: Job | undefined;
  readonly queue: Job[] = [];
  readonly warmModels = new Set<string>();
  /** Recent per-segment measurements, oldest first: what calibration refines rates from. */
  readonly measurements: StepMeasurement[] = [];

  constructor(
    readonly id: string,
    public device: DeviceInfo,
    readonly stream: ExecutorStream,
  ) {}

  send(message: ConnectResponse["message"]): void {
    this.stream.write(ConnectResponse.fromPartial({ message }));
  }

  load(): number {
    return this.queue.length + (this.running ? 1 : 0);
  }

  /**
   * The device as plans should see it: the registered device with its rates (β, compute rate,
   * δ) refined from this executor's measured steps, so each plan uses what the hardware did.
   */
  plannedDevice(): DeviceProfile {
    return calibrateDevice(deviceProfileOf(this.device), this.measurements).device;
  }

  recordStep(stats: StepStats, segmentFlops: readonly number[]): void {
    this.measurements.push({
      segments: stats.segments.map((segment) => ({
        bytes_copied: segment.h2dBytes,
        copy_s: segment.h2dSeconds,
        compute_s: segment.computeSeconds,
        flops: segmentFlops[segment.index] ?? 0,
      })),
    });
    if (this.measurements.length > CALIBRATION_WINDOW_STEPS) this.measurements.shift();
  }

  info(): ExecutorInfo {
    const planned = this.plannedDevice();
    return {
      executorId: this.id,
      device: this.device,
      calibrated: {
        ...this.device,
        h2dGbps: planned.h2d_gbps,
        tflops: planned.tflops,
        dispatchUs: planned.dispatch_us,
      },
      lastHeartbeatMs: this.lastHeartbeatMs,
      runningJobId: this.running?.id ?? "",
      warmModels: [...this.warmModels],
    };
  }
}

export interface SchedulerOptions {
  /** How often executors heartbeat. @default 1000 */
  heartbeatIntervalMs?: number;
  /** An executor silent for this many intervals is declared dead. @default 5 */
  heartbeatMissLimit?: number;
  log?: (line: string) => void;
}

/**
 * The scheduler's state and rules, independent of gRPC: executors, jobs, placement, planning.
 * Each executor runs one job at a time; jobs wait in that executor's FIFO queue.
 */
export class Scheduler {
  private readonly executors = new Map<string, ExecutorConnection>();
  private readonly jobs = new Map<string, Job>();
  private readonly heartbeatIntervalMs: number;
  private readonly heartbeatMissLimit: number;
  private readonly log: (line: string) => void;
  private readonly monitor: NodeJS.Timeout;
  private readonly metrics: SchedulerMetrics;
  private draining = false;

  constructor(options: SchedulerOptions = {}) {
    this.heartbeatIntervalMs = options.heartbeatIntervalMs ?? 1000;
    this.heartbeatMissLimit = options.heartbeatMissLimit ?? 5;
    this.log = options.log ?? ((line) => console.error(line));
    this.monitor = setInterval(() => this.reapSilentExecutors(), this.heartbeatIntervalMs);
    this.monitor.unref();
    this.metrics = new SchedulerMetrics({
      jobs: () => this.listJobs(),
      executorIds: () => [...this.executors.keys()],
    });
  }

  // ---- executors ----

  /** Handles one executor's Connect stream for its whole life. */
  attachExecutor(stream: ExecutorStream): void {
    let connection: ExecutorConnection | undefined;
    stream.on("data", (request: ConnectRequest) => {
      try {
        const message = request.message;
        if (!message) return;
        if (message.$case === "register") {
          if (connection) return;
          connection = this.register(stream, message.value.executorId, message.value.device);
        } else if (!connection) {
          stream.emit(
            "error",
            new StatusError(status.FAILED_PRECONDITION, "send Register before anything else"),
          );
        } else if (message.$case === "heartbeat") {
          connection.lastHeartbeatMs = Date.now();
          if (connection.device) connection.device.freeBytes = message.value.freeBytes;
        } else if (message.$case === "jobUpdate") {
          connection.lastHeartbeatMs = Date.now();
          this.onJobUpdate(connection, message.value);
        }
      } catch (error) {
        // A malformed Register ends the stream with its status; other bad messages are logged.
        if (error instanceof StatusError && !connection) stream.emit("error", error);
        else this.log(`ferry scheduler: bad message from executor: ${String(error)}`);
      }
    });
    const detach = (reason: string) => {
      if (connection && this.executors.get(connection.id) === connection) {
        this.onExecutorGone(connection, reason);
      }
      connection = undefined;
    };
    stream.on("end", () => {
      detach("closed its stream");
      stream.end();
    });
    stream.on("error", (error: Error) => detach(`stream failed: ${error.message}`));
    stream.on("cancelled", () => detach("went away"));
    stream.on("close", () => detach("went away"));
  }

  private register(
    stream: ExecutorStream,
    requestedId: string,
    device: DeviceInfo | undefined,
  ): ExecutorConnection {
    if (!device) {
      throw new StatusError(status.INVALID_ARGUMENT, "Register must describe the device");
    }
    let id = requestedId || `executor-${randomUUID().slice(0, 8)}`;
    // A reconnecting executor may reuse its id while its old stream is being reaped.
    const previous = this.executors.get(id);
    if (previous) this.onExecutorGone(previous, "was replaced by a new connection with its id");
    if (this.executors.has(id)) id = `${id}-${randomUUID().slice(0, 4)}`;
    const connection = new ExecutorConnection(id, device, stream);
    this.executors.set(id, connection);
    connection.send({
      $case: "registered",
      value: { executorId: id, heartbeatIntervalMs: this.heartbeatIntervalMs },
    });
    this.log(
      `ferry scheduler: executor ${id} registered (${device.name}, ${device.totalBytes} bytes)`,
    );
    return connection;
  }

  private onExecutorGone(connection: ExecutorConnection, reason: string): void {
    this.executors.delete(connection.id);
    this.log(`ferry scheduler: executor ${connection.id} ${reason}`);
    const running = connection.running;
    connection.running = undefined;
    if (running) {
      const step = running.progress.length;
      this.finishJob(running, {
        state: JobState.JOB_STATE_FAILED,
        code: status.UNAVAILABLE,
        message: `executor ${connection.id} ${reason} while running the job (after step ${step} of ${running.spec.steps})`,
      });
    }
    // Queued work is not lost: it moves to another executor, or fails if there is none.
    const queued = connection.queue.splice(0);
    for (const job of queued) {
      void this.replace(job);
    }
  }

  private async replace(job: Job): Promise<void> {
    try {
      const target = this.pickExecutor(job.spec);
      const planned = await this.planFor(job.spec, target);
      job.plan = planned.plan;
      job.segmentFlops = planned.segmentFlops;
      job.executorId = target.id;
      target.queue.push(job);
      this.dispatch(target);
    } catch (error) {
      const err = toStatusError(error, this.log);
      this.finishJob(job, {
        state: JobState.JOB_STATE_FAILED,
        code: err.code,
        message: err.message,
      });
    }
  }

  private reapSilentExecutors(): void {
    const deadline = Date.now() - this.heartbeatIntervalMs * this.heartbeatMissLimit;
    for (const connection of [...this.executors.values()]) {
      if (connection.lastHeartbeatMs < deadline) {
        this.onExecutorGone(connection, "stopped heartbeating");
        connection.stream.emit(
          "error",
          new StatusError(status.DEADLINE_EXCEEDED, "no heartbeat; reconnect"),
        );
      }
    }
  }

  listExecutors(): ExecutorInfo[] {
    return [...this.executors.values()].map((connection) => connection.info());
  }

  // ---- jobs ----

  /** Every job the scheduler holds (queued, running, finished), oldest first. */
  listJobs(): Job[] {
    return [...this.jobs.values()];
  }

  /** Validates a spec and fills in the defaults. */
  resolveSpec(spec: JobSpec | undefined): ResolvedJobSpec {
    if (!spec) throw new StatusError(status.INVALID_ARGUMENT, "the request has no job spec");
    if (!spec.modelPath) throw new StatusError(status.INVALID_ARGUMENT, "model_path is required");
    if (!Number.isInteger(spec.steps) || spec.steps < 1 || spec.steps > MAX_STEPS) {
      throw new StatusError(
        status.INVALID_ARGUMENT,
        `steps must be between 1 and ${MAX_STEPS} (got ${spec.steps})`,
      );
    }
    const policy = spec.policy || "sdcpp";
    if (!KNOWN_POLICIES.includes(policy as PolicyName)) {
      throw new StatusError(
        status.INVALID_ARGUMENT,
        `unknown policy '${policy}' (known: ${KNOWN_POLICIES.join(", ")})`,
      );
    }
    if (spec.paramsBackend && !["cpu", "disk"].includes(spec.paramsBackend)) {
      throw new StatusError(
        status.INVALID_ARGUMENT,
        `unknown params backend '${spec.paramsBackend}' (known: cpu, disk)`,
      );
    }
    if (spec.load && !["lazy", "eager", "background"].includes(spec.load)) {
      throw new StatusError(
        status.INVALID_ARGUMENT,
        `unknown load mode '${spec.load}' (known: lazy, eager, background)`,
      );
    }
    if (spec.maxVramGib !== undefined && !Number.isFinite(spec.maxVramGib)) {
      throw new StatusError(status.INVALID_ARGUMENT, "max_vram_gib must be a finite number");
    }
    return {
      ...spec,
      modelPath: resolve(spec.modelPath),
      policy,
      batch: spec.batch || 1,
      tokens: spec.tokens || DEFAULT_TOKENS,
    };
  }

  /** Plans a spec for one executor's device (its calibrated rates included). */
  async planFor(spec: ResolvedJobSpec, executor: ExecutorConnection): Promise<PlannedJob> {
    await access(spec.modelPath, constants.R_OK);
    const model = await modelProfileFromFile(spec.modelPath, {
      batch: spec.batch,
      tokens: spec.tokens,
    });
    const options: PlanOptions = {
      policy: spec.policy as PolicyName,
      stream: !spec.noStream,
      maxVramGiB: spec.maxVramGib,
    };
    const plan = planJob(model, executor.plannedDevice(), options);
    // FLOPs per merged segment: the compute side of the calibration samples this job yields.
    const segmentFlops = plan.segments.map((segment) =>
      model.segments
        .slice(segment.base[0], segment.base[1] + 1)
        .reduce((sum, base) => sum + base.flops, 0),
    );
    return { plan: planToMessage(plan), segmentFlops };
  }

  /**
   * Chooses the executor for a job: the one asked for, else the least loaded, preferring one
   * where the model is already warm.
   */
  pickExecutor(spec: ResolvedJobSpec): ExecutorConnection {
    if (spec.executorId) {
      const chosen = this.executors.get(spec.executorId);
      if (!chosen) {
        throw new StatusError(status.NOT_FOUND, `no executor with id '${spec.executorId}'`);
      }
      return chosen;
    }
    const candidates = [...this.executors.values()];
    if (candidates.length === 0) {
      throw new StatusError(
        status.UNAVAILABLE,
        "no executor is connected; start one with `ferry executor --scheduler HOST:PORT`",
      );
    }
    candidates.sort(
      (a, b) =>
        a.load() - b.load() ||
        Number(b.warmModels.has(spec.modelPath)) - Number(a.warmModels.has(spec.modelPath)) ||
        a.id.localeCompare(b.id),
    );
    return candidates[0];
  }

  async getPlan(
    spec: JobSpec | undefined,
  ): Promise<{ plan: PlanMessage; executor: ExecutorConnection }> {
    const resolved = this.resolveSpec(spec);
    const executor = this.pickExecutor(resolved);
    return { plan: (await this.planFor(resolved, executor)).plan, executor };
  }

  async submit(spec: JobSpec | undefined, parent: Context): Promise<Job> {
    if (this.draining) {
      throw new StatusError(status.UNAVAILABLE, "the scheduler is shutting down");
    }
    const resolved = this.resolveSpec(spec);
    const executor = this.pickExecutor(resolved);
    const { plan, segmentFlops } = await this.planFor(resolved, executor);
    const id = `job-${randomUUID().slice(0, 8)}`;
    const span = ferryTracer().startSpan(
      "ferry.job",
      {
        attributes: {
          "ferry.job.id": id,
          "ferry.model": resolved.modelPath,
          "ferry.steps": resolved.steps,
          "ferry.batch": resolved.batch,
          "ferry.tokens": resolved.tokens,
          "ferry.policy": resolved.policy,
          "ferry.executor.id": executor.id,
          "ferry.resident_bytes": plan.residentBytes,
          "ferry.streamed_bytes_per_step": plan.streamedBytesPerStep,
        },
      },
      parent,
    );
    const job = new Job(id, resolved, executor.id, plan, span);
    job.segmentFlops = segmentFlops;
    this.jobs.set(id, job);
    executor.queue.push(job);
    this.dispatch(executor);
    return job;
  }

  private dispatch(executor: ExecutorConnection): void {
    if (executor.running) return;
    const job = executor.queue.shift();
    if (!job) return;
    executor.running = job;
    job.state = JobState.JOB_STATE_RUNNING;
    job.executorId = executor.id;
    executor.send({
      $case: "runJob",
      value: {
        jobId: job.id,
        spec: job.spec,
        plan: job.plan,
        traceparent: traceparentOf(trace.setSpan(ROOT_CONTEXT, job.span)),
      },
    });
  }

  private onJobUpdate(executor: ExecutorConnection, update: JobUpdate): void {
    const body = update.update;
    if (!body) return;
    const job = this.jobs.get(body.value.jobId);
    if (!job || job.executorId !== executor.id) return;
    if (body.$case === "progress") {
      if (body.value.stats) executor.recordStep(body.value.stats, job.segmentFlops);
      if (body.value.stats && body.value.stats.step > TIMELINE_STEPS_KEPT) {
        body.value.stats.events = [];
      }
      job.addProgress(body.value);
      return;
    }
    executor.warmModels.add(job.spec.modelPath);
    if (executor.running === job) executor.running = undefined;
    this.completeJob(job, { ...body.value, executorId: executor.id });
    this.dispatch(executor);
  }

  getJob(id: string): Job {
    const job = this.jobs.get(id);
    if (!job) throw new StatusError(status.NOT_FOUND, `no job with id '${id}'`);
    return job;
  }

  cancel(id: string): JobState {
    const job = this.getJob(id);
    if (job.finished) return job.state;
    const executor = this.executors.get(job.executorId);
    const queuedAt = executor?.queue.indexOf(job) ?? -1;
    if (executor && queuedAt >= 0) {
      executor.queue.splice(queuedAt, 1);
      this.finishJob(job, {
        state: JobState.JOB_STATE_CANCELLED,
        code: status.CANCELLED,
        message: "cancelled before it started",
      });
    } else if (executor?.running === job) {
      // The executor stops at the next segment boundary and reports CANCELLED.
      executor.send({ $case: "cancelRun", value: { jobId: job.id } });
    }
    return job.state;
  }

  private finishJob(job: Job, outcome: { state: JobState; code: status; message: string }): void {
    this.completeJob(
      job,
      JobResult.fromPartial({
        jobId: job.id,
        state: outcome.state,
        error: { code: statusName(outcome.code), message: outcome.message },
        executorId: job.executorId,
      }),
    );
  }

  private completeJob(job: Job, result: JobResult): void {
    if (!job.finish(result)) return;
    this.metrics.jobFinished(job);
    const span = job.span;
    span.setAttribute("ferry.job.state", JobState[result.state] ?? String(result.state));
    if (result.state === JobState.JOB_STATE_SUCCEEDED) {
      span.setAttribute("ferry.checksum", result.checksum);
    } else {
      const message = result.error?.message ?? "job failed";
      span.recordException({ name: result.error?.code ?? "Error", message });
      span.setStatus({ code: SpanStatusCode.ERROR, message });
    }
    span.end();
  }

  // ---- shutdown ----

  /** Stops taking jobs; waits up to `graceMs` for running ones, then fails what is left. */
  async drain(graceMs: number): Promise<void> {
    this.draining = true;
    const deadline = Date.now() + graceMs;
    for (const job of this.jobs.values()) {
      if (job.finished) continue;
      const executor = this.executors.get(job.executorId);
      if (executor && executor.queue.includes(job)) this.cancel(job.id);
    }
    while (Date.now() < deadline && [...this.jobs.values()].some((job) => !job.finished)) {
      await new Promise((resolveWait) => setTimeout(resolveWait, 50));
    }
    for (const job of this.jobs.values()) {
      if (!job.finished) {
        this.finishJob(job, {
          state: JobState.JOB_STATE_FAILED,
          code: status.UNAVAILABLE,
          message: "the scheduler shut down before the job finished",
        });
      }
    }
    clearInterval(this.monitor);
    for (const connection of this.executors.values()) connection.stream.end();
    this.executors.clear();
  }
}

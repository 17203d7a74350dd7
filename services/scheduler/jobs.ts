import { EventEmitter } from "node:events";
import type { Span } from "@opentelemetry/api";
import {
  JobState,
  type JobInfo,
  type JobProgress,
  type JobResult,
  type JobSpec,
  type MultiGpuChoice,
  type PipelineStage,
  type WatchJobResponse,
} from "../../gen/ferry/v1/scheduler";
import type { ModelProfile } from "../../lib/model/profile";
import { PROGRESS_HISTORY } from "../../lib/wire/limits";
import type { JobRow } from "./jobStore";
import type { ResolvedModel } from "./modelRepository";

/** Job specs with the defaults filled in, as the scheduler plans and runs them. */
export interface ResolvedJobSpec extends JobSpec {
  batch: number;
  tokens: number;
}

const FINISHED: ReadonlySet<JobState> = new Set([
  JobState.JOB_STATE_SUCCEEDED,
  JobState.JOB_STATE_FAILED,
  JobState.JOB_STATE_CANCELLED,
]);

/**
 * A job the scheduler holds: queued, running on an executor, or finished (until its retention
 * ends). Its durable part is a {@link JobRow}; the rest (recent progress, watchers, the model's
 * profile, the trace span) lives only in this process.
 */
export class Job implements JobRow {
  id: string;
  seq: number;
  priority: number;
  idempotencyKey: string;
  requestHash: string;
  spec: ResolvedJobSpec;
  modelRef: string;
  state: JobState;
  executorId: string;
  plan: JobRow["plan"];
  submittedMs: number;
  startedMs: number;
  finishedMs: number;
  attempts: number;
  lastStep: number;
  errorCode: string;
  errorMessage: string;
  checksum: string;
  outputShape: number[];
  totalSeconds: number;

  /** The most recent progress events (at most PROGRESS_HISTORY): what a new watcher replays. */
  private readonly recent: JobProgress[] = [];
  /** Emits "event" (WatchJobResponse) for each progress event and the result. */
  readonly events = new EventEmitter();
  /** FLOPs of each merged segment of the plan, for calibrating the executor from its steps. */
  segmentFlops: number[] = [];
  /** The model file and its base segments for this job's batch and tokens. */
  model: ResolvedModel | undefined;
  profile: ModelProfile | undefined;
  span: Span | undefined;
  /** A cancel was asked for while it ran; it ends CANCELLED whatever happens next. */
  cancelRequested = false;
  /** When the scheduler sent it to its executor (dispatch latency ends at `startedMs`). */
  dispatchedMs = 0;
  /**
   * Its first steps' stats with their events, kept after it finishes (in this process only):
   * what the status page draws the job's timeline from.
   */
  readonly timeline: JobProgress["stats"][] = [];
  /**
   * Batch split: a share of a job (run on one executor like any job, but held only in this
   * process, never listed, and finished into its parent) points at the job it is part of…
   */
  parent: Job | undefined;
  /** …and the share's first sample in the parent's batch. */
  firstSample = 0;
  /** The share's output while its siblings still run. */
  shareOutput: JobResult | undefined;
  /**
   * A split job's shares, in sample order, or its pipeline's stages, in model order (while it
   * runs in this process).
   */
  shares: Job[] | undefined;
  /** Pipeline split: the stage of the model this share computes, and where it hands off. */
  stage: PipelineStage | undefined;
  /** How the job uses the executors (set when it was split). */
  multiGpu: MultiGpuChoice | undefined;
  /** Base segments for a share of `samples` samples (the profiles a batch split may use). */
  readonly shareProfiles = new Map<number, ModelProfile>();
  /** The fewest samples a share of this job's model computes exactly as in the whole batch. */
  minShareSamples = 1;

  constructor(row: JobRow) {
    this.id = row.id;
    this.seq = row.seq;
    this.priority = row.priority;
    this.idempotencyKey = row.idempotencyKey;
    this.requestHash = row.requestHash;
    this.spec = row.spec as ResolvedJobSpec;
    this.modelRef = row.modelRef;
    this.state = row.state;
    this.executorId = row.executorId;
    this.plan = row.plan;
    this.submittedMs = row.submittedMs;
    this.startedMs = row.startedMs;
    this.finishedMs = row.finishedMs;
    this.attempts = row.attempts;
    this.lastStep = row.lastStep;
    this.errorCode = row.errorCode;
    this.errorMessage = row.errorMessage;
    this.checksum = row.checksum;
    this.outputShape = row.outputShape;
    this.totalSeconds = row.totalSeconds;
    // Many watchers may follow one job; each removes its listener when its call ends.
    this.events.setMaxListeners(0);
  }

  get finished(): boolean {
    return FINISHED.has(this.state);
  }

  /** The recent progress events, in order: what a new watcher is sent before live ones. */
  history(): WatchJobResponse[] {
    return this.recent.map((progress) => ({ event: { $case: "progress", value: progress } }));
  }

  addProgress(progress: JobProgress): void {
    if (this.finished) return;
    this.recent.push(progress);
    if (this.recent.length > PROGRESS_HISTORY) this.recent.shift();
    if (progress.stats) {
      this.lastStep = progress.stats.step;
      if (progress.stats.events.length > 0) this.timeline.push(progress.stats);
    }
    this.events.emit("event", { event: { $case: "progress", value: progress } });
  }

  /** Back to the queue (its executor was lost): progress starts over. */
  resetProgress(): void {
    this.recent.length = 0;
    this.timeline.length = 0;
    this.lastStep = 0;
  }

  /** Records the job's one outcome (the caller stores and publishes it); false when it had already finished. */
  finish(result: JobResult, now: number): boolean {
    if (this.finished) return false;
    this.state = result.state;
    this.finishedMs = now;
    this.errorCode = result.error?.code ?? "";
    this.errorMessage = result.error?.message ?? "";
    this.checksum = result.checksum;
    this.outputShape = result.outputShape;
    this.totalSeconds = result.totalSeconds;
    if (result.executorId) this.executorId = result.executorId;
    this.recent.length = 0;
    return true;
  }

  info(): JobInfo {
    return {
      jobId: this.id,
      state: this.state,
      // Inputs by name and shape only: a listing must not repeat every job's tensors.
      spec: {
        ...this.spec,
        inputs: this.spec.inputs.map((t) => ({ ...t, data: Buffer.alloc(0) })),
      },
      priority: this.priority,
      idempotencyKey: this.idempotencyKey,
      executorId: this.executorId,
      plan: this.plan,
      submittedMs: this.submittedMs,
      startedMs: this.startedMs,
      finishedMs: this.finishedMs,
      attempts: this.attempts,
      lastStep: this.lastStep,
      error: this.errorCode ? { code: this.errorCode, message: this.errorMessage } : undefined,
      checksum: this.checksum,
      outputShape: this.outputShape,
      totalSeconds: this.totalSeconds,
      multiGpu: this.multiGpu,
    };
  }
}

/**
 * Queued jobs in the order they start: higher priority first, and within a priority by
 * submission (a job re-queued after its executor was lost keeps its place).
 */
export class JobQueue {
  private readonly jobs: Job[] = [];

  get size(): number {
    return this.jobs.length;
  }

  private static before(a: Job, b: Job): boolean {
    return a.priority > b.priority || (a.priority === b.priority && a.seq < b.seq);
  }

  push(job: Job): void {
    let lo = 0;
    let hi = this.jobs.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (JobQueue.before(this.jobs[mid], job)) lo = mid + 1;
      else hi = mid;
    }
    this.jobs.splice(lo, 0, job);
  }

  remove(job: Job): boolean {
    const index = this.jobs.indexOf(job);
    if (index < 0) return false;
    this.jobs.splice(index, 1);
    return true;
  }

  has(job: Job): boolean {
    return this.jobs.includes(job);
  }

  /** In start order. */
  [Symbol.iterator](): Iterator<Job> {
    return this.jobs[Symbol.iterator]();
  }
}

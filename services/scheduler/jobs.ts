import { EventEmitter } from "node:events";
import type { Span } from "@opentelemetry/api";
import {
  JobState,
  type JobProgress,
  type JobResult,
  type JobSpec,
  type Plan as PlanMessage,
  type WatchJobResponse,
} from "../../gen/ferry/v1/scheduler";

/** Job specs with the defaults filled in, as the scheduler plans and runs them. */
export interface ResolvedJobSpec extends JobSpec {
  batch: number;
  tokens: number;
}

/** A job the scheduler has accepted: queued on an executor, running, or finished. */
export class Job {
  state: JobState = JobState.JOB_STATE_QUEUED;
  readonly progress: JobProgress[] = [];
  result: JobResult | undefined;
  /** FLOPs of each merged segment of the plan, for calibrating the executor from its steps. */
  segmentFlops: number[] = [];
  /** Emits "event" (WatchJobResponse) for each progress event and the result. */
  readonly events = new EventEmitter();

  constructor(
    readonly id: string,
    readonly spec: ResolvedJobSpec,
    public executorId: string,
    public plan: PlanMessage,
    readonly span: Span,
    readonly submittedAt: number = Date.now(),
  ) {
    // Many watchers may follow one job; each removes its listener when its call ends.
    this.events.setMaxListeners(0);
  }

  get finished(): boolean {
    return this.result !== undefined;
  }

  /** Every event so far, in order: what a new watcher is sent before live events. */
  history(): WatchJobResponse[] {
    const events: WatchJobResponse[] = this.progress.map((progress) => ({
      event: { $case: "progress", value: progress },
    }));
    if (this.result) events.push({ event: { $case: "result", value: this.result } });
    return events;
  }

  addProgress(progress: JobProgress): void {
    if (this.finished) return;
    this.state = JobState.JOB_STATE_RUNNING;
    this.progress.push(progress);
    this.events.emit("event", { event: { $case: "progress", value: progress } });
  }

  /** Records the job's one result; later calls are ignored (a job finishes once). */
  finish(result: JobResult): boolean {
    if (this.finished) return false;
    this.result = result;
    this.state = result.state;
    this.events.emit("event", { event: { $case: "result", value: result } });
    return true;
  }
}

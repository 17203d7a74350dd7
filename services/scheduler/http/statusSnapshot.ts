import { basename } from "node:path";
import { JobState } from "../../../gen/ferry/v1/scheduler";
import { jobFromStepStats, type TimelineJob } from "../../../lib/telemetry/timeline";
import type { Job } from "../jobs";
import type { Scheduler } from "../scheduler";

/** What the status page shows, as data (also served as JSON at /api/status). */
export interface StatusSnapshot {
  /** ISO time the snapshot was taken. */
  generated_at: string;
  executors: ExecutorStatus[];
  jobs: JobStatus[];
}

export interface ExecutorStatus {
  id: string;
  device: string;
  kind: string;
  total_bytes: number;
  /** Free for a new job, as of the last heartbeat. */
  free_bytes: number;
  /** Rates the scheduler plans with (calibrated from this executor's steps). */
  h2d_gbps: number;
  tflops: number;
  last_heartbeat_s_ago: number;
  running_job: string;
  queued_jobs: number;
  /** Models warm on it (host params cache), with what their last plan kept resident. */
  models: { path: string; name: string; resident_bytes: number; jobs: number }[];
}

export type JobStateName = "queued" | "running" | "succeeded" | "failed" | "cancelled" | "unknown";

export interface JobStatus {
  id: string;
  state: JobStateName;
  model: string;
  model_name: string;
  policy: string;
  executor: string;
  steps_done: number;
  steps: number;
  submitted_at: string;
  total_s: number | null;
  error: string;
  checksum: string;
  plan: {
    segments: number;
    resident_bytes: number;
    streamed_bytes_per_step: number;
    slots: number;
    predicted_step_s: number;
  };
}

const STATE_NAMES: Partial<Record<JobState, JobStateName>> = {
  [JobState.JOB_STATE_QUEUED]: "queued",
  [JobState.JOB_STATE_RUNNING]: "running",
  [JobState.JOB_STATE_SUCCEEDED]: "succeeded",
  [JobState.JOB_STATE_FAILED]: "failed",
  [JobState.JOB_STATE_CANCELLED]: "cancelled",
};

export function jobStateName(state: JobState): JobStateName {
  return STATE_NAMES[state] ?? "unknown";
}

function jobStatus(job: Job): JobStatus {
  return {
    id: job.id,
    state: jobStateName(job.state),
    model: job.spec.modelPath,
    model_name: basename(job.spec.modelPath),
    policy: job.plan?.policy || job.spec.policy,
    executor: job.executorId,
    steps_done: job.state === JobState.JOB_STATE_SUCCEEDED ? job.spec.steps : job.lastStep,
    steps: job.spec.steps,
    submitted_at: new Date(job.submittedMs).toISOString(),
    total_s: job.totalSeconds || null,
    error: job.errorMessage,
    checksum: job.checksum,
    plan: {
      segments: job.plan?.segments.length ?? 0,
      resident_bytes: job.plan?.residentBytes ?? 0,
      streamed_bytes_per_step: job.plan?.streamedBytesPerStep ?? 0,
      slots: job.plan?.slots ?? 0,
      predicted_step_s: job.plan?.predictedStepS ?? 0,
    },
  };
}

/** The scheduler's state for the status page: executors, then jobs newest first. */
export function statusSnapshot(scheduler: Scheduler, now = Date.now()): StatusSnapshot {
  const jobs = scheduler.allJobs();
  const executors = scheduler.listExecutors().map((info): ExecutorStatus => {
    const mine = jobs.filter((job) => job.executorId === info.executorId);
    const models = [
      ...new Set([
        ...info.warmModels,
        ...mine.filter((j) => !j.finished).map((j) => j.spec.modelPath),
      ]),
    ];
    return {
      id: info.executorId,
      device: info.device?.name ?? "",
      kind: info.device?.kind ?? "",
      total_bytes: info.device?.totalBytes ?? 0,
      free_bytes: info.device?.freeBytes ?? 0,
      h2d_gbps: info.calibrated?.h2dGbps ?? info.device?.h2dGbps ?? 0,
      tflops: info.calibrated?.tflops ?? info.device?.tflops ?? 0,
      last_heartbeat_s_ago: Math.max(0, (now - info.lastHeartbeatMs) / 1000),
      running_job: info.runningJobId,
      queued_jobs: mine.filter((job) => job.state === JobState.JOB_STATE_QUEUED).length,
      models: models.map((path) => {
        const ran = mine.filter((job) => job.spec.modelPath === path);
        // What the device holds for the model now: the running job's plan, else the last one
        // that ran to the end (a queued job's plan holds nothing yet).
        const latest =
          ran.find((job) => job.state === JobState.JOB_STATE_RUNNING) ??
          ran.filter((job) => job.state === JobState.JOB_STATE_SUCCEEDED).at(-1);
        return {
          path,
          name: basename(path),
          resident_bytes: latest?.plan?.residentBytes ?? 0,
          jobs: ran.length,
        };
      }),
    };
  });
  return {
    generated_at: new Date(now).toISOString(),
    executors,
    jobs: jobs.map(jobStatus).reverse(),
  };
}

/** A job's timeline from the step events its executor streamed; undefined before any step. */
export function jobTimeline(job: Job): TimelineJob | undefined {
  // Progress carries each step's events; the result's step list leaves them out.
  const stats = job.timeline.flatMap((step) => (step ? [step] : []));
  if (stats.length === 0) return undefined;
  return jobFromStepStats(
    {
      jobId: job.id,
      policy: job.plan?.policy || job.spec.policy,
      executor: job.executorId,
      device: "",
      origin: "",
    },
    stats,
  );
}

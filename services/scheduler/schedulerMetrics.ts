import type { Counter } from "@opentelemetry/api";
import { JobState } from "../../gen/ferry/v1/scheduler";
import { ferryMeter } from "../../lib/telemetry/api";
import type { Job } from "./jobs";

/** What the scheduler's observable gauges read when Prometheus scrapes. */
export interface SchedulerMetricsSource {
  jobs(): readonly Job[];
  executorIds(): string[];
}

const OUTCOMES: Partial<Record<JobState, string>> = {
  [JobState.JOB_STATE_SUCCEEDED]: "succeeded",
  [JobState.JOB_STATE_FAILED]: "failed",
  [JobState.JOB_STATE_CANCELLED]: "cancelled",
};

/**
 * The scheduler's OpenTelemetry metrics (Prometheus names; deploy/grafana/ferry.json uses them):
 * - `ferry_queue_length{executor}`: jobs waiting in each executor's queue;
 * - `ferry_jobs_running{executor}`: jobs running;
 * - `ferry_jobs_total{outcome, policy}`: finished jobs by outcome (succeeded, failed, cancelled);
 * - `ferry_executors_connected`: executors registered now.
 */
export class SchedulerMetrics {
  private readonly outcomes: Counter;

  constructor(source: SchedulerMetricsSource) {
    const meter = ferryMeter();
    this.outcomes = meter.createCounter("ferry_jobs", {
      description: "Finished jobs by outcome: succeeded, failed, cancelled",
    });
    const queued = meter.createObservableGauge("ferry_queue_length", {
      description: "Jobs queued on each executor",
    });
    const running = meter.createObservableGauge("ferry_jobs_running", {
      description: "Jobs running on each executor",
    });
    const executors = meter.createObservableGauge("ferry_executors_connected", {
      description: "Executors registered with the scheduler",
    });
    meter.addBatchObservableCallback(
      (result) => {
        const ids = source.executorIds();
        const count = (state: JobState) => {
          const byExecutor = new Map<string, number>(ids.map((id) => [id, 0]));
          for (const job of source.jobs()) {
            if (job.state !== state || !byExecutor.has(job.executorId)) continue;
            byExecutor.set(job.executorId, (byExecutor.get(job.executorId) ?? 0) + 1);
          }
          return byExecutor;
        };
        for (const [executor, n] of count(JobState.JOB_STATE_QUEUED))
          result.observe(queued, n, { executor });
        for (const [executor, n] of count(JobState.JOB_STATE_RUNNING))
          result.observe(running, n, { executor });
        result.observe(executors, ids.length);
      },
      [queued, running, executors],
    );
  }

  jobFinished(job: Job): void {
    this.outcomes.add(1, {
      outcome: OUTCOMES[job.state] ?? "unknown",
      policy: job.spec.policy || "sdcpp",
    });
  }
}

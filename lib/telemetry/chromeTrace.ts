import {
  jobEndUs,
  jobStartUs,
  laneLayout,
  sliceGbps,
  sliceName,
  type TimelineJob,
} from "./timeline";

/** One event of the Chrome trace-event format (what Perfetto and chrome://tracing load). */
export interface TraceEvent {
  name: string;
  ph: "X" | "M";
  pid: number;
  tid: number;
  ts?: number;
  dur?: number;
  cat?: string;
  args?: Record<string, unknown>;
}

const TID_JOBS = 1;
const TID_STEPS = 2;
/** Lanes get tids from here, 16 rows apart so extra rows keep their lane's order. */
const TID_LANES: Record<string, number> = { read: 16, copy: 32, compute: 48 };

const round3 = (value: number) => Math.round(value * 1000) / 1000;

/**
 * Chrome trace-event JSON for jobs: one process per executor (per trace file, when several are
 * given, so two runs stack one above the other), threads for the jobs, the steps, and the
 * read / copy / compute lanes; a slice per segment per stage with its bytes, source and GB/s in
 * args, and each compute's wait for its weights as a "stall" slice. Each trace file's times
 * start at 0, so stacked runs line up.
 */
export function chromeTrace(jobs: readonly TimelineJob[]): {
  traceEvents: TraceEvent[];
  displayTimeUnit: "ms";
} {
  const events: TraceEvent[] = [];
  const pids = new Map<string, number>();
  const threads = new Set<string>();
  const originStart = new Map<string, number>();
  for (const job of jobs) {
    const start = jobStartUs(job);
    originStart.set(job.origin, Math.min(originStart.get(job.origin) ?? Infinity, start));
  }
  const thread = (pid: number, tid: number, name: string) => {
    const key = `${pid}/${tid}`;
    if (threads.has(key)) return;
    threads.add(key);
    events.push({ name: "thread_name", ph: "M", pid, tid, args: { name } });
    events.push({ name: "thread_sort_index", ph: "M", pid, tid, args: { sort_index: tid } });
  };
  for (const job of jobs) {
    const processKey = `${job.origin}\u0000${job.executor}`;
    let pid = pids.get(processKey);
    if (pid === undefined) {
      pid = pids.size + 1;
      pids.set(processKey, pid);
      const name = job.origin ? `${job.executor} (${job.origin})` : job.executor;
      events.push({ name: "process_name", ph: "M", pid, tid: 0, args: { name } });
      events.push({ name: "process_sort_index", ph: "M", pid, tid: 0, args: { sort_index: pid } });
      if (job.device) {
        events.push({ name: "process_labels", ph: "M", pid, tid: 0, args: { labels: job.device } });
      }
    }
    const t0 = originStart.get(job.origin) ?? 0;
    const ts = (us: number) => round3(us - t0);
    thread(pid, TID_JOBS, "jobs");
    events.push({
      name: `${job.jobId}${job.policy ? ` (${job.policy})` : ""}`,
      cat: "job",
      ph: "X",
      pid,
      tid: TID_JOBS,
      ts: ts(jobStartUs(job)),
      dur: round3(jobEndUs(job) - jobStartUs(job)),
      args: { job: job.jobId, policy: job.policy, executor: job.executor, device: job.device },
    });
    thread(pid, TID_STEPS, "steps");
    for (const step of job.steps) {
      events.push({
        name: `step ${step.step}`,
        cat: "step",
        ph: "X",
        pid,
        tid: TID_STEPS,
        ts: ts(step.startUs),
        dur: round3(step.endUs - step.startUs),
        args: { job: job.jobId, step: step.step, stall_ms: round3(step.stallUs / 1000) },
      });
    }
    for (const lane of laneLayout(job)) {
      lane.rows.forEach((row, index) => {
        const tid = TID_LANES[lane.name] + Math.min(index, 15);
        thread(pid, tid, index === 0 ? lane.name : `${lane.name} ${index + 1}`);
        for (const item of row) {
          const slice = item.slice;
          const args: Record<string, unknown> = {
            job: job.jobId,
            step: slice.step,
            segment: slice.segment,
          };
          if (item.kind === "stall") {
            args.stall_ms = round3(slice.stallUs / 1000);
          } else {
            args.bytes = slice.bytes;
            if (slice.source) args.source = slice.source;
            if (slice.kind === "prepare_params") args.cold = slice.cold;
            const gbps = sliceGbps(slice);
            if (gbps !== undefined) args.gbps = round3(gbps);
            if (slice.kind === "compute") args.stall_ms = round3(slice.stallUs / 1000);
          }
          events.push({
            name: sliceName(item),
            cat: item.kind,
            ph: "X",
            pid,
            tid,
            ts: ts(item.startUs),
            dur: round3(item.endUs - item.startUs),
            args,
          });
        }
      });
    }
  }
  return { traceEvents: events, displayTimeUnit: "ms" };
}

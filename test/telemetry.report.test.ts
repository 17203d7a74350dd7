import { describe, expect, it } from "vitest";
import { chromeTrace } from "../lib/telemetry/chromeTrace";
import { svgToPng } from "../lib/telemetry/renderPng";
import { jobFromStepStats, jobsFromSpans, laneLayout } from "../lib/telemetry/timeline";
import { timelineSvg } from "../lib/telemetry/timelineSvg";
import { formatTraceReport, traceReport, type TraceSpan } from "../lib/telemetry/traceReport";

// A trace written by hand, so every number the report prints can be derived on paper.
// Times are milliseconds from an arbitrary epoch; spans form the executor's hierarchy.
const EPOCH_MS = 1_800_000_000_000;
let nextId = 1;

function span(
  name: string,
  parent: TraceSpan | undefined,
  startMs: number,
  endMs: number,
  attributes: TraceSpan["attributes"] = {},
  resource: TraceSpan["resource"] = {
    "service.name": "ferry-executor",
    "ferry.executor.id": "gpu0",
  },
): TraceSpan {
  return {
    traceId: parent?.traceId ?? `${nextId}`.padStart(32, "0"),
    spanId: `${nextId++}`.padStart(16, "0"),
    parentSpanId: parent?.spanId ?? "",
    name,
    startNs: BigInt(EPOCH_MS + startMs) * 1_000_000n,
    endNs: BigInt(EPOCH_MS + endMs) * 1_000_000n,
    attributes,
    resource,
  };
}

interface SegmentPlan {
  index: number;
  bytes: number;
  /** [start, end] ms of prepare, h2d, compute; null = not done this step (resident). */
  prepare: [number, number, boolean] | null;
  h2d: [number, number] | null;
  compute: [number, number];
  stallMs: number;
}

function step(
  spans: TraceSpan[],
  job: TraceSpan | undefined,
  jobId: string,
  number: number,
  from: number,
  to: number,
  segments: SegmentPlan[],
  extra: TraceSpan["attributes"] = {},
): TraceSpan {
  const stepSpan = span("ferry.step", job, from, to, {
    "ferry.job.id": jobId,
    "ferry.step": number,
    "ferry.stall_s": segments.reduce((sum, s) => sum + s.stallMs, 0) / 1000,
    ...extra,
  });
  spans.push(stepSpan);
  for (const plan of segments) {
    const first = plan.prepare?.[0] ?? plan.h2d?.[0] ?? plan.compute[0];
    const segment = span("ferry.segment", stepSpan, first, plan.compute[1], {
      "ferry.segment.index": plan.index,
      "ferry.bytes": plan.bytes,
    });
    spans.push(segment);
    const leaf = { "ferry.segment.index": plan.index, "ferry.bytes": plan.bytes };
    if (plan.prepare) {
      const [start, end, cold] = plan.prepare;
      spans.push(
        span("ferry.prepare_params", segment, start, end, {
          ...leaf,
          "ferry.cold": cold,
          "ferry.source": cold ? "disk" : "host",
        }),
      );
    }
    if (plan.h2d) spans.push(span("ferry.h2d", segment, plan.h2d[0], plan.h2d[1], leaf));
    spans.push(
      span("ferry.compute", segment, plan.compute[0], plan.compute[1], {
        ...leaf,
        "ferry.stall_s": plan.stallMs / 1000,
      }),
    );
  }
  return stepSpan;
}

/**
 * Job A (sdcpp, serial): 2 steps, segments 0 (1,000 B) and 1 (2,000 B) streamed every step.
 * Job B (ferry): 1 step, a read ahead of use before step 1, segment 0 resident (no copy).
 */
function handTrace(): TraceSpan[] {
  const spans: TraceSpan[] = [];
  const jobA = span(
    "ferry.job",
    undefined,
    0,
    200,
    { "ferry.job.id": "job-a", "ferry.policy": "sdcpp" },
    { "service.name": "ferry-scheduler" },
  );
  spans.push(jobA);
  step(spans, jobA, "job-a", 1, 0, 100, [
    {
      index: 0,
      bytes: 1000,
      prepare: [0, 10, true],
      h2d: [10, 15],
      compute: [15, 35],
      stallMs: 15,
    },
    {
      index: 1,
      bytes: 2000,
      prepare: [35, 55, true],
      h2d: [55, 65],
      compute: [65, 95],
      stallMs: 30,
    },
  ]);
  step(spans, jobA, "job-a", 2, 100, 180, [
    {
      index: 0,
      bytes: 1000,
      prepare: [100, 101, false],
      h2d: [101, 106],
      compute: [106, 126],
      stallMs: 6,
    },
    {
      index: 1,
      bytes: 2000,
      prepare: [126, 127, false],
      h2d: [127, 137],
      compute: [137, 167],
      stallMs: 11,
    },
  ]);
  const jobB = span(
    "ferry.job",
    undefined,
    300,
    400,
    { "ferry.job.id": "job-b", "ferry.policy": "ferry" },
    { "service.name": "ferry-scheduler" },
  );
  spans.push(jobB);
  // A read before step 1, parented to the job (not a step): it still counts for job B.
  spans.push(
    span("ferry.read", jobB, 300, 308, {
      "ferry.job.id": "job-b",
      "ferry.segment.index": 0,
      "ferry.bytes": 1000,
    }),
  );
  step(
    spans,
    jobB,
    "job-b",
    1,
    310,
    340,
    [
      {
        index: 0,
        bytes: 1000,
        prepare: [310, 311, false],
        h2d: null,
        compute: [311, 331],
        stallMs: 1,
      },
    ],
    { "ferry.policy": "ferry" },
  );
  return spans;
}

describe("the per-stage report", () => {
  const report = traceReport(jobsFromSpans(handTrace()), 3);
  const stage = (group: number, key: string) =>
    report.groups[group].stages.find((row) => row.stage === key)!;

  it("lists the jobs in start order with their policies (from the scheduler's job spans)", () => {
    expect(report.jobs.map((job) => [job.job_id, job.policy, job.executor, job.steps])).toEqual([
      ["job-a", "sdcpp", "gpu0", 2],
      ["job-b", "ferry", "gpu0", 1],
    ]);
    expect(report.jobs[0].first_step_s).toBeCloseTo(0.1, 9);
    expect(report.jobs[0].later_step_median_s).toBeCloseTo(0.08, 9);
    expect(report.jobs[0].stall_s).toBeCloseTo(0.062, 9);
  });

  it("splits the first job's cold step from its later steps and from later jobs", () => {
    expect(report.groups.map((group) => [group.group, group.job_ids, group.steps])).toEqual([
      ["first_job_cold_step", ["job-a"], 1],
      ["first_job_later_steps", ["job-a"], 1],
      ["later_jobs", ["job-b"], 1],
    ]);
    // Cold: both prepares read from disk, 10 and 20 ms for 1,000 + 2,000 bytes.
    expect(stage(0, "prepare_params_disk")).toMatchObject({ calls: 2, bytes: 3000 });
    expect(stage(0, "prepare_params_disk").min_s).toBeCloseTo(0.01, 9);
    expect(stage(0, "prepare_params_disk").median_s).toBeCloseTo(0.015, 9);
    expect(stage(0, "prepare_params_disk").max_s).toBeCloseTo(0.02, 9);
    expect(stage(0, "prepare_params_disk").total_s).toBeCloseTo(0.03, 9);
    expect(stage(0, "prepare_params_disk").gbps).toBeCloseTo(3000 / 0.03 / 1e9, 12);
    expect(stage(0, "prepare_params_host").calls).toBe(0);
    expect(stage(0, "h2d")).toMatchObject({ calls: 2, bytes: 3000 });
    expect(stage(0, "h2d").total_s).toBeCloseTo(0.015, 9);
    expect(stage(0, "compute")).toMatchObject({ calls: 2, bytes: 0, gbps: null });
    expect(stage(0, "compute").total_s).toBeCloseTo(0.05, 9);
    expect(stage(0, "stall").calls).toBe(2);
    expect(stage(0, "stall").total_s).toBeCloseTo(0.045, 9);
    // Warm: the host cache serves both prepares in 1 ms each.
    expect(stage(1, "prepare_params_disk").calls).toBe(0);
    expect(stage(1, "prepare_params_host")).toMatchObject({ calls: 2, bytes: 3000 });
    expect(stage(1, "prepare_params_host").total_s).toBeCloseTo(0.002, 9);
    expect(stage(1, "stall").total_s).toBeCloseTo(0.017, 9);
    // Job B: its read ahead of use is a stage of its own; its resident segment copies nothing.
    expect(stage(2, "read")).toMatchObject({ calls: 1, bytes: 1000 });
    expect(stage(2, "read").total_s).toBeCloseTo(0.008, 9);
    expect(stage(2, "h2d").calls).toBe(0);
    expect(stage(2, "compute").calls).toBe(1);
  });

  it("ranks segments by the time compute waited for them", () => {
    expect(
      report.top_stalls.map((s) => [s.job_id, s.segment, s.stalled_steps, s.sources, s.bytes]),
    ).toEqual([
      ["job-a", 1, 2, ["disk", "host"], 2000],
      ["job-a", 0, 2, ["disk", "host"], 1000],
      ["job-b", 0, 1, ["host"], 1000],
    ]);
    expect(report.top_stalls[0].total_stall_s).toBeCloseTo(0.041, 9);
    expect(report.top_stalls[0].max_stall_s).toBeCloseTo(0.03, 9);
  });

  it("prints the table a person reads", () => {
    const text = formatTraceReport(report);
    expect(text).toContain("job 1, step 1 (cold)");
    expect(text).toContain("job 1, steps 2+");
    expect(text).toMatch(/prepare_params \(disk\)\s+2\s+10\.0 ms\s+15\.0 ms\s+20\.0 ms\s+30\.0 ms/);
    expect(text).toMatch(/read ahead \(disk\)\s+1\s+8\.00 ms/);
    expect(text).toContain("segments compute waited for longest");
  });
});

describe("timelines", () => {
  const jobs = jobsFromSpans(handTrace(), "a.jsonl");

  it("lays each compute's wait just before it, in the compute lane", () => {
    const lanes = laneLayout(jobs[0]);
    expect(lanes.map((lane) => lane.name)).toEqual(["copy", "compute"]);
    const compute = lanes[1].rows.flat();
    expect(lanes[1].rows).toHaveLength(1);
    const stalls = compute.filter((item) => item.kind === "stall");
    expect(stalls).toHaveLength(4);
    // Segment 1 of step 1 computes from 65 ms and waited 30 ms: its stall is 35–65 ms.
    expect(stalls[1].endUs - stalls[1].startUs).toBeCloseTo(30_000, 3);
    expect(laneLayout(jobs[1]).map((lane) => lane.name)).toEqual(["read", "copy", "compute"]);
  });

  it("writes Chrome trace JSON: a process per executor and file, copy/compute lanes, args per slice", () => {
    const other = jobsFromSpans(handTrace(), "b.jsonl");
    const { traceEvents } = chromeTrace([...jobs, ...other]);
    const processes = traceEvents.filter((e) => e.name === "process_name");
    expect(processes.map((e) => e.args!.name)).toEqual(["gpu0 (a.jsonl)", "gpu0 (b.jsonl)"]);
    const threads = traceEvents.filter((e) => e.name === "thread_name" && e.pid === 1);
    expect(threads.map((e) => e.args!.name)).toEqual(["jobs", "steps", "copy", "compute", "read"]);
    const h2d = traceEvents.find((e) => e.cat === "h2d" && e.pid === 1)!;
    expect(h2d).toMatchObject({ ph: "X", name: "h2d seg 0", ts: 10_000, dur: 5_000 });
    expect(h2d.args).toMatchObject({ bytes: 1000, segment: 0, step: 1, gbps: 0 });
    const prepare = traceEvents.find((e) => e.cat === "prepare_params" && e.pid === 1)!;
    expect(prepare.args).toMatchObject({ bytes: 1000, source: "disk", cold: true });
    expect(traceEvents.filter((e) => e.cat === "stall" && e.pid === 1)).toHaveLength(5);
    // Each file starts at 0, so stacked runs line up.
    const firstOf = (pid: number) =>
      Math.min(...traceEvents.filter((e) => e.pid === pid && e.ph === "X").map((e) => e.ts!));
    expect([firstOf(1), firstOf(2)]).toEqual([0, 0]);
  });

  it("draws one panel per job, on one scale, with steps and stalls, and renders it to PNG", () => {
    const svg = timelineSvg(jobs, { width: 900, title: "two jobs" });
    expect(svg.startsWith("<svg")).toBe(true);
    expect(svg.endsWith("</svg>")).toBe(true);
    expect(svg).toContain("sdcpp — job-a");
    expect(svg).toContain("ferry — job-b");
    expect(svg).toContain(">step 1<");
    expect(svg.match(/fill="#d62f2f"/g)!.length).toBeGreaterThanOrEqual(5);
    const png = svgToPng(svg, 2);
    expect(png.subarray(1, 4).toString("latin1")).toBe("PNG");
    expect(png.readUInt32BE(16)).toBe(1800); // IHDR width: 900 px at zoom 2
  });

  it("draws the status page's jobs from the step events the executor streams", () => {
    const job = jobFromStepStats(
      { jobId: "job-c", policy: "ferry", executor: "gpu1", device: "cpu", origin: "" },
      [
        {
          step: 1,
          stepSeconds: 0.01,
          prepareSeconds: 0,
          h2dSeconds: 0.002,
          computeSeconds: 0.006,
          h2dBytes: 64,
          diskBytes: 64,
          arenaPeakBytes: 0,
          segments: [],
          stallSeconds: 0.002,
          startUs: 1_000,
          endUs: 11_000,
          events: [
            {
              kind: "segment",
              segment: 0,
              startUs: 1_000,
              endUs: 10_000,
              bytes: 64,
              source: "disk",
              cold: false,
              stallUs: 0,
            },
            {
              kind: "prepare_params",
              segment: 0,
              startUs: 1_000,
              endUs: 2_000,
              bytes: 64,
              source: "disk",
              cold: true,
              stallUs: 0,
            },
            {
              kind: "h2d",
              segment: 0,
              startUs: 2_000,
              endUs: 4_000,
              bytes: 64,
              source: "",
              cold: false,
              stallUs: 0,
            },
            {
              kind: "compute",
              segment: 0,
              startUs: 4_000,
              endUs: 10_000,
              bytes: 64,
              source: "",
              cold: false,
              stallUs: 2_000,
            },
            {
              kind: "read",
              segment: 1,
              startUs: 500,
              endUs: 900,
              bytes: 32,
              source: "disk",
              cold: true,
              stallUs: 0,
            },
          ],
        },
      ],
    );
    expect(job.slices.map((slice) => slice.kind)).toEqual([
      "read",
      "prepare_params",
      "h2d",
      "compute",
    ]);
    const report = traceReport([job]);
    expect(report.groups[0].stages.find((s) => s.stage === "read")!.bytes).toBe(32);
    expect(report.groups[0].stages.find((s) => s.stage === "stall")!.total_s).toBeCloseTo(0.002, 9);
  });
});

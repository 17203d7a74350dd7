import { copyFile, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { JobSpec, type JobResult } from "../gen/ferry/v1/scheduler";
import { SchedulerClient } from "../lib/client/schedulerClient";
import { genModel } from "../lib/model/genModel";
import { packageRoot } from "../lib/packageInfo";
import type { TraceReport } from "../lib/telemetry/traceReport";
import { runFerry, startExecutor, startServe, type FerryProcess } from "./helpers/ferryProcesses";

/** Prometheus text format → { "name{labels}": value } and the set of metric names. */
function parsePrometheus(text: string): { samples: Map<string, number>; names: Set<string> } {
  const samples = new Map<string, number>();
  const names = new Set<string>();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    names.add(match[1]);
    samples.set(`${match[1]}${match[2] ?? ""}`, Number(match[3]));
  }
  return { samples, names };
}

/** Samples of one metric whose labels include all of `labels`. */
function valuesOf(
  samples: Map<string, number>,
  name: string,
  labels: Record<string, string> = {},
): number[] {
  return [...samples]
    .filter(([key]) => key === name || key.startsWith(`${name}{`))
    .filter(([key]) => Object.entries(labels).every(([k, v]) => key.includes(`${k}="${v}"`)))
    .map(([, value]) => value);
}

// Real `ferry serve` and `ferry executor` processes writing a trace file and serving metrics;
// jobs submitted by a real client; then the CLI reads the trace back.
describe("what a person investigating a slow step gets", () => {
  let dir: string;
  let modelPath: string;
  let traceFile: string;
  let client: SchedulerClient;
  let schedulerMetrics: string;
  let executorMetrics: string;
  const processes: FerryProcess[] = [];
  const results: JobResult[] = [];

  const spec = (policy: string): JobSpec =>
    JobSpec.fromPartial({
      modelPath,
      steps: 3,
      batch: 2,
      tokens: 16,
      seed: 0,
      maxVramGib: 0.6 / 1024,
      policy,
      paramsBackend: "cpu",
      load: "lazy",
    });

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-observe-"));
    modelPath = join(dir, "tiny.safetensors");
    traceFile = join(dir, "trace.jsonl");
    await genModel(modelPath, { blocks: 3, hidden: 64, heads: 4, channels: 8, seed: 7 });
    const env = { FERRY_TRACE_FILE: traceFile, OTEL_TRACES_EXPORTER: "" };
    const serve = await startServe(["--metrics-port", "0", "--model-dir", dir], env);
    processes.push(serve.process);
    schedulerMetrics = serve.metricsUrl!;
    const executor = await startExecutor(
      serve.address,
      "observe-gpu0",
      ["--metrics-port", "0"],
      env,
    );
    processes.push(executor.process);
    executorMetrics = executor.metricsUrl!;
    client = new SchedulerClient(serve.address);
    // sd.cpp's policy first (the cold job), then Ferry's on the warm host cache.
    for (const policy of ["sdcpp", "ferry"]) results.push(await client.runJob(spec(policy)));
    // Spans are exported as each ends; the last step's may trail the result by a moment.
    for (let attempt = 0; attempt < 100; attempt++) {
      const text = await readFile(traceFile, "utf8").catch(() => "");
      if ((text.match(/"ferry\.step"/g) ?? []).length >= 6) break;
      await new Promise((done) => setTimeout(done, 50));
    }
  }, 60_000);

  afterAll(async () => {
    client?.close();
    for (const process of processes.reverse()) await process.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it("ferry trace report --json: the cold step, the later steps and the later job, only JSON on stdout", async () => {
    const { code, stdout, stderr } = await runFerry(["trace", "report", traceFile, "--json"]);
    expect(stderr).toBe("");
    expect(code).toBe(0);
    const report = JSON.parse(stdout) as TraceReport;
    expect(report.jobs.map((job) => [job.job_id, job.policy, job.executor, job.steps])).toEqual([
      [results[0].jobId, "sdcpp", "observe-gpu0", 3],
      [results[1].jobId, "ferry", "observe-gpu0", 3],
    ]);
    const [cold, later, laterJobs] = report.groups;
    expect([cold.group, later.group, laterJobs.group]).toEqual([
      "first_job_cold_step",
      "first_job_later_steps",
      "later_jobs",
    ]);
    const stage = (group: typeof cold, key: string) =>
      group.stages.find((row) => row.stage === key)!;
    // Lazy loading: step 1 of the first job reads every segment from disk, nothing after it.
    const diskBytes = results[0].steps[0].diskBytes;
    expect(diskBytes).toBeGreaterThan(0);
    expect(stage(cold, "prepare_params_disk").bytes).toBe(diskBytes);
    expect(stage(cold, "prepare_params_host").calls).toBe(0);
    expect(stage(later, "prepare_params_disk").calls).toBe(0);
    expect(stage(later, "prepare_params_host").calls).toBeGreaterThan(0);
    expect(stage(laterJobs, "prepare_params_disk").calls).toBe(0);
    // The copies the report counts are the ones the executor reported.
    expect(stage(cold, "h2d").bytes).toBe(results[0].steps[0].h2dBytes);
    expect(stage(later, "h2d").bytes).toBe(
      results[0].steps[1].h2dBytes + results[0].steps[2].h2dBytes,
    );
    expect(stage(laterJobs, "h2d").bytes).toBe(
      results[1].steps.reduce((sum, step) => sum + step.h2dBytes, 0),
    );
    expect(stage(cold, "h2d").gbps).toBeGreaterThan(0);
    expect(stage(cold, "compute").calls).toBe(results[0].steps[0].segments.length);
  });

  it("ferry trace report prints the per-stage table", async () => {
    const { code, stdout } = await runFerry(["trace", "report", traceFile, "--top", "2"]);
    expect(code).toBe(0);
    expect(stdout).toContain("job 1, step 1 (cold)");
    expect(stdout).toMatch(
      /stage\s+calls\s+min\/call\s+median\/call\s+max\/call\s+total\s+bytes\s+GB\/s/,
    );
    expect(stdout).toMatch(/prepare_params \(disk\)\s+\d+/);
    expect(stdout).toContain(`job 2 — 3 steps`);
  });

  it("ferry trace timeline writes Perfetto JSON, SVG and PNG; two traces stack", async () => {
    const other = join(dir, "again.jsonl");
    await copyFile(traceFile, other);
    const json = join(dir, "t.json");
    const run = await runFerry(["trace", "timeline", traceFile, other, "--out", json]);
    expect(run.code).toBe(0);
    const { traceEvents } = JSON.parse(await readFile(json, "utf8")) as {
      traceEvents: {
        name: string;
        ph: string;
        pid: number;
        cat?: string;
        args?: Record<string, unknown>;
      }[];
    };
    expect(traceEvents.filter((e) => e.name === "process_name").map((e) => e.args!.name)).toEqual([
      "observe-gpu0 (trace.jsonl)",
      "observe-gpu0 (again.jsonl)",
    ]);
    const copy = traceEvents.find((e) => e.cat === "h2d")!;
    expect(copy.args).toMatchObject({ bytes: expect.any(Number), gbps: expect.any(Number) });
    expect(traceEvents.some((e) => e.cat === "prepare_params" && e.args!.source === "disk")).toBe(
      true,
    );

    const svgPath = join(dir, "t.svg");
    expect((await runFerry(["trace", "timeline", traceFile, "--out", svgPath])).code).toBe(0);
    const svg = await readFile(svgPath, "utf8");
    expect(svg).toContain(`sdcpp — ${results[0].jobId}`);
    expect(svg).toContain(`ferry — ${results[1].jobId}`);

    const pngPath = join(dir, "t.png");
    const png = await runFerry([
      "trace",
      "timeline",
      traceFile,
      other,
      "--out",
      pngPath,
      "--width",
      "1000",
    ]);
    expect(png.code).toBe(0);
    const bytes = await readFile(pngPath);
    expect(bytes.subarray(0, 8).equals(Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]))).toBe(true);
    expect(bytes.readUInt32BE(16)).toBe(2000);
    expect(bytes.readUInt32BE(20)).toBeGreaterThan(400); // four panels stacked
  });

  it("bad input gets one clear line naming the problem, and nothing on stdout", async () => {
    const missing = await runFerry(["trace", "report", join(dir, "nope.jsonl"), "--json"]);
    expect(missing.code).toBe(1);
    expect(missing.stdout).toBe("");
    expect(missing.stderr).toMatch(/nope\.jsonl does not exist/);
    const garbage = join(dir, "garbage.jsonl");
    await writeFile(garbage, "not json\n{also not\n");
    const bad = await runFerry(["trace", "report", garbage, "--json"]);
    expect(bad.code).toBe(1);
    expect(bad.stdout).toBe("");
    expect(bad.stderr).toMatch(/garbage\.jsonl is not an OTLP-JSON trace file/);
    const empty = join(dir, "empty.jsonl");
    await writeFile(empty, `${JSON.stringify({ resourceSpans: [] })}\n`);
    expect(
      (await runFerry(["trace", "timeline", empty, "--out", join(dir, "e.svg")])).stderr,
    ).toMatch(/no ferry\.step spans in .*empty\.jsonl/);
    const format = await runFerry(["trace", "timeline", traceFile, "--out", join(dir, "t.txt")]);
    expect(format.code).toBe(1);
    expect(format.stderr).toMatch(/--out must end in \.json, \.svg or \.png/);
    const job = await runFerry([
      "trace",
      "timeline",
      traceFile,
      "--job",
      "job-nope",
      "--out",
      join(dir, "j.svg"),
    ]);
    expect(job.stderr).toMatch(/no job job-nope in the trace/);
  });

  it("metrics: real endpoints after real jobs, and every dashboard query names a metric that exists", async () => {
    const scheduler = parsePrometheus(await (await fetch(schedulerMetrics)).text());
    const executor = parsePrometheus(await (await fetch(executorMetrics)).text());
    // The executor counted exactly the bytes it reported per step.
    const h2d = results.flatMap((r) => r.steps).reduce((sum, step) => sum + step.h2dBytes, 0);
    const disk = results.flatMap((r) => r.steps).reduce((sum, step) => sum + step.diskBytes, 0);
    expect(valuesOf(executor.samples, "ferry_moved_bytes_total", { tier: "h2d" })).toEqual([h2d]);
    expect(valuesOf(executor.samples, "ferry_moved_bytes_total", { tier: "disk" })).toEqual([disk]);
    expect(
      valuesOf(executor.samples, "ferry_step_duration_seconds_count").reduce((a, b) => a + b, 0),
    ).toBe(6);
    expect(valuesOf(executor.samples, "ferry_resident_bytes", { model: modelPath })).toHaveLength(
      1,
    );
    expect(valuesOf(scheduler.samples, "ferry_jobs_total", { outcome: "succeeded" })).toEqual([
      1, 1,
    ]);
    expect(valuesOf(scheduler.samples, "ferry_queue_length", { executor: "observe-gpu0" })).toEqual(
      [0],
    );
    expect(valuesOf(scheduler.samples, "ferry_executors_connected")).toEqual([1]);

    const dashboard = JSON.parse(
      await readFile(join(packageRoot(), "deploy", "grafana", "ferry.json"), "utf8"),
    ) as {
      panels: { title: string; targets: { expr: string }[] }[];
      templating: { list: { definition?: string }[] };
    };
    const queries = [
      ...dashboard.panels.flatMap((panel) => panel.targets.map((target) => target.expr)),
      ...dashboard.templating.list.flatMap((variable) => variable.definition ?? []),
    ];
    expect(queries.length).toBeGreaterThan(8);
    const exported = new Set([...scheduler.names, ...executor.names]);
    for (const query of queries) {
      const names = query.match(/\bferry_[a-z0-9_]+/g) ?? [];
      expect(names.length, query).toBeGreaterThan(0);
      for (const name of names) expect(exported, `${name} in ${query}`).toContain(name);
    }
  });
});

import { rename, writeFile } from "node:fs/promises";
import { basename, extname, resolve } from "node:path";
import type { Command } from "commander";
import { parseIntegerFlag } from "../../lib/config/config";
import { chromeTrace } from "../../lib/telemetry/chromeTrace";
import { svgToPng } from "../../lib/telemetry/renderPng";
import { jobsFromSpans, type TimelineJob } from "../../lib/telemetry/timeline";
import { timelineSvg } from "../../lib/telemetry/timelineSvg";
import { formatTraceReport, readTraceFile, traceReport } from "../../lib/telemetry/traceReport";
import { action } from "../action";

/**
 * The jobs in trace files, in order: each file's jobs in the order they started. With several
 * files, each job is labelled with its file's name so stacked runs can be told apart.
 */
async function readJobs(files: string[], command: string, jobIds: string[] = []) {
  const jobs: TimelineJob[] = [];
  for (const file of files) {
    const { spans, badLines } = await readTraceFile(file);
    if (badLines.length > 0) {
      process.stderr.write(
        `ferry trace ${command}: ${file}: skipped ${badLines.length} malformed line(s): ` +
          `${badLines.slice(0, 5).join(", ")}${badLines.length > 5 ? ", …" : ""}\n`,
      );
    }
    const found = jobsFromSpans(spans, files.length > 1 ? basename(file) : "");
    if (found.length === 0) {
      throw new Error(
        `no ferry.step spans in ${file} (was FERRY_TRACE_FILE or an OTLP exporter set for the executor?)`,
      );
    }
    jobs.push(...found);
  }
  if (jobIds.length === 0) return jobs;
  const missing = jobIds.filter((id) => !jobs.some((job) => job.jobId === id));
  if (missing.length > 0) {
    throw new Error(
      `no job ${missing.join(", ")} in the trace (jobs there: ${jobs.map((job) => job.jobId).join(", ")})`,
    );
  }
  return jobs.filter((job) => jobIds.includes(job.jobId));
}

/** Writes beside the target, then renames: a reader never sees half a picture. */
async function writeAtomically(path: string, data: string | Buffer): Promise<void> {
  const target = resolve(path);
  await writeFile(`${target}.tmp`, data);
  await rename(`${target}.tmp`, target);
}

const collect = (value: string, previous: string[]) => [...previous, value];

export function register(program: Command): void {
  const trace = program
    .command("trace")
    .description("read trace files (FERRY_TRACE_FILE, or an OTLP collector's file exporter)");
  trace
    .command("report <files...>")
    .description(
      "per-stage table (prepare from disk / host cache, h2d, compute, stall) for the first " +
        "job's cold step, its later steps and later jobs; the segments that stalled most",
    )
    .option("--top <n>", "segments to list by stall", "5")
    .option("--json", "print the report as JSON (only JSON on stdout)")
    .action(
      action("trace report", async (files: string[], flags: { top: string; json?: boolean }) => {
        const top = parseIntegerFlag("--top", flags.top, 0, 10_000);
        const report = traceReport(await readJobs(files, "report"), top);
        if (flags.json) process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
        else process.stdout.write(`${formatTraceReport(report)}\n`);
      }),
    );
  trace
    .command("timeline <files...>")
    .description(
      "a timeline of the jobs in trace files: Chrome trace-event JSON for Perfetto (.json), or " +
        "a picture (.svg, .png) with one panel per job, stacked on one time scale",
    )
    .requiredOption("--out <path>", "t.json (Perfetto / chrome://tracing), t.svg or t.png")
    .option("--job <id>", "only this job (repeatable)", collect, [])
    .option("--steps <n>", "pictures: draw only each job's first n steps (0 = all)", "0")
    .option("--width <px>", "pictures: width in pixels", "1200")
    .option("--title <text>", "pictures: a heading")
    .action(
      action(
        "trace timeline",
        async (
          files: string[],
          flags: { out: string; job: string[]; steps: string; width: string; title?: string },
        ) => {
          const format = extname(flags.out).toLowerCase();
          if (![".json", ".svg", ".png"].includes(format)) {
            throw new Error(`--out must end in .json, .svg or .png (got '${flags.out}')`);
          }
          const maxSteps = parseIntegerFlag("--steps", flags.steps, 0, 1_000_000);
          const width = parseIntegerFlag("--width", flags.width, 400, 20_000);
          const jobs = await readJobs(files, "timeline", flags.job);
          if (format === ".json") {
            await writeAtomically(flags.out, `${JSON.stringify(chromeTrace(jobs))}\n`);
          } else {
            const svg = timelineSvg(jobs, { width, maxSteps, title: flags.title });
            await writeAtomically(flags.out, format === ".svg" ? svg : svgToPng(svg));
          }
          process.stderr.write(
            `ferry trace timeline: ${jobs.length} job(s) written to ${flags.out}\n`,
          );
        },
      ),
    );
}

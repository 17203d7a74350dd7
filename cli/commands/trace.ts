import type { Command } from "commander";
import { formatBytes } from "../../lib/config/units";
import { readTraceFile, stepReports, type StepReport } from "../../lib/telemetry/traceReport";
import { action } from "../action";

function formatReport(steps: StepReport[], top: number): string {
  if (steps.length === 0) return "no ferry.step spans in this file";
  const lines: string[] = [];
  let job = "";
  for (const step of steps) {
    if (step.jobId !== job) {
      job = step.jobId;
      lines.push(`job ${job || "(unknown)"}`);
    }
    const gbps = step.h2dS > 0 ? ` ${(step.h2dBytes / step.h2dS / 1e9).toFixed(2)} GB/s,` : "";
    lines.push(
      `  step ${step.step}: ${step.stepS.toFixed(3)} s = prepare ${step.prepareS.toFixed(3)} s, ` +
        `h2d ${step.h2dS.toFixed(3)} s (${formatBytes(step.h2dBytes)},${gbps} ` +
        `${(100 * step.hiddenFraction).toFixed(0)}% hidden behind compute), ` +
        `compute ${step.computeS.toFixed(3)} s`,
    );
    const slowest = [...step.segments]
      .sort((a, b) => b.prepareS + b.h2dS + b.computeS - (a.prepareS + a.h2dS + a.computeS))
      .slice(0, top);
    for (const segment of slowest) {
      lines.push(
        `    segment ${segment.index} (${segment.source}, ${formatBytes(segment.bytes)}): ` +
          `prepare ${segment.prepareS.toFixed(3)} s, h2d ${segment.h2dS.toFixed(3)} s, ` +
          `compute ${segment.computeS.toFixed(3)} s`,
      );
    }
  }
  return lines.join("\n");
}

export function register(program: Command): void {
  const trace = program
    .command("trace")
    .description("read trace files written by FERRY_TRACE_FILE");
  trace
    .command("report <file>")
    .description("where each step's time went: prepare, copy, compute, overlap, slowest segments")
    .option("--top <n>", "slowest segments to list per step", "3")
    .option("--json", "print the per-step breakdown as JSON")
    .action(
      action("trace report", async (file: string, flags: { top: string; json?: boolean }) => {
        const { spans, badLines } = await readTraceFile(file);
        if (badLines.length > 0) {
          process.stderr.write(
            `ferry trace report: skipped ${badLines.length} malformed line(s): ${badLines.slice(0, 5).join(", ")}\n`,
          );
        }
        const steps = stepReports(spans);
        if (flags.json) process.stdout.write(`${JSON.stringify(steps, null, 2)}\n`);
        else process.stdout.write(`${formatReport(steps, Math.max(0, Number(flags.top) || 0))}\n`);
      }),
    );
}

import type { Command } from "commander";
import { JobInfo, JobState } from "../../gen/ferry/v1/scheduler";
import type { ClientFlags } from "../../lib/config/config";
import { action } from "../action";
import { addConnectionOptions, clientFromFlags } from "./connection";

const STATES = ["queued", "running", "succeeded", "failed", "cancelled"];

function stateOf(name: string): JobState {
  const index = STATES.indexOf(name.toLowerCase());
  if (index < 0) throw new Error(`--state must be one of ${STATES.join(", ")} (got '${name}')`);
  return (index + 1) as JobState;
}

function line(job: JobInfo): string {
  const state = JobState[job.state].replace("JOB_STATE_", "").toLowerCase();
  return (
    `${job.jobId}  ${state.padEnd(9)} p${String(job.priority).padEnd(5)} ${(job.executorId || "-").padEnd(16)} ` +
    `step ${job.lastStep}/${job.spec?.steps ?? "?"}  attempts ${job.attempts}` +
    `${job.error ? `  ${job.error.code}: ${job.error.message}` : ""}`
  );
}

/** How a split job runs across executors, and why (nothing for a job on one executor). */
function splitLines(job: JobInfo): string {
  const choice = job.multiGpu;
  if (!choice || choice.mode === "single" || choice.shares.length === 0) return "";
  const parts = choice.shares.map((share) =>
    choice.mode === "pipeline"
      ? `base segments ${share.firstBase}–${share.lastBase} on ${share.executorId}`
      : `samples ${share.firstSample}–${share.firstSample + share.samples - 1} on ${share.executorId}`,
  );
  const kind = choice.mode === "pipeline" ? "pipeline" : "batch split";
  return (
    `  ${kind} over ${choice.shares.length}: ${parts.join(", ")}\n` +
    `  ${choice.explanation.at(-1) ?? ""}\n`
  );
}

/** Adds `jobs` (list, get, cancel). */
export function register(program: Command): void {
  const jobs = program.command("jobs").description("the scheduler's jobs");
  addConnectionOptions(
    jobs
      .command("list", { isDefault: true })
      .description("jobs the scheduler holds, oldest first")
      .option("--state <state...>", `only these states: ${STATES.join(", ")}`)
      .option("--json", "print JSON"),
  ).action(
    action("jobs list", async (flags: ClientFlags & { state?: string[]; json?: boolean }) => {
      const client = clientFromFlags(flags);
      try {
        const states = (flags.state ?? []).map(stateOf);
        const all: JobInfo[] = [];
        let pageToken = "";
        do {
          const page = await client.listJobs({ states, pageSize: 1000, pageToken });
          all.push(...page.jobs);
          pageToken = page.nextPageToken;
        } while (pageToken);
        process.stdout.write(
          flags.json
            ? `${JSON.stringify(
                all.map((job) => JobInfo.toJSON(job)),
                null,
                2,
              )}\n`
            : all.map((job) => `${line(job)}\n`).join(""),
        );
      } finally {
        client.close();
      }
    }),
  );
  addConnectionOptions(
    jobs.command("get <job-id>").description("one job").option("--json", "print JSON"),
  ).action(
    action("jobs get", async (id: string, flags: ClientFlags & { json?: boolean }) => {
      const client = clientFromFlags(flags);
      try {
        const job = await client.getJob(id);
        process.stdout.write(
          flags.json
            ? `${JSON.stringify(JobInfo.toJSON(job), null, 2)}\n`
            : `${line(job)}\n${splitLines(job)}`,
        );
      } finally {
        client.close();
      }
    }),
  );
  addConnectionOptions(jobs.command("cancel <job-id>").description("cancel a job")).action(
    action("jobs cancel", async (id: string, flags: ClientFlags) => {
      const client = clientFromFlags(flags);
      try {
        const state = await client.cancelJob(id);
        process.stdout.write(`${JobState[state].replace("JOB_STATE_", "").toLowerCase()}\n`);
      } finally {
        client.close();
      }
    }),
  );
}

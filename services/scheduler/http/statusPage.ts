import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import { formatBytes } from "../../../lib/config/units";
import { chromeTrace } from "../../../lib/telemetry/chromeTrace";
import { timelineSvg } from "../../../lib/telemetry/timelineSvg";
import { formatSeconds } from "../../../lib/telemetry/traceReport";
import type { Scheduler } from "../scheduler";
import { jobTimeline, statusSnapshot, type JobStatus, type StatusSnapshot } from "./statusSnapshot";

export interface StatusPageOptions {
  /** Address to listen on; loopback unless an operator opens it up. @default "127.0.0.1" */
  host?: string;
  /** Port; 0 picks a free one. */
  port: number;
}

export interface StatusPage {
  /** The page's URL, with the real port. */
  url: string;
  port: number;
  close(): Promise<void>;
}

/** Finished jobs whose timeline pictures the page draws (newest first); the table links all. */
const PICTURED_JOBS = 8;
/** Steps drawn per job picture: enough to see the cold step and the steady state. */
const PICTURED_STEPS = 12;
const LISTED_JOBS = 200;

const plural = (n: number, noun: string) => `${n} ${noun}${n === 1 ? "" : "s"}`;

/** A compute rate in the unit that reads best: a CPU device runs at GFLOP/s, a GPU at TFLOP/s. */
const flops = (tflops: number) =>
  tflops >= 1 ? `${tflops.toFixed(1)} TFLOP/s` : `${(tflops * 1000).toFixed(1)} GFLOP/s`;

function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

const STYLE = `
body{font-family:"DejaVu Sans",system-ui,sans-serif;margin:20px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:22px 0 8px}
table{border-collapse:collapse;font-size:13px} th,td{padding:4px 10px;text-align:left;border-bottom:1px solid #e3e3e3;vertical-align:top}
th{background:#f4f4f4} td.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#666;font-size:12px} .state{font-weight:bold}
.queued{color:#8a6d00} .running{color:#1f5fbf} .succeeded{color:#237a3b} .failed{color:#b3261e} .cancelled{color:#666}
.bar{display:inline-block;width:120px;height:9px;background:#e6e6e6;vertical-align:middle;margin-right:6px}
.bar>span{display:block;height:9px;background:#3b78c2}
figure{margin:10px 0 18px} figcaption{font-size:13px;margin-bottom:4px} figure svg{max-width:100%;height:auto;border:1px solid #e3e3e3}
`;

function executorsTable(snapshot: StatusSnapshot): string {
  if (snapshot.executors.length === 0) {
    return `<p class="muted">No executor is connected. Start one with <code>ferry executor --scheduler HOST:PORT</code>.</p>`;
  }
  const rows = snapshot.executors.map((executor) => {
    const used = Math.max(0, executor.total_bytes - executor.free_bytes);
    const share = executor.total_bytes > 0 ? (100 * used) / executor.total_bytes : 0;
    const models =
      executor.models.length === 0
        ? `<span class="muted">none</span>`
        : executor.models
            .map(
              (model) =>
                `<span title="${escapeHtml(model.path)}">${escapeHtml(model.name)}</span>` +
                ` <span class="muted">${formatBytes(model.resident_bytes)} resident, ${model.jobs} job${model.jobs === 1 ? "" : "s"}</span>`,
            )
            .join("<br>");
    return (
      `<tr data-executor="${escapeHtml(executor.id)}"><td>${escapeHtml(executor.id)}</td>` +
      `<td>${escapeHtml(executor.device)} <span class="muted">${escapeHtml(executor.kind)}</span></td>` +
      `<td><span class="bar"><span style="width:${share.toFixed(1)}%"></span></span>` +
      `${formatBytes(used)} of ${formatBytes(executor.total_bytes)} in use</td>` +
      `<td class="n">${executor.h2d_gbps.toFixed(2)} GB/s<br><span class="muted">${flops(executor.tflops)}</span></td>` +
      `<td>${models}</td>` +
      `<td>${executor.running_job ? escapeHtml(executor.running_job) : `<span class="muted">idle</span>`}` +
      `${executor.queued_jobs ? `<br><span class="muted">${executor.queued_jobs} queued</span>` : ""}</td>` +
      `<td class="n">${executor.last_heartbeat_s_ago.toFixed(1)} s ago</td></tr>`
    );
  });
  return (
    `<table><thead><tr><th>executor</th><th>device</th><th>budget</th><th>rates</th>` +
    `<th>resident models</th><th>job</th><th>heartbeat</th></tr></thead><tbody>${rows.join("")}</tbody></table>`
  );
}

function jobRow(job: JobStatus): string {
  const plan = job.plan;
  return (
    `<tr data-job="${escapeHtml(job.id)}" data-state="${job.state}"><td>` +
    // Every job with steps has its timeline a click away, pictured below or not.
    (job.steps_done > 0
      ? `<a href="jobs/${encodeURIComponent(job.id)}/timeline.svg">${escapeHtml(job.id)}</a>`
      : escapeHtml(job.id)) +
    `</td>` +
    `<td class="state ${job.state}">${job.state}</td>` +
    `<td title="${escapeHtml(job.model)}">${escapeHtml(job.model_name)}</td>` +
    `<td>${escapeHtml(job.policy)}</td><td>${escapeHtml(job.executor)}</td>` +
    `<td class="n">${job.steps_done}/${job.steps}</td>` +
    `<td class="n">${formatSeconds(job.total_s)}</td>` +
    `<td>${plural(plan.segments, "segment")}, ${formatBytes(plan.resident_bytes)} resident, ` +
    `${formatBytes(plan.streamed_bytes_per_step)}/step streamed, ${plural(plan.slots, "slot")}</td>` +
    `<td>${job.error ? escapeHtml(job.error) : job.checksum ? `<span class="muted">${job.checksum.slice(0, 12)}…</span>` : ""}</td></tr>`
  );
}

function jobsTable(snapshot: StatusSnapshot): string {
  if (snapshot.jobs.length === 0) return `<p class="muted">No jobs yet.</p>`;
  const listed = snapshot.jobs.slice(0, LISTED_JOBS);
  const counts = (["queued", "running", "succeeded", "failed", "cancelled"] as const)
    .map((state) => `${snapshot.jobs.filter((job) => job.state === state).length} ${state}`)
    .join(", ");
  return (
    `<p class="muted">${counts}${snapshot.jobs.length > LISTED_JOBS ? ` (newest ${LISTED_JOBS} listed)` : ""}</p>` +
    `<table><thead><tr><th>job</th><th>state</th><th>model</th><th>policy</th><th>executor</th>` +
    `<th>steps</th><th>time</th><th>plan</th><th>result</th></tr></thead>` +
    `<tbody>${listed.map(jobRow).join("")}</tbody></table>`
  );
}

function timelines(scheduler: Scheduler, snapshot: StatusSnapshot): string {
  const finished = snapshot.jobs.filter((job) =>
    ["succeeded", "failed", "cancelled"].includes(job.state),
  );
  const figures: string[] = [];
  for (const status of finished.slice(0, PICTURED_JOBS)) {
    const job = scheduler.allJobs().find((candidate) => candidate.id === status.id);
    const timeline = job && jobTimeline(job);
    if (!timeline) continue;
    const id = encodeURIComponent(status.id);
    figures.push(
      `<figure data-timeline="${escapeHtml(status.id)}"><figcaption><b>${escapeHtml(status.id)}</b> ` +
        `${escapeHtml(status.policy)} on ${escapeHtml(status.executor)}, ${status.state} — ` +
        `<a href="jobs/${id}/timeline.svg">SVG</a> · <a href="jobs/${id}/trace.json" download>Perfetto JSON</a></figcaption>` +
        timelineSvg([timeline], { width: 1100, maxSteps: PICTURED_STEPS }) +
        `</figure>`,
    );
  }
  if (figures.length === 0) return `<p class="muted">No finished job with steps yet.</p>`;
  return figures.join("");
}

/** The status page's HTML: no script, only inline styles and inline SVG. */
export function statusHtml(scheduler: Scheduler, refreshSeconds = 0): string {
  const snapshot = statusSnapshot(scheduler);
  const refresh =
    refreshSeconds > 0 ? `<meta http-equiv="refresh" content="${Math.round(refreshSeconds)}">` : "";
  return (
    `<!doctype html><html lang="en"><head><meta charset="utf-8">` +
    `<meta name="viewport" content="width=device-width, initial-scale=1">${refresh}` +
    `<title>Ferry scheduler</title><link rel="icon" href="data:,"><style>${STYLE}</style></head><body>` +
    `<h1>Ferry scheduler</h1><p class="muted">as of ${escapeHtml(snapshot.generated_at)} · ` +
    `<a href="?refresh=5">refresh every 5 s</a> · <a href="api/status">JSON</a></p>` +
    `<h2>Executors</h2>${executorsTable(snapshot)}` +
    `<h2>Jobs</h2>${jobsTable(snapshot)}` +
    `<h2>Timelines of finished jobs</h2>${timelines(scheduler, snapshot)}` +
    `</body></html>`
  );
}

function send(
  response: ServerResponse,
  status: number,
  type: string,
  body: string,
  extra: Record<string, string> = {},
) {
  response.writeHead(status, {
    "content-type": type,
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    // Read-only page with no scripts: forbid everything it does not use.
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
    ...extra,
  });
  response.end(body);
}

function handle(scheduler: Scheduler, request: IncomingMessage, response: ServerResponse): void {
  if (request.method !== "GET" && request.method !== "HEAD") {
    send(response, 405, "text/plain; charset=utf-8", "the status page is read-only\n", {
      allow: "GET, HEAD",
    });
    return;
  }
  const url = new URL(request.url ?? "/", "http://status.invalid");
  const path = url.pathname;
  if (path === "/") {
    const refresh = Number(url.searchParams.get("refresh") ?? 0);
    send(
      response,
      200,
      "text/html; charset=utf-8",
      statusHtml(scheduler, Number.isFinite(refresh) ? Math.min(Math.max(refresh, 0), 3600) : 0),
    );
    return;
  }
  if (path === "/api/status") {
    send(
      response,
      200,
      "application/json",
      `${JSON.stringify(statusSnapshot(scheduler), null, 2)}\n`,
    );
    return;
  }
  if (path === "/favicon.ico") {
    response.writeHead(204).end();
    return;
  }
  const match = /^\/jobs\/([^/]+)\/(timeline\.svg|trace\.json)$/.exec(path);
  if (match) {
    const id = decodeURIComponent(match[1]);
    const job = scheduler.allJobs().find((candidate) => candidate.id === id);
    if (!job) {
      send(response, 404, "text/plain; charset=utf-8", `no job with id '${id}'\n`);
      return;
    }
    const timeline = jobTimeline(job);
    if (!timeline) {
      send(response, 404, "text/plain; charset=utf-8", `job '${id}' has no steps yet\n`);
      return;
    }
    if (match[2] === "timeline.svg") {
      send(response, 200, "image/svg+xml", timelineSvg([timeline]));
    } else {
      send(response, 200, "application/json", JSON.stringify(chromeTrace([timeline])), {
        "content-disposition": `attachment; filename="${id.replace(/[^A-Za-z0-9._-]/g, "_")}.trace.json"`,
      });
    }
    return;
  }
  send(response, 404, "text/plain; charset=utf-8", `not found: ${path}\n`);
}

/** Serves the scheduler's read-only status page (and its JSON) over HTTP. */
export async function startStatusPage(
  scheduler: Scheduler,
  options: StatusPageOptions,
): Promise<StatusPage> {
  const host = options.host ?? "127.0.0.1";
  const server = createServer((request, response) => {
    try {
      handle(scheduler, request, response);
    } catch (error) {
      send(
        response,
        500,
        "text/plain; charset=utf-8",
        `status page failed: ${(error as Error).message}\n`,
      );
    }
  });
  await new Promise<void>((resolveListen, reject) => {
    server.once("error", (error) =>
      reject(
        new Error(`cannot serve the status page on ${host}:${options.port}: ${error.message}`),
      ),
    );
    server.listen(options.port, host, () => resolveListen());
  });
  const address = server.address();
  const port = typeof address === "object" && address ? address.port : options.port;
  const shownHost = host.includes(":") ? `[${host}]` : host;
  return {
    url: `http://${shownHost}:${port}/`,
    port,
    close: () =>
      new Promise<void>((done) => {
        server.close(() => done());
        server.closeAllConnections();
      }),
  };
}

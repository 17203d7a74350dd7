import { formatBytes } from "../config/units";
import {
  firstSteps,
  jobEndUs,
  jobStartUs,
  laneLayout,
  sliceGbps,
  sliceName,
  type LaneItem,
  type TimelineJob,
} from "./timeline";
import { formatSeconds } from "./traceReport";

export interface TimelineSvgOptions {
  /** Picture width, px. @default 1200 */
  width?: number;
  /** Draw only each job's first N steps (0 = all). @default 0 */
  maxSteps?: number;
  /** A heading above the panels. */
  title?: string;
}

/** Colours per drawn kind; the legend lists them in this order. */
export const TIMELINE_COLORS = {
  prepare_disk: { color: "#e8772e", label: "prepare_params (disk)" },
  prepare_host: { color: "#f5c48f", label: "prepare_params (host cache)" },
  read: { color: "#8e6cc0", label: "read ahead (disk)" },
  h2d: { color: "#3b78c2", label: "h2d copy" },
  compute: { color: "#3f9e55", label: "compute" },
  stall: { color: "#d62f2f", label: "stall: compute waiting for weights" },
} as const;

const PAD = 12;
const LABEL_WIDTH = 84;
const ROW = 16;
const BAR = 12;
const FONT = "DejaVu Sans, Liberation Sans, Arial, Helvetica, sans-serif";

function escapeXml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

const fixed = (value: number) => (Math.round(value * 100) / 100).toString();

function colorOf(item: LaneItem): string {
  switch (item.kind) {
    case "prepare_params":
      return item.slice.cold || item.slice.source === "disk"
        ? TIMELINE_COLORS.prepare_disk.color
        : TIMELINE_COLORS.prepare_host.color;
    default:
      return TIMELINE_COLORS[item.kind].color;
  }
}

/** A tick spacing of 1, 2 or 5 × 10^k µs giving about `target` ticks over `spanUs`. */
function tickStep(spanUs: number, target: number): number {
  const raw = Math.max(spanUs / target, 1);
  const power = 10 ** Math.floor(Math.log10(raw));
  for (const factor of [1, 2, 5, 10]) if (factor * power >= raw) return factor * power;
  return 10 * power;
}

function tickLabel(us: number, stepUs: number): string {
  if (us === 0) return "0";
  if (stepUs >= 100_000) return `${fixed(us / 1e6)} s`;
  return `${fixed(us / 1e3)} ms`;
}

function tooltip(job: TimelineJob, item: LaneItem): string {
  const slice = item.slice;
  const parts = [`${sliceName(item)}, step ${slice.step}`];
  if (item.kind === "stall") {
    parts.push(`waited ${formatSeconds(slice.stallUs / 1e6)}`);
  } else {
    parts.push(formatSeconds((slice.endUs - slice.startUs) / 1e6));
    if (slice.bytes > 0) parts.push(formatBytes(slice.bytes));
    const gbps = sliceGbps(slice);
    if (gbps !== undefined) parts.push(`${gbps.toFixed(2)} GB/s`);
  }
  return `${job.jobId}: ${parts.join(", ")}`;
}

function panelTitle(job: TimelineJob): { bold: string; rest: string } {
  const seconds = (s: { startUs: number; endUs: number }) => (s.endUs - s.startUs) / 1e6;
  const later = job.steps.filter((step) => step.step >= 2).map(seconds);
  later.sort((a, b) => a - b);
  const median = later.length ? later[later.length >> 1] : null;
  const first = job.steps.find((step) => step.step === 1);
  const stall = job.steps.reduce((sum, step) => sum + step.stallUs, 0) / 1e6;
  const bold = `${job.policy || "job"} — ${job.jobId}`;
  const rest = [
    `on ${job.executor}${job.device ? ` (${job.device})` : ""}`,
    job.origin ? `from ${job.origin}` : "",
    `${job.steps.length} steps`,
    first ? `step 1 ${formatSeconds(seconds(first))}` : "",
    median !== null ? `later ${formatSeconds(median)}/step` : "",
    `stalled ${formatSeconds(stall)}`,
  ]
    .filter(Boolean)
    .join(" · ");
  return { bold, rest };
}

/**
 * Draws jobs as a timeline picture, one panel per job stacked top to bottom, all on one time
 * scale (each from its own start) so two runs compare at a glance: a band marking the steps,
 * then lanes for reads ahead of use (when any), the copy engine (prepare_params, h2d) and
 * compute, with each compute's wait for its weights in red just before it. Every bar has a
 * tooltip (`<title>`) with its bytes and rate.
 */
export function timelineSvg(
  jobsIn: readonly TimelineJob[],
  options: TimelineSvgOptions = {},
): string {
  const width = Math.max(400, Math.round(options.width ?? 1200));
  const jobs = jobsIn.map((job) => firstSteps(job, options.maxSteps ?? 0));
  const plotX = PAD + LABEL_WIDTH;
  const plotWidth = width - plotX - PAD;
  const spans = jobs.map((job) => Math.max(1, jobEndUs(job) - jobStartUs(job)));
  const scaleUs = Math.max(1, ...spans);
  const px = (us: number) => (us / scaleUs) * plotWidth;
  const out: string[] = [];
  let y = PAD;

  if (options.title) {
    out.push(
      `<text x="${PAD}" y="${y + 14}" font-size="15" font-weight="bold">${escapeXml(options.title)}</text>`,
    );
    y += 24;
  }
  // Legend: what each colour is, plus the step boundary mark; it wraps on narrow pictures.
  let legendX = PAD;
  const place = (itemWidth: number) => {
    if (legendX > PAD && legendX + itemWidth > width - PAD) {
      legendX = PAD;
      y += 18;
    }
    const x = legendX;
    legendX += itemWidth + 14;
    return x;
  };
  const hasReads = jobs.some((job) => job.slices.some((slice) => slice.kind === "read"));
  for (const [key, { color, label }] of Object.entries(TIMELINE_COLORS)) {
    if (key === "read" && !hasReads) continue;
    const x = place(16 + label.length * 6.3);
    out.push(`<rect x="${fixed(x)}" y="${y + 2}" width="12" height="12" fill="${color}"/>`);
    out.push(`<text x="${fixed(x + 16)}" y="${y + 12}" font-size="11">${escapeXml(label)}</text>`);
  }
  const markX = place(70);
  out.push(
    `<line x1="${fixed(markX)}" y1="${y + 1}" x2="${fixed(markX)}" y2="${y + 15}" stroke="#555" stroke-dasharray="3,2"/>`,
  );
  out.push(`<text x="${fixed(markX + 5)}" y="${y + 12}" font-size="11">step start</text>`);
  y += 24;

  if (jobs.length === 0) {
    out.push(`<text x="${PAD}" y="${y + 14}" font-size="12">no steps to draw</text>`);
    y += 24;
  }

  for (const job of jobs) {
    const t0 = jobStartUs(job);
    const x = (us: number) => plotX + px(us - t0);
    const title = panelTitle(job);
    out.push(
      `<text x="${PAD}" y="${y + 13}" font-size="13"><tspan font-weight="bold">${escapeXml(title.bold)}</tspan>` +
        `<tspan dx="8" fill="#444">${escapeXml(title.rest)}</tspan></text>`,
    );
    y += 20;
    const lanes = laneLayout(job);
    const rows = lanes.reduce((sum, lane) => sum + lane.rows.length, 0);
    const lanesTop = y + ROW + 2;
    const lanesBottom = lanesTop + rows * ROW;

    // Steps: alternating bands with their numbers, and a dashed line down at each start.
    out.push(`<text x="${PAD}" y="${y + 12}" font-size="11" fill="#444">steps</text>`);
    job.steps.forEach((step, index) => {
      const left = x(step.startUs);
      const w = Math.max(0.5, px(step.endUs - step.startUs));
      out.push(
        `<rect x="${fixed(left)}" y="${y}" width="${fixed(w)}" height="${ROW - 2}" fill="${index % 2 ? "#dcdcdc" : "#ececec"}">` +
          `<title>${escapeXml(`${job.jobId}: step ${step.step}, ${formatSeconds((step.endUs - step.startUs) / 1e6)}, stalled ${formatSeconds(step.stallUs / 1e6)}`)}</title></rect>`,
      );
      if (w >= 40) {
        out.push(
          `<text x="${fixed(left + w / 2)}" y="${y + 11}" font-size="10" text-anchor="middle">step ${step.step}</text>`,
        );
      }
      out.push(
        `<line x1="${fixed(left)}" y1="${y}" x2="${fixed(left)}" y2="${lanesBottom}" stroke="#555" stroke-width="0.8" stroke-dasharray="3,2"/>`,
      );
    });

    let rowY = lanesTop;
    for (const lane of lanes) {
      out.push(`<text x="${PAD}" y="${rowY + 12}" font-size="11" fill="#444">${lane.name}</text>`);
      for (const row of lane.rows) {
        out.push(
          `<rect x="${plotX}" y="${rowY}" width="${fixed(plotWidth)}" height="${ROW - 1}" fill="#f7f7f7"/>`,
        );
        for (const item of row) {
          const left = x(item.startUs);
          const w = Math.max(0.6, px(item.endUs - item.startUs));
          out.push(
            `<rect x="${fixed(left)}" y="${rowY + (ROW - 1 - BAR) / 2}" width="${fixed(w)}" height="${BAR}" fill="${colorOf(item)}"` +
              // A hairline between wide neighbours, so back-to-back segments stay countable.
              `${w > 4 ? ` stroke="#ffffff" stroke-width="0.6"` : ""}>` +
              `<title>${escapeXml(tooltip(job, item))}</title></rect>`,
          );
        }
        rowY += ROW;
      }
    }

    // The time axis, from this job's start, on the scale every panel shares.
    const step = tickStep(scaleUs, 10);
    const axisY = lanesBottom + 2;
    out.push(
      `<line x1="${plotX}" y1="${axisY}" x2="${fixed(plotX + px(jobEndUs(job) - t0))}" y2="${axisY}" stroke="#888"/>`,
    );
    for (let t = 0; t <= jobEndUs(job) - t0 + 1; t += step) {
      const tx = plotX + px(t);
      out.push(
        `<line x1="${fixed(tx)}" y1="${axisY}" x2="${fixed(tx)}" y2="${axisY + 4}" stroke="#888"/>`,
      );
      out.push(
        `<text x="${fixed(tx)}" y="${axisY + 14}" font-size="10" text-anchor="${tx > width - PAD - 24 ? "end" : "middle"}" fill="#444">${tickLabel(t, step)}</text>`,
      );
    }
    y = axisY + 18 + 14;
  }
  const height = Math.ceil(y - 14 + PAD);
  return (
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="${FONT}">` +
    `<rect width="100%" height="100%" fill="#ffffff"/>` +
    out.join("") +
    `</svg>`
  );
}

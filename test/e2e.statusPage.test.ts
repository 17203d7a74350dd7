import { existsSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium, type Browser } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { JobState, JobSpec } from "../gen/ferry/v1/scheduler";
import { genModel } from "../lib/model/genModel";
import { startCluster, type Cluster } from "../services/cluster/localCluster";
import { startStatusPage, type StatusPage } from "../services/scheduler/http/statusPage";

/** Debian's chromium (what .ci/run installs), or FERRY_CHROMIUM. */
const CHROMIUM = [
  process.env.FERRY_CHROMIUM,
  "/usr/bin/chromium",
  "/usr/bin/chromium-browser",
].find((path): path is string => !!path && existsSync(path));
// Only a developer machine without chromium skips; CI must have it (.ci/run installs it).
const skip = !CHROMIUM && !process.env.CI;
if (skip) {
  console.warn(
    "test/e2e.statusPage.test.ts: SKIPPED — no chromium at /usr/bin/chromium (apt-get install chromium, or set FERRY_CHROMIUM)",
  );
}

describe.skipIf(skip)("the status page in a real browser", () => {
  let dir: string;
  let modelPath: string;
  let cluster: Cluster;
  let page: StatusPage;
  let browser: Browser;
  let finishedJob: string;
  let runningJob: string;
  let queuedJob: string;

  const spec = (overrides: Partial<JobSpec> = {}): JobSpec =>
    JobSpec.fromPartial({
      modelPath,
      steps: 3,
      batch: 2,
      tokens: 16,
      seed: 0,
      maxVramGib: 0.7 / 1024,
      policy: "sdcpp",
      ...overrides,
    });

  beforeAll(async () => {
    if (!CHROMIUM)
      throw new Error("CI=true but no chromium: install it (apt-get install chromium)");
    dir = await mkdtemp(join(tmpdir(), "ferry-status-"));
    modelPath = join(dir, "tiny.safetensors");
    await genModel(modelPath, { blocks: 3, hidden: 64, heads: 4, channels: 8, seed: 7 });
    cluster = await startCluster([{ id: "status-gpu0", vram: "2GiB", threads: 1 }], {
      modelDirs: [dir],
    });
    page = await startStatusPage(cluster.server.scheduler, { port: 0 });
    const done = await cluster.client.runJob(spec());
    finishedJob = done.jobId;
    // One job running (far more steps than it will get to) and one queued behind it: the budget
    // fits one such job (0.7 MiB plus sd.cpp's 512 MiB headroom), not two side by side.
    await cluster.client.setBudget("status-gpu0", 513 * 1024 * 1024);
    runningJob = (await cluster.client.submitJob(spec({ steps: 1_000_000 }))).jobId;
    queuedJob = (await cluster.client.submitJob(spec())).jobId;
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
      ],
    });
  }, 60_000);

  afterAll(async () => {
    await browser?.close();
    for (const id of [queuedJob, runningJob]) {
      if (id) await cluster.client.cancelJob(id).catch(() => undefined);
    }
    await page?.close();
    await cluster?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it("loads without console errors and shows executors, jobs and a finished job's timeline", async () => {
    const tab = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const problems: string[] = [];
    tab.on("console", (message) => {
      if (message.type() === "error" || message.type() === "warning") {
        problems.push(`${message.type()}: ${message.text()}`);
      }
    });
    tab.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
    tab.on("requestfailed", (request) => problems.push(`request failed: ${request.url()}`));
    tab.on("response", (response) => {
      if (response.status() >= 400) problems.push(`HTTP ${response.status()}: ${response.url()}`);
    });
    const response = await tab.goto(page.url, { waitUntil: "load" });
    expect(response?.status()).toBe(200);
    expect(await tab.title()).toBe("Ferry scheduler");

    const executor = tab.locator('tr[data-executor="status-gpu0"]');
    await expect.poll(() => executor.count()).toBe(1);
    expect(await executor.innerText()).toMatch(/of 2\.0 GiB in use/);
    expect(await executor.innerText()).toContain("tiny.safetensors");

    const state = (id: string) => tab.locator(`tr[data-job="${id}"]`).getAttribute("data-state");
    expect(await state(finishedJob)).toBe("succeeded");
    expect(await state(runningJob)).toBe("running");
    expect(await state(queuedJob)).toBe("queued");

    // The finished job's timeline: a drawn SVG with bars, laid out at a real size.
    const figure = tab.locator(`figure[data-timeline="${finishedJob}"]`);
    expect(await figure.count()).toBe(1);
    const svg = figure.locator("svg");
    const box = await svg.boundingBox();
    expect(box!.width).toBeGreaterThan(500);
    expect(box!.height).toBeGreaterThan(80);
    expect(await svg.locator("rect").count()).toBeGreaterThan(20);
    expect(await figure.innerText()).toContain(finishedJob);

    // Its links: the picture alone and the Perfetto JSON.
    const picture = await tab.request.get(
      new URL(`jobs/${finishedJob}/timeline.svg`, page.url).href,
    );
    expect(picture.status()).toBe(200);
    expect(picture.headers()["content-type"]).toBe("image/svg+xml");
    const perfetto = await tab.request.get(
      new URL(`jobs/${finishedJob}/trace.json`, page.url).href,
    );
    expect((await perfetto.json()).traceEvents.length).toBeGreaterThan(10);
    const missing = await tab.request.get(new URL("jobs/job-nope/timeline.svg", page.url).href);
    expect(missing.status()).toBe(404);
    expect(await missing.text()).toContain("no job with id 'job-nope'");

    if (process.env.FERRY_STATUS_SCREENSHOT) {
      await tab.screenshot({ path: process.env.FERRY_STATUS_SCREENSHOT, fullPage: true });
    }
    expect(problems).toEqual([]);
    await tab.close();
  });

  it("serves the same state as JSON, and refuses to change anything", async () => {
    const status = (await (await fetch(new URL("api/status", page.url))).json()) as {
      executors: { id: string }[];
      jobs: { id: string; state: string }[];
    };
    expect(status.executors.map((executor) => executor.id)).toEqual(["status-gpu0"]);
    expect(status.jobs.find((job) => job.id === finishedJob)?.state).toBe("succeeded");
    const post = await fetch(page.url, { method: "POST" });
    expect(post.status).toBe(405);
    const job = cluster.server.scheduler.getJob(finishedJob);
    expect(job.state).toBe(JobState.JOB_STATE_SUCCEEDED);
  });
});

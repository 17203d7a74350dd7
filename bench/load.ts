/**
 * `ferry bench load`: how fast weights get from disk into the params cache, and what step 1
 * costs with each load mode. On one generated model of ≥ 2 GB, with the page cache dropped before
 * every cold measurement (root only; otherwise the numbers are warm and say so):
 * - raw_read_gbps: `dd bs=16M` of the file — the disk's sequential rate;
 * - read_gbps: the executor's loader reading the whole model (`load: "eager"`; for the CPU device
 *   the params cache is the file's mapping, so "reading" is populating it);
 * - the same two with the file in the page cache (`*_warm`): dd then copies at memory speed, and
 *   the loader must keep up (no copy into fresh memory, whose page faults used to cap it);
 * - cold_start: job start → end of step 1 with lazy, eager and background loading, against
 *   bound_s = max(disk read time — the faster of dd and the loader —, step-1 compute measured
 *   warm).
 */
import { spawnSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { mkdtemp, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Command } from "commander";
import { genModel } from "../lib/model/genModel";
import { modelProfileFromFile } from "../lib/model/segments";
import { loadAddon } from "../lib/native/addon";
import type { NativeModel } from "../lib/native/AddonTypes";

export interface LoadBenchOptions {
  /** Model blocks (hidden 1024, f32: ~50 MB a block). @default 40 */
  blocks?: number;
  /** Directory for the generated model (needs ~2.1 GB free). @default the OS temp dir */
  dir?: string;
  log?: (line: string) => void;
}

export interface LoadBenchResult {
  read_gbps: number;
  raw_read_gbps: number;
  /** Page cache dropped: dd's time over the loader's. */
  read_efficiency: number;
  read_gbps_warm: number;
  raw_read_gbps_warm: number;
  /** File in the page cache: dd's time over the loader's. */
  read_efficiency_warm: number;
  cold_start: { lazy_s: number; eager_s: number; background_s: number; bound_s: number };
  model_bytes: number;
  /** False when the page cache could not be dropped (not root): every read was warm. */
  cold: boolean;
}

/** Drops the page cache so the next read comes from disk; false if not permitted. */
function dropPageCache(): boolean {
  spawnSync("sync");
  try {
    writeFileSync("/proc/sys/vm/drop_caches", "3\n");
    return true;
  } catch {
    return false;
  }
}

export async function runLoadBench(options: LoadBenchOptions = {}): Promise<LoadBenchResult> {
  const log = options.log ?? (() => {});
  const addon = loadAddon();
  const dir = await mkdtemp(join(options.dir ?? tmpdir(), "ferry-bench-load-"));
  const path = join(dir, "model.safetensors");
  const job = { batch: 1, tokens: 64, steps: 1, seed: 0 };
  const device = new addon.CpuDevice({ capacityBytes: 1 << 30 });
  try {
    log("generating the model");
    await genModel(path, { blocks: options.blocks ?? 40, hidden: 1024, heads: 16, channels: 16 });
    const bytes = (await stat(path)).size;
    const profile = await modelProfileFromFile(path, job);
    const segments = profile.segments.map((segment, index) => ({
      firstBase: index,
      lastBase: index,
      resident: false,
    }));

    let cold = dropPageCache();
    let started = performance.now();
    const dd = spawnSync("dd", [`if=${path}`, "of=/dev/null", "bs=16M"], { stdio: "ignore" });
    if (dd.status !== 0) throw new Error("dd failed; it is needed for the raw read rate");
    const rawSeconds = (performance.now() - started) / 1000;
    log(`raw read: ${(bytes / rawSeconds / 1e9).toFixed(2)} GB/s`);

    // Job start → end of step 1 (and → start of step 1: the eager load) for one load mode.
    const stepOne = async (load: "lazy" | "eager" | "background", model?: NativeModel) => {
      cold = dropPageCache() && cold;
      const opened = model ?? (await addon.openModel(path));
      const start = Date.now() * 1000;
      started = performance.now();
      let stepStartUs = 0;
      let computeS = 0;
      await addon.startRun(device, opened, { ...job, segments, slots: 2, load }, (report) => {
        stepStartUs = report.stepStartUs;
        computeS = report.events
          .filter((event) => event.kind === "compute")
          .reduce((sum, event) => sum + (event.endUs - event.startUs) / 1e6, 0);
      }).done;
      const total = (performance.now() - started) / 1000;
      if (!model) opened.dispose();
      return { total, beforeStep: Math.max(0, (stepStartUs - start) / 1e6), computeS };
    };

    const eager = await stepOne("eager");
    const readGbps = bytes / eager.beforeStep / 1e9;
    log(`loader read (eager): ${readGbps.toFixed(2)} GB/s`);

    // Warm: the file in the page cache (the eager run just read it; dd reads it again first).
    const ddWarm = () => {
      const t0 = performance.now();
      spawnSync("dd", [`if=${path}`, "of=/dev/null", "bs=16M"], { stdio: "ignore" });
      return (performance.now() - t0) / 1000;
    };
    ddWarm();
    const rawWarmSeconds = Math.min(ddWarm(), ddWarm());
    const loaderWarm = async () => {
      const opened = await addon.openModel(path);
      const t0 = performance.now();
      await new Promise<void>((resolve, reject) => {
        // Eager loading before step 1 is what `beforeStep` measures; here the load alone.
        addon
          .startRun(device, opened, { ...job, segments, slots: 2, load: "eager" })
          .done.then(() => resolve(), reject);
      });
      const stats = opened.loadStats();
      opened.dispose();
      return { total: (performance.now() - t0) / 1000, readSeconds: stats.readSeconds };
    };
    await loaderWarm();
    const warmRuns = [await loaderWarm(), await loaderWarm()];
    const loaderWarmSeconds = Math.min(...warmRuns.map((r) => r.readSeconds));
    log(
      `warm: dd ${(bytes / rawWarmSeconds / 1e9).toFixed(2)} GB/s, loader ` +
        `${(bytes / loaderWarmSeconds / 1e9).toFixed(2)} GB/s`,
    );
    const lazy = await stepOne("lazy");
    const background = await stepOne("background");
    // Step-1 compute with every weight already in host memory.
    const warmModel = await addon.openModel(path);
    await stepOne("eager", warmModel);
    const warm = await stepOne("lazy", warmModel);
    warmModel.dispose();
    // The disk read time is the faster of dd and Ferry's own (parallel) loader: the bound must
    // not be inflated by a slow reference reader.
    const bound = Math.max(Math.min(rawSeconds, eager.beforeStep), warm.computeS);
    return {
      read_gbps: readGbps,
      raw_read_gbps: bytes / rawSeconds / 1e9,
      read_efficiency: rawSeconds / eager.beforeStep,
      read_gbps_warm: bytes / loaderWarmSeconds / 1e9,
      raw_read_gbps_warm: bytes / rawWarmSeconds / 1e9,
      read_efficiency_warm: rawWarmSeconds / loaderWarmSeconds,
      cold_start: {
        lazy_s: lazy.total,
        eager_s: eager.total,
        background_s: background.total,
        bound_s: bound,
      },
      model_bytes: bytes,
      cold,
    };
  } finally {
    device.dispose();
    await rm(dir, { recursive: true, force: true });
  }
}

export function formatLoadBench(r: LoadBenchResult): string {
  const ratio = (s: number) => (s / r.cold_start.bound_s).toFixed(2);
  return [
    `model ${(r.model_bytes / 1e9).toFixed(2)} GB, ${r.cold ? "page cache dropped before each read" : "WARM reads (could not drop the page cache)"}`,
    `read: loader ${r.read_gbps.toFixed(2)} GB/s vs raw ${r.raw_read_gbps.toFixed(2)} GB/s → efficiency ${r.read_efficiency.toFixed(2)} (goal ≥ 0.90)`,
    `warm: loader ${r.read_gbps_warm.toFixed(2)} GB/s vs raw ${r.raw_read_gbps_warm.toFixed(2)} GB/s → efficiency ${r.read_efficiency_warm.toFixed(2)} (goal ≥ 0.90)`,
    `cold start to end of step 1 (bound ${r.cold_start.bound_s.toFixed(2)} s):`,
    `  lazy       ${r.cold_start.lazy_s.toFixed(2)} s (${ratio(r.cold_start.lazy_s)}× bound)`,
    `  eager      ${r.cold_start.eager_s.toFixed(2)} s (${ratio(r.cold_start.eager_s)}× bound)`,
    `  background ${r.cold_start.background_s.toFixed(2)} s (${ratio(r.cold_start.background_s)}× bound; goal ≤ 1.15)`,
    "",
  ].join("\n");
}

/** Adds `load` to a `bench` command. */
export function registerBenchLoad(bench: Command): void {
  bench
    .command("load")
    .description(
      "loader read rate vs raw disk rate, and cold-start step 1 per load mode (≥ 2 GB model)",
    )
    .option("--json", "print the result as JSON")
    .option("--blocks <n>", "blocks of the generated model (~50 MB each)", "40")
    .option("--dir <path>", "where to write the model (needs ~2.1 GB)")
    .action(async (flags: { json?: boolean; blocks: string; dir?: string }) => {
      try {
        const result = await runLoadBench({
          blocks: Number(flags.blocks),
          dir: flags.dir,
          log: (line) => process.stderr.write(`${line}\n`),
        });
        const { model_bytes: _bytes, cold: _cold, ...json } = result;
        process.stdout.write(
          flags.json ? `${JSON.stringify(json, null, 2)}\n` : formatLoadBench(result),
        );
      } catch (error) {
        process.stderr.write(`ferry bench load: ${(error as Error).message}\n`);
        process.exitCode = 1;
      }
    });
}

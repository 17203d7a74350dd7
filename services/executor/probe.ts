import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { genModel } from "../../lib/model/genModel";
import { modelProfileFromFile } from "../../lib/model/segments";
import { calibrateDevice, type StepMeasurement } from "../../lib/planner/calibration";
import type { NativeAddon, NativeDevice, NativeDeviceInfoBase } from "../../lib/native/AddonTypes";

export interface ComputeProbe {
  /** Measured compute rate, TFLOP/s. */
  tflops: number;
  /** Measured per-dispatch overhead, microseconds. */
  dispatchUs: number;
}

const PROBE_BATCH = 1;
const PROBE_TOKENS = 64;

/**
 * Measures the device's compute rate and per-dispatch overhead at start-up, so the first plan on
 * this executor is already priced with its own numbers: a small generated model runs a few
 * all-resident steps, and each base segment's (FLOPs, seconds) pair feeds the same robust fit
 * the scheduler uses for calibration (the segments' FLOPs differ, which separates rate from δ).
 * Takes a fraction of a second; the scheduler keeps refining both from real jobs.
 */
export async function probeCompute(
  addon: NativeAddon,
  device: NativeDevice<NativeDeviceInfoBase>,
): Promise<ComputeProbe> {
  const dir = await mkdtemp(join(tmpdir(), "ferry-probe-"));
  try {
    const path = join(dir, "probe.safetensors");
    await genModel(path, { blocks: 4, hidden: 256, heads: 4, channels: 16 });
    const profile = await modelProfileFromFile(path, { batch: PROBE_BATCH, tokens: PROBE_TOKENS });
    const model = await addon.openModel(path);
    const steps: StepMeasurement[] = [];
    try {
      const run = addon.startRun(
        device,
        model,
        {
          batch: PROBE_BATCH,
          tokens: PROBE_TOKENS,
          steps: 4,
          seed: 0,
          segments: profile.segments.map((segment, index) => ({
            firstBase: index,
            lastBase: index,
            resident: true,
          })),
          slots: 0,
        },
        (report) => {
          // Step 1 uploads and warms caches: only later steps measure steady compute.
          if (report.step === 1) return;
          steps.push({
            segments: report.events
              .filter((event) => event.kind === "compute")
              .map((event) => ({
                bytes_copied: 0,
                copy_s: 0,
                compute_s: (event.endUs - event.startUs) / 1e6,
                flops: profile.segments[event.segment]?.flops ?? 0,
              })),
          });
        },
      );
      await run.done;
    } finally {
      model.dispose();
    }
    const reported = {
      name: "probe",
      total_bytes: 0,
      free_bytes: 0,
      h2d_gbps: 0,
      tflops: 0,
      dispatch_us: 0,
    };
    const { compute } = calibrateDevice(reported, steps);
    return { tflops: compute.tflops, dispatchUs: compute.dispatch_us };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

import type { ServerDuplexStream } from "@grpc/grpc-js";
import {
  ConnectResponse,
  ExecutorState,
  type ConnectRequest,
  type DeviceInfo,
  type ExecutorInfo,
  type Holdings,
  type Plan,
  type StepStats,
} from "../../gen/ferry/v1/scheduler";
import { STREAM_MARGIN_BYTES } from "../../lib/planner/budget";
import { calibrateDevice, type StepMeasurement } from "../../lib/planner/calibration";
import { ferryMemory } from "../../lib/planner/ferryPolicy";
import type { DeviceProfile } from "../../lib/planner/types";
import type { Job } from "./jobs";
import { deviceProfileOf } from "./planProto";

export type ExecutorStream = ServerDuplexStream<ConnectRequest, ConnectResponse>;

/** Steps of measurements kept per executor for calibration. */
const CALIBRATION_WINDOW_STEPS = 64;

/** A LoadModel or UnloadModel on its way to an executor. */
export interface ExecutorCommand {
  id: string;
  message: ConnectResponse["message"];
  /** Needs the device to itself (a warm-up run): sent only when no job runs there. */
  needsIdle: boolean;
  resolve(holdings: Holdings | undefined): void;
  reject(error: Error): void;
}

export type ExecutorLifecycle = "connected" | "disconnected" | "lost";

/**
 * One executor as the scheduler knows it, across reconnects: its identity (id + the instance
 * the process picked), its stream while connected, what it holds, what it runs, and its
 * measurements. connected → disconnected (stream broke; its jobs stay assigned) → connected again
 * (same identity, within the heartbeat deadline), or → lost (deadline missed).
 */
export class ExecutorEntry {
  state: ExecutorLifecycle = "connected";
  stream: ExecutorStream | undefined;
  instance = "";
  device: DeviceInfo;
  /** Where it takes pipeline handoffs from other executors ("" = it cannot be a stage). */
  peerAddress = "";
  lastSeenMs = Date.now();
  lostAtMs = 0;
  holdings: Holdings = {
    freeBytes: 0,
    usedBytes: 0,
    residentBytes: 0,
    residentSegments: 0,
    models: [],
    runningJobIds: [],
    heldResultJobIds: [],
    budgetBytes: 0,
  };
  /** Jobs it runs: several at once when their plans fit its budget together. */
  readonly running = new Set<Job>();
  /**
   * The device memory budget its jobs share: the device's memory until SetBudget lowers it (the
   * executor reports the budget it applies, so a reconnect keeps it).
   */
  budgetBytes: number;
  /** Commands waiting for it, and the one it is carrying out. */
  readonly commands: ExecutorCommand[] = [];
  commandInFlight: ExecutorCommand | undefined;
  /** Jobs that chose to wait for it in the last placement pass. */
  waitingJobs = 0;
  /** Recent per-segment measurements, oldest first: what calibration refines rates from. */
  readonly measurements: StepMeasurement[] = [];

  constructor(
    readonly id: string,
    device: DeviceInfo,
  ) {
    this.device = device;
    this.budgetBytes = device.totalBytes;
  }

  get connected(): boolean {
    return this.state === "connected" && this.stream !== undefined;
  }

  /**
   * Runs nothing and carries out no command: a job can start now. A job the executor still
   * reports running (one it is winding down after a cancel) keeps it busy too.
   */
  get idle(): boolean {
    return (
      this.connected &&
      this.running.size === 0 &&
      !this.commandInFlight &&
      this.holdings.runningJobIds.length === 0
    );
  }

  /**
   * Connected and carrying out no command, and every job it reports running is one the scheduler
   * placed (one it is winding down after a cancel holds memory the scheduler cannot see): a job
   * whose plan fits in what is left (`plannedDevice()`) can start now.
   */
  get canStart(): boolean {
    if (!this.connected || this.commandInFlight) return false;
    const placed = new Set([...this.running].map((job) => job.id));
    return this.holdings.runningJobIds.every((id) => placed.has(id));
  }

  /** What the running jobs' plans claim of the budget. */
  claimedBytes(except?: Job): number {
    let claimed = 0;
    for (const job of this.running) {
      if (job !== except && job.plan) claimed += planClaimBytes(job.plan);
    }
    return claimed;
  }

  /**
   * What a new plan may use: the budget less what the running jobs' plans claim; with none
   * running, the budget or what the device reports free, whichever is less.
   */
  leftBytes(except?: Job): number {
    const others = [...this.running].filter((job) => job !== except);
    if (others.length === 0) return Math.min(this.budgetBytes, this.device.freeBytes);
    return Math.max(0, this.budgetBytes - this.claimedBytes(except));
  }

  /** A job's result arrived: the executor no longer runs it, whatever its last report said. */
  finishedRunning(jobId: string): void {
    this.holdings.runningJobIds = this.holdings.runningJobIds.filter((id) => id !== jobId);
  }

  send(message: ConnectResponse["message"]): void {
    this.stream?.write(ConnectResponse.fromPartial({ message }));
  }

  isWarm(modelPath: string): boolean {
    return this.holdings.models.some((model) => model.path === modelPath);
  }

  /** Notes a model as open until the next report says otherwise (a job just ran it). */
  markWarm(modelPath: string): void {
    if (this.isWarm(modelPath)) return;
    this.holdings.models.push({ path: modelPath, hostCacheBytes: 0, pinned: false });
  }

  /**
   * The device as plans should see it: the registered device with its rates (β, compute rate,
   * δ) refined from this executor's measured steps; its free memory is what is left of the budget
   * beside the running jobs (`leftBytes`), or the whole budget with `whole` (for the wait-for-it
   * estimate).
   */
  plannedDevice(whole = false, except?: Job): DeviceProfile {
    const free = whole
      ? Math.min(this.budgetBytes, this.device.totalBytes)
      : this.leftBytes(except);
    return calibrateDevice({ ...deviceProfileOf(this.device), free_bytes: free }, this.measurements)
      .device;
  }

  recordStep(stats: StepStats, segmentFlops: readonly number[]): void {
    // A job restored after a scheduler restart may not know its FLOPs yet: no sample then.
    if (segmentFlops.length === 0) return;
    this.measurements.push({
      segments: stats.segments.map((segment) => ({
        bytes_copied: segment.h2dBytes,
        copy_s: segment.h2dSeconds,
        compute_s: segment.computeSeconds,
        flops: segmentFlops[segment.index] ?? 0,
      })),
    });
    if (this.measurements.length > CALIBRATION_WINDOW_STEPS) this.measurements.shift();
  }

  info(nameOf: (path: string) => string): ExecutorInfo {
    const planned = this.plannedDevice();
    const state =
      this.state === "connected"
        ? ExecutorState.EXECUTOR_STATE_CONNECTED
        : this.state === "disconnected"
          ? ExecutorState.EXECUTOR_STATE_DISCONNECTED
          : ExecutorState.EXECUTOR_STATE_LOST;
    return {
      executorId: this.id,
      device: this.device,
      calibrated: {
        ...this.device,
        h2dGbps: planned.h2d_gbps,
        tflops: planned.tflops,
        dispatchUs: planned.dispatch_us,
      },
      lastHeartbeatMs: this.lastSeenMs,
      runningJobId: [...this.running][0]?.id ?? "",
      runningJobIds: [...this.running].map((job) => job.id),
      budgetBytes: this.budgetBytes,
      claimedBytes: this.claimedBytes(),
      warmModels: this.holdings.models.map((model) => nameOf(model.path)),
      state,
      usedBytes: this.holdings.usedBytes,
      freeBytes: this.holdings.freeBytes,
      residentBytes: this.holdings.residentBytes,
      residentSegments: this.holdings.residentSegments,
      models: this.holdings.models,
      queuedJobs: this.waitingJobs,
      peerAddress: this.peerAddress,
    };
  }
}

/**
 * What a running job's plan claims of its executor's budget: a Ferry plan, the memory it holds
 * (resident weights + staging slots + working buffers, ferryMemory); an sd.cpp plan allocates
 * per segment up to its effective budget E, and when streaming counts on sd.cpp's 512 MiB of
 * headroom beside it, so E plus that headroom.
 */
export function planClaimBytes(plan: Plan): number {
  if (plan.policy !== "ferry") return plan.budgetE + (plan.stream ? STREAM_MARGIN_BYTES : 0);
  const figures = plan.segments.map((segment) => ({
    param_bytes: segment.paramBytes,
    compute_buffer_bytes: segment.computeBufferBytes,
    output_bytes: segment.outputBytes,
    prev_cut_bytes: segment.prevCutBytes,
    external_bytes: segment.externalBytes,
    resident: segment.resident,
  }));
  return ferryMemory(figures, plan.slots).total_bytes;
}

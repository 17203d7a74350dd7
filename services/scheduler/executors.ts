import type { ServerDuplexStream } from "@grpc/grpc-js";
import {
  ConnectResponse,
  ExecutorState,
  type ConnectRequest,
  type DeviceInfo,
  type ExecutorInfo,
  type Holdings,
  type StepStats,
} from "../../gen/ferry/v1/scheduler";
import { calibrateDevice, type StepMeasurement } from "../../lib/planner/calibration";
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
  };
  /** Jobs it runs (one at a time until the memory arbiter lets several share a device). */
  readonly running = new Set<Job>();
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
   * δ) refined from this executor's measured steps, and its free memory as last reported.
   */
  plannedDevice(): DeviceProfile {
    return calibrateDevice(deviceProfileOf(this.device), this.measurements).device;
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
      warmModels: this.holdings.models.map((model) => nameOf(model.path)),
      state,
      usedBytes: this.holdings.usedBytes,
      freeBytes: this.holdings.freeBytes,
      residentBytes: this.holdings.residentBytes,
      residentSegments: this.holdings.residentSegments,
      models: this.holdings.models,
      queuedJobs: this.waitingJobs,
    };
  }
}

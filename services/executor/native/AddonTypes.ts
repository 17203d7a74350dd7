/**
 * The whole surface of the native addon (build/Release/ferry_native.node), as TypeScript sees it.
 * Native objects are opaque handles: their state lives in C++, and the only way to act on them is
 * through the methods here. Keep this file in step with native/src/addon/.
 *
 * Errors: every native failure reaches JS as an `Error` whose `name` is the native error's name
 * (`DeviceOutOfMemoryError`, `ModelFormatError`, `InvalidArgumentError`, `CancelledError`,
 * `DeviceBusyError`, `IoError`, `DeviceUnavailableError`, `IntegrityError`); `mapNativeError` in
 * ./addon turns them into typed classes.
 */

/** Options of a CPU device. */
export interface CpuDeviceOptions {
  /** Device memory (the arena): what the device can hold at once, bytes. */
  capacityBytes: number;
  /** Emulated host→device link rate, GB/s (10^9 bytes/s); 0 = memory speed. @default 0 */
  linkGbps?: number;
  /** Kernel threads; 0 = one per hardware thread. @default 0 */
  threads?: number;
}

/** Options of a CUDA device. */
export interface CudaDeviceOptions {
  /** Which GPU. @default 0 */
  ordinal?: number;
  /** Device memory reserved for the arena (one cudaMalloc); 0 = free memory − 256 MiB. @default 0 */
  capacityBytes?: number;
}

/** What every device kind reports. */
export interface NativeDeviceInfoBase {
  /** "cpu", or the GPU's name ("NVIDIA H100 80GB HBM3"). */
  name: string;
  kind: "cpu" | "cuda";
  totalBytes: number;
  /**
   * What a new job can have: unallocated memory plus resident weights cached from earlier jobs
   * that no job holds (they are evicted when a plan needs the memory).
   */
  freeBytes: number;
  /** The copy stream's host→device rate from the last `measureCopyRate()`, GB/s; 0 = not measured. */
  peakCopyGbps: number;
}

export interface NativeCpuDeviceInfo extends NativeDeviceInfoBase {
  kind: "cpu";
  /** Emulated link rate, GB/s; 0 = memory speed. */
  linkGbps: number;
  threads: number;
}

export interface NativeCudaDeviceInfo extends NativeDeviceInfoBase {
  kind: "cuda";
  ordinal: number;
  /** Whether the linears run on cuBLAS (else Ferry's tiled CUDA kernels). */
  cublas: boolean;
}

/** The CPU device's info (the name predates the CUDA device). */
export type NativeDeviceInfo = NativeCpuDeviceInfo;

export interface NativeDeviceStats {
  /** Device allocations made since the device was created (per-step churn shows here). */
  allocations: number;
  inUseBytes: number;
  /** Highest `inUseBytes` since the device was created. */
  peakBytes: number;
  /** Bytes of device memory ever touched (the CPU arena commits pages lazily). */
  committedBytes: number;
  largestFreeBlock: number;
  /** Device bytes of resident weights kept between jobs (part of `inUseBytes`). */
  residentCacheBytes: number;
  /** Base segments those are. */
  residentCacheEntries: number;
  /** A run holds the device. */
  busy: boolean;
}

/** A device (opaque). It runs one job at a time. */
export interface NativeDevice<Info extends NativeDeviceInfoBase = NativeCpuDeviceInfo> {
  info(): Info;
  stats(): NativeDeviceStats;
  /**
   * Measures the copy stream's peak host→device rate (GB/s) with a few copies of up to `bytes`
   * (default 64 MiB, less when less device memory is free) from pinned host memory, and keeps it
   * as `info().peakCopyGbps`. Blocks the caller for the copies (tens of ms); throws
   * DeviceBusyError while a run holds the device.
   */
  measureCopyRate(bytes?: number): number;
  /** Frees the resident weights kept from earlier jobs (those a running job holds stay). */
  clearResidency(): void;
  /**
   * Frees the device. A run in progress keeps it alive until the run ends; any later call on
   * this handle throws `InvalidArgumentError`. Idempotent.
   */
  dispose(): void;
}

export interface NativeTensorInfo {
  name: string;
  /** safetensors dtype name ("F32", "BF16", …), or for GGUF files ggml's type name ("f32", "q8_0", …). */
  dtype: string;
  shape: number[];
  /** Absolute file offset of the tensor's data. */
  offset: number;
  bytes: number;
}

export interface NativeBaseSegment {
  /** "prelude", "blocks.<i>" or "final". */
  name: string;
  /** Σ bytes of its tensors as stored. */
  paramBytes: number;
  tensorNames: string[];
}

export interface NativeModelDims {
  hidden: number;
  heads: number;
  channels: number;
  blocks: number;
}

export interface NativeModelInfo {
  path: string;
  format: "safetensors" | "gguf";
  /** The file's `__metadata__`. */
  metadata: Record<string, string>;
  /** Every tensor in the file, in data order. */
  tensors: NativeTensorInfo[];
  /** Base segments in execution order; a plan's firstBase/lastBase index this list. */
  baseSegments: NativeBaseSegment[];
  dims: NativeModelDims;
}

/**
 * An opened model (opaque): the parsed, validated file and its host params cache, which fills
 * lazily (first use of each segment reads it from disk) and is kept for later steps and jobs.
 */
export interface NativeModel {
  info(): NativeModelInfo;
  /** Bytes of host memory the params cache holds now. */
  hostCacheBytes(): number;
  /** Frees the params cache and closes the file; a run in progress keeps them until it ends. */
  dispose(): void;
}

/** One merged segment of a plan: base segments firstBase..lastBase run as one unit. */
export interface NativePlanSegment {
  firstBase: number;
  lastBase: number;
  /** Keep the weights on the device for the whole job instead of copying them every step. */
  resident: boolean;
  /** Scratch to allocate while it computes; at least what its kernels need (`scratchBytes`). */
  computeBufferBytes: number;
}

export interface NativeRunRequest {
  /** Samples B. */
  batch: number;
  /** Tokens per sample T. */
  tokens: number;
  /** Sampler steps S: z ← z − (1/S)·model(z), S times. */
  steps: number;
  /** Counter offset of the initial latent (see lib/model/initialInput.ts); integer in [0, 2^64). */
  seed: number | bigint;
  /** The initial latent z [B, T, C]; generated natively from `seed` when absent. */
  input?: Float32Array;
  /** Must cover base segments 0..n−1 in order, each exactly once. */
  segments: NativePlanSegment[];
  /**
   * Staging slots (prefetch depth d, at most 16). 0 = sd.cpp's serial execution: a fresh device
   * buffer per segment per step, copy then compute. d ≥ 1: buffers allocated once per job,
   * streamed segments cycle through d slots, segment k+d copies while segment k computes (across
   * steps too), and resident weights stay on the device for later jobs. Same output bits either
   * way. @default 0
   */
  slots?: number;
  /**
   * Where weights wait on the host: "cpu" keeps them in the params cache, "disk" drops each
   * segment's host copy after its transfer and reads it again when next needed. "" = "cpu".
   * @default "cpu"
   */
  paramsBackend?: "cpu" | "disk" | "";
  /**
   * When weights are read: "lazy" at first use (inside step 1), "eager" all before step 1,
   * "background" by a reader in plan order from job start. "" = "lazy". @default "lazy"
   */
  load?: "lazy" | "eager" | "background" | "";
  /**
   * Checksum each base segment's host params at first use in the job and check every device copy
   * against it; a mismatch fails the run with IntegrityError. @default false
   */
  verify?: boolean;
}

export type NativeEventKind = "segment" | "prepare_params" | "h2d" | "compute";
export type NativeParamSource = "disk" | "host" | "resident";

/** Something the run did, with wall-clock times (Unix epoch, microseconds). */
export interface NativeRunEvent {
  kind: NativeEventKind;
  /** Index of the merged segment in the plan. */
  segment: number;
  startUs: number;
  endUs: number;
  /** Weight bytes involved (the merged segment's param bytes). */
  bytes: number;
  /** segment, prepare_params: where the weights came from. */
  source?: NativeParamSource;
  /** prepare_params: whether it had to read from disk. */
  cold?: boolean;
  /** compute: how long it waited for its weights (its part of the step's `stallUs`). */
  stallUs?: number;
}

/** What one step did, delivered after the step (never blocking the run). */
export interface NativeStepReport {
  /** 1-based. */
  step: number;
  stepStartUs: number;
  stepEndUs: number;
  /** Bytes copied host→device this step. */
  h2dBytes: number;
  /** Bytes read from the model file this step. */
  diskBytes: number;
  /** Device memory high-water mark during this step. */
  arenaPeakBytes: number;
  /**
   * How long compute waited for weights this step, µs: Σ of the gaps between one segment's
   * compute and the next (from the step's start for the first). A serial run waits for every
   * prepare and copy; an overlapped one only for what prefetching did not hide.
   */
  stallUs: number;
  /** Step 1: resident weight bytes an earlier job on this device left there (not copied). */
  residentHitBytes: number;
  /**
   * Per merged segment: a "segment" event, then its prepare_params / h2d / compute. In an
   * overlapped run a segment's prepare_params and h2d may start before the step does (they were
   * prefetched during the previous step); the segment event spans them.
   */
  events: NativeRunEvent[];
}

export interface NativeRunOutput {
  /** z after the last step, row-major. */
  output: Float32Array;
  /** [B, T, C]. */
  shape: number[];
}

/** A run in progress on its own native thread. */
export interface NativeRun {
  /**
   * Settles when the run ends; by then the device is free for the next run. Rejects with
   * DeviceBusyError (the device already runs a job), InvalidArgumentError (bad plan or request),
   * DeviceOutOfMemoryError, ModelFormatError / IoError (reading weights), CancelledError, or the
   * error `onStep` threw.
   */
  done: Promise<NativeRunOutput>;
  /** Asks the run to stop at its next segment boundary; `done` then rejects with CancelledError. */
  cancel(): void;
}

export type NativeScratchKind = "prelude" | "block" | "final";

export interface NativeScratchDims {
  hidden: number;
  heads: number;
  channels: number;
  batch: number;
  tokens: number;
}

export interface NativeAddon {
  /** The package version the addon was built from. */
  version(): string;
  CpuDevice: new (options: CpuDeviceOptions) => NativeDevice<NativeCpuDeviceInfo>;
  /**
   * A GPU. Throws DeviceUnavailableError when this build has no CUDA support or there is no such
   * GPU; check `cudaAvailable()` first.
   */
  CudaDevice: new (options?: CudaDeviceOptions) => NativeDevice<NativeCudaDeviceInfo>;
  /** Whether this build has the CUDA device and the CUDA runtime sees a GPU. */
  cudaAvailable(): boolean;
  /** Opens, parses and validates a Ferry DiT safetensors file off the main thread. */
  openModel(path: string): Promise<NativeModel>;
  /** Scratch bytes one base segment's kernels need (kernels::*_scratch_bytes). */
  scratchBytes(kind: NativeScratchKind, dims: NativeScratchDims): number;
  /**
   * Starts a job on `device`. Malformed arguments throw InvalidArgumentError synchronously;
   * everything else arrives through `done`. `onStep` runs on the main thread after each step; if
   * it throws, the run stops and `done` rejects with that error.
   */
  startRun(
    device: NativeDevice<NativeDeviceInfoBase>,
    model: NativeModel,
    request: NativeRunRequest,
    onStep?: (report: NativeStepReport) => void,
  ): NativeRun;
}

/**
 * The whole surface of the native addon (build/Release/ferry_native.node), as TypeScript sees it.
 * Native objects are opaque handles: their state lives in C++ (Ferry's runtime over ggml), and
 * the only way to act on them is through the methods here. Keep this file in step with
 * native/src/addon/.
 *
 * Errors: every native failure reaches JS as an `Error` whose `name` is the native error's name
 * (`DeviceOutOfMemoryError`, `ModelFormatError`, `InvalidArgumentError`, `CancelledError`,
 * `DeviceBusyError`, `IoError`, `DeviceUnavailableError`, `IntegrityError`); `mapNativeError` in
 * ./addon turns them into typed classes.
 */

/** Options of a CPU device: ggml's CPU backend computing in an arena capped at the budget. */
export interface CpuDeviceOptions {
  /** Device memory (the arena): what the device can hold at once, bytes. */
  capacityBytes: number;
  /** Emulated host→device link rate, GB/s (10^9 bytes/s); 0 = memory speed. @default 0 */
  linkGbps?: number;
  /** ggml compute threads; 0 = one per hardware thread. @default 0 */
  threads?: number;
  /**
   * Commit all device memory now rather than page by page on first use (first-touch page faults
   * cost 0.3–0.8 GB/s on this project's VMs), as a GPU's memory is there from the start.
   * @default false
   */
  commitMemory?: boolean;
}

/** Options of a GPU device: a ggml GPU backend (CUDA when built with FERRY_CUDA=1). */
export interface GpuDeviceOptions {
  /** Which GPU among those ggml lists. @default 0 */
  ordinal?: number;
  /** Device memory the budget covers, allocated at once; 0 = free memory − 512 MiB. @default 0 */
  capacityBytes?: number;
}

/** What every device kind reports. */
export interface NativeDeviceInfoBase {
  /** "cpu", or "gpu:<ordinal>". */
  name: string;
  kind: "cpu" | "gpu";
  /** ggml's name of the backend ("CPU", "CUDA0"). */
  backend: string;
  totalBytes: number;
  /**
   * What a new job can have: unallocated memory plus resident weights cached from earlier jobs
   * that no job holds (they are evicted when a plan needs the memory).
   */
  freeBytes: number;
  /** The copy stream's host→device rate from the last `measureCopyRate()`, GB/s; 0 = not measured. */
  peakCopyGbps: number;
  /** What all runs and cached weights may hold together (`setBudget`; `totalBytes` unless lowered). */
  budgetBytes: number;
  /** Runs holding the device now (several share it; the memory arbiter admits each). */
  runningJobs: number;
}

export interface NativeCpuDeviceInfo extends NativeDeviceInfoBase {
  kind: "cpu";
  /** Emulated link rate, GB/s; 0 = memory speed. */
  linkGbps: number;
  threads: number;
}

export interface NativeGpuDeviceInfo extends NativeDeviceInfoBase {
  kind: "gpu";
  ordinal: number;
  /** The GPU's name as its backend reports it ("NVIDIA H100 80GB HBM3"). */
  description: string;
}

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
  /** The budget allocations are refused past. */
  budgetBytes: number;
}

/** What `setBudget` did. */
export interface NativeBudgetChange {
  budgetBytes: number;
  /** In use after idle models' cached weights over the budget were evicted. */
  inUseBytes: number;
  evictedBytes: number;
  /** Still in use beyond the budget: running jobs hold it until their plans shrink or they end. */
  overBytes: number;
}

/**
 * A device (opaque). Several runs may share it, each on its own thread: their computes take
 * turns, and each takes all of its memory at its start under the budget (cached weights of idle
 * models are evicted least recently used first; DeviceOutOfMemoryError names what it needed and
 * what was left when it still does not fit).
 */
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
   * Sets the budget (1 byte .. `totalBytes`; InvalidArgumentError otherwise), evicts idle cached
   * weights until what is in use fits it, and starts a new high-water mark (`stats().peakBytes`).
   * Running jobs keep what they hold until they end or take a plan that fits (`swapPlan`).
   */
  setBudget(bytes: number): NativeBudgetChange;
  /**
   * Frees the device. A run in progress keeps it alive until the run ends; any later call on
   * this handle throws `InvalidArgumentError`. Idempotent.
   */
  dispose(): void;
}

export interface NativeTensorInfo {
  name: string;
  /**
   * safetensors dtype name ("F32", "BF16", …), or for GGUF files ggml's type name ("f32", "q8_0",
   * "q4_K", …).
   */
  dtype: string;
  shape: number[];
  /** Absolute file offset of the tensor's data. */
  offset: number;
  bytes: number;
}

export interface NativeBaseSegment {
  /** "prelude", "blocks.<i>", "final", … as the architecture names them. */
  name: string;
  /** "prelude", "block", "final", … (segments of a kind share a graph). */
  kind: string;
  /** Σ bytes of its tensors as stored (ggml_nbytes). */
  paramBytes: number;
  /** Its packed buffer: the bytes a staging slot or the residency cache holds for it. */
  packedBytes: number;
  tensorNames: string[];
}

export interface NativeModelInfo {
  path: string;
  format: "safetensors" | "gguf";
  /** The architecture: "ferry-dit", "flux". */
  arch: string;
  /** One line: "ferry-dit 4 blocks, hidden 256, heads 4, channels 16". */
  description: string;
  /**
   * The architecture's configuration (ferry-dit: hidden, heads, channels, blocks; flux: hidden,
   * heads, depth, depth_single, guidance 0|1).
   */
  config: Record<string, number>;
  /** The device buffer type the packed layout is for ("CPU", "CUDA0"). */
  layout: string;
  /** The file's `__metadata__` (GGUF: every key, non-strings summarised). */
  metadata: Record<string, string>;
  /** Every tensor in the file, in data order. */
  tensors: NativeTensorInfo[];
  /** Base segments in execution order; a plan's firstBase/lastBase index this list. */
  baseSegments: NativeBaseSegment[];
}

/** What the host params cache's loader has done so far. */
export interface NativeLoadStats {
  /** Params bytes read from the file (re-reads of dropped segments too). */
  bytesRead: number;
  /** Of which read with O_DIRECT. */
  directBytes: number;
  /** Wall time during which at least one segment read was under way. */
  readSeconds: number;
  segmentReads: number;
  /** prepare_params calls served from host memory / that waited for a read. */
  hits: number;
  misses: number;
  /** Host memory the cache holds now. */
  hostBytes: number;
  /** Whether O_DIRECT is available for this file. */
  directIo: boolean;
  /**
   * Whether the file's mapping is the params cache (a model opened for the CPU device: loading
   * populates the mapping, copies read from it); false: buffers (pinned, for a GPU).
   */
  mapped: boolean;
}

/**
 * An opened model (opaque): the parsed, validated file and its host params cache, which fills
 * lazily (first use of each segment reads it from disk) and is kept for later steps and jobs.
 */
export interface NativeModel {
  info(): NativeModelInfo;
  /** Bytes of host memory the params cache holds now. */
  hostCacheBytes(): number;
  loadStats(): NativeLoadStats;
  /** Frees the params cache and closes the file; a run in progress keeps them until it ends. */
  dispose(): void;
}

/** One merged segment of a plan: base segments firstBase..lastBase run as one unit. */
export interface NativePlanSegment {
  firstBase: number;
  lastBase: number;
  /** Keep the weights on the device for the whole job instead of copying them every step. */
  resident: boolean;
}

/** How a job runs on the device. Every mode gives the same output bits. */
export type NativeExecution = "serial" | "lookahead" | "pooled";

export interface NativeRunRequest {
  /** Samples B. */
  batch: number;
  /** Tokens per sample (the DiT's T; FLUX's image tokens L). */
  tokens: number;
  /** Text tokens (FLUX). @default 0 */
  contextTokens?: number;
  /** Sampler steps S (the DiT: z ← z − (1/S)·model(z), S times). */
  steps: number;
  /** Counter offset of generated inputs (see lib/model/initialInput.ts); integer in [0, 2^64). */
  seed: number | bigint;
  /**
   * Inputs by activation name, float32 in row-major order (the DiT's latent "z" [B, T, C]);
   * absent ones are generated natively from `seed`.
   */
  inputs?: Record<string, Float32Array>;
  /**
   * A share of a batch split: these `batch` samples are samples `firstSample`… of a larger batch
   * run with the same seed, so each generated input starts that many samples into the larger
   * batch's counter (`seed + k·2^32 + firstSample × the input's values per sample` for the k-th
   * input) and the shares' outputs, concatenated, are the larger batch's, bit for bit. Inputs
   * given in `inputs` are the share's own. @default 0
   */
  firstSample?: number;
  /**
   * Must cover base segments 0..n−1 in order, each exactly once (with `stage`, the stage's
   * firstBase..lastBase).
   */
  segments: NativePlanSegment[];
  /**
   * "serial": sd.cpp's execution — a fresh device buffer per segment per step, copy then
   * compute. "lookahead": sd.cpp after PR #1905 — the same, with the next streamed segment's copy
   * queued while the current one computes. "pooled" (needs `slots`): buffers allocated once per
   * job, streamed segments cycle through `slots` staging slots, segment k+d copies while segment
   * k computes (across steps too), resident weights stay on the device for later jobs.
   * @default "pooled" when slots > 0, else "serial"
   */
  execution?: NativeExecution;
  /** Staging slots of a pooled run (1..16). @default 0 */
  slots?: number;
  /** FLUX.1-dev's guidance (ignored by models without guidance_in). @default 3.5 */
  guidance?: number;
  /** FLUX: BFL's resolution-dependent timestep schedule. @default false */
  shift?: boolean;
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
  /**
   * This run is one stage of a pipeline split: it computes base segments firstBase..lastBase
   * (inclusive) only, and reads only theirs from disk. Needs "pooled" execution. Before step t it
   * waits for the handoff labelled t (given to `deliver`), except the first stage (firstBase 0) at
   * step 1; after step t's segments a stage that is not the last (lastBase n−1) hands on the
   * handoff labelled t through `onHandoff`, while the last runs the sampler's update and, when
   * t < steps, hands the handoff labelled t+1 to the first stage. A handoff holds every latent,
   * output and state activation by name (each stage computes its own inputs, job state and
   * timesteps: give every stage the same request but stage and plan). Only the last stage's
   * `output` is the job's; chained stages give bitwise the single-device run's output. A stage
   * covering the whole model hands nothing over (as without `stage`). A range that is not one
   * of the model's, or a plan that does not cover it, rejects `done` with InvalidArgumentError.
   * A stage waits for its handoffs until cancelled: when one stage's `done` rejects, cancel the
   * others. A step report's span (and its stalls) starts once the step's handoff has arrived.
   */
  stage?: NativePipelineStage;
}

/** A pipeline stage's base segments (NativeRunRequest.stage). */
export interface NativePipelineStage {
  firstBase: number;
  lastBase: number;
}

/**
 * Activations one pipeline stage hands the next, float32 in ggml order by activation name. From
 * `onHandoff` each array views native memory (freed when the array is collected; no copy).
 */
export type NativeHandoff = Record<string, Float32Array>;

/**
 * "read": a base segment's weights read from the file ahead of use (eager or background loading)
 * that no prepare_params waited for; reported with the step during which the read ended (step 1
 * for reads before it), `segment` being the merged segment that holds the base segment.
 */
export type NativeEventKind = "segment" | "prepare_params" | "h2d" | "compute" | "read";
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
  /** Device allocations ever made, counted by the run's thread at the end of this step. */
  allocations: number;
  /** The most host memory the model's params cache held during this step (sampled natively). */
  hostPeakBytes: number;
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
  /** The latent's activation name ("z" for the DiT). */
  name: string;
  /** The latent after the last step, row-major. */
  output: Float32Array;
  /** Row-major shape ([B, T, C] for the DiT). */
  shape: number[];
  /** The compute buffer ggml_gallocr laid the job's intermediates out in. */
  computeBufferBytes: number;
}

/** A run in progress on its own native thread. */
export interface NativeRun {
  /**
   * Settles when the run ends; by then the device is free for the next run. Rejects with
   * DeviceBusyError (the device already runs a job), InvalidArgumentError (bad plan or request),
   * DeviceOutOfMemoryError, ModelFormatError / IoError (reading weights), CancelledError
   * (also when cancelled while a stage waits for a handoff), or the error `onStep` or
   * `onHandoff` threw. Every step report and handoff is delivered before it settles.
   */
  done: Promise<NativeRunOutput>;
  /** Asks the run to stop at its next segment boundary; `done` then rejects with CancelledError. */
  cancel(): void;
  /**
   * Hands a pooled run a new plan, taken at its next step boundary (its copies drain, its slots
   * and resident holds go back, the new plan's buffers are taken under the budget); the output is
   * unchanged. A later call replaces one not yet taken; serial and lookahead runs ignore it. A
   * plan that does not cover the model fails the run there.
   */
  swapPlan(plan: { segments: NativeRunRequest["segments"]; slots: number }): void;
  /**
   * A stage run: the previous stage's handoff labelled `step` (what its `onHandoff` got), copied
   * into the run's inbox; the run takes it before step `step`. Handoffs may come early and in any
   * order of steps. Throws InvalidArgumentError synchronously when `step` is not an integer ≥ 1 or
   * a value is not a Float32Array; a handoff whose names or sizes are not the job's activations'
   * fails the run. Ignored once the run has finished.
   */
  deliver(step: number, tensors: NativeHandoff): void;
}

/** The sizes of a job, for measureSegments. */
export interface NativeJobShape {
  batch: number;
  tokens: number;
  contextTokens?: number;
}

/** A base segment measured on its real ggml graph (for the planner). */
export interface NativeSegmentMeasure {
  name: string;
  kind: string;
  /** ggml_gallocr's buffer for the graph's intermediates (ggml's CPU buffer type). */
  computeBufferBytes: number;
  /** Activations it writes. */
  outputBytes: number;
  /** State it reads that earlier segments wrote. */
  prevCutBytes: number;
  /** Job inputs and job state it reads. */
  externalBytes: number;
  /** Counted from the graph: 2·k per matmul output element, one per element elsewhere. */
  flops: number;
}

/** A weight an architecture expects. */
export interface NativeWeightSpec {
  /** Its name in the file (without any prefix the file adds). */
  name: string;
  /** Row-major (PyTorch/safetensors order). */
  shape: number[];
  /** A matrix a matmul reads (any ggml weight type); else a vector (f32, f16 or bf16). */
  matrix: boolean;
}

export interface NativeSegmentSpec {
  name: string;
  kind: string;
  /** In the order the segment's graph takes them. */
  weights: NativeWeightSpec[];
}

export type NativeActivationRole =
  "input" | "latent" | "output" | "state" | "stepInput" | "jobState";

/** A tensor a job keeps on the device; "input" and "latent" ones may come with the request. */
export interface NativeActivationSpec {
  name: string;
  role: NativeActivationRole;
  /** Row-major, float32. */
  shape: number[];
}

/** An architecture's layout, from its configuration alone. */
export interface NativeArchLayout {
  arch: string;
  description: string;
  /** The configuration as the architecture reads it (derived values added: FLUX's heads). */
  config: Record<string, number>;
  /** Base segments in execution order. */
  segments: NativeSegmentSpec[];
  /** The job's activations, when describeArch was given a job. */
  activations?: NativeActivationSpec[];
}

/** A ggml type as this build's ggml has it. */
export interface NativeGgmlType {
  id: number;
  name: string;
  blockSize: number;
  typeSize: number;
  quantized: boolean;
  /** ggml's CPU backend multiplies with it (a GGUF weight of this type runs). */
  weight: boolean;
  /** ggml can quantize float32 to it. */
  quantizable: boolean;
  /** Its quantizer needs an importance matrix (Ferry cannot make one). */
  requiresImatrix: boolean;
}

export interface NativeAddon {
  /** The package version the addon was built from. */
  version(): string;
  CpuDevice: new (options: CpuDeviceOptions) => NativeDevice<NativeCpuDeviceInfo>;
  /**
   * A GPU through ggml's GPU backend. Throws DeviceUnavailableError when this build has no GPU
   * backend (build with FERRY_CUDA=1) or there is no such GPU; check `gpuDeviceCount()` first.
   */
  GpuDevice: new (options?: GpuDeviceOptions) => NativeDevice<NativeGpuDeviceInfo>;
  /** GPUs ggml can drive in this build on this machine. */
  gpuDeviceCount(): number;
  /**
   * Opens, parses, validates and binds a model file (safetensors or GGUF) to its architecture,
   * off the main thread; its packed layout is for `device`'s memory (the CPU's by default: a GPU
   * job needs the model opened for its device). For the CPU device the params cache is the
   * file's mapping; for a GPU, pinned buffers.
   */
  openModel(
    path: string,
    options?: { device?: NativeDevice<NativeDeviceInfoBase> },
  ): Promise<NativeModel>;
  /** Each base segment of an architecture measured on its real graph for a job (no weights needed). */
  measureSegments(
    arch: string,
    config: Record<string, number>,
    job: NativeJobShape,
  ): Promise<NativeSegmentMeasure[]>;
  /**
   * An architecture's layout from its configuration ("ferry-dit": hidden, heads, channels,
   * blocks; "flux": hidden, depth, depth_single, guidance 0|1): base segments with their weights
   * and, given a job, its activations. Throws InvalidArgumentError for a bad configuration or job.
   */
  describeArch(
    arch: string,
    config: Record<string, number>,
    job?: NativeJobShape,
  ): NativeArchLayout;
  /** `values` (whole rows of `rowLength`) quantized to ggml type `type` by ggml's own quantizer. */
  quantize(type: string, values: Float32Array, rowLength: number): Uint8Array;
  /** ggml's type table, as this build has it. */
  ggmlTypes(): NativeGgmlType[];
  /**
   * Starts a job on `device`. Malformed arguments throw InvalidArgumentError synchronously;
   * everything else arrives through `done`. `onStep` runs on the main thread after each step;
   * `onHandoff` on the main thread for every handoff a stage run sends (`request.stage`; a stage
   * that is not the whole model needs it, else InvalidArgumentError), labelled with the step it
   * feeds: pass it to the next stage's `deliver`. If either throws, the run stops and `done`
   * rejects with that error.
   */
  startRun(
    device: NativeDevice<NativeDeviceInfoBase>,
    model: NativeModel,
    request: NativeRunRequest,
    onStep?: (report: NativeStepReport) => void,
    onHandoff?: (step: number, tensors: NativeHandoff) => void,
  ): NativeRun;
}

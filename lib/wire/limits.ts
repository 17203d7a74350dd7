/**
 * The limits of the scheduler's API, in one place: what a request may carry and what a response
 * may grow to. The README's "Limits" section lists them.
 */

/**
 * The largest gRPC message either side of the scheduler's API accepts or sends, set on the server,
 * the executors' channel and the client alike: a job result carries its whole output tensor.
 */
export const GRPC_MESSAGE_LIMIT = 256 * 1024 * 1024;

/** A job's output tensor (B·T·C float32) may be at most this big, so its result fits a message. */
export const MAX_OUTPUT_BYTES = 64 * 1024 * 1024;

/**
 * A job's input tensors together (FLUX.1's txt at 1024×1024 is 8 MiB a sample); absent inputs are
 * generated from the seed instead.
 */
export const MAX_INPUT_BYTES = 128 * 1024 * 1024;
/**
 * The most any message the scheduler sends a client may be (unary responses and WatchJob
 * events): gRPC's default receive limit, so a stock client needs no settings.
 */
export const CLIENT_MESSAGE_LIMIT = 4 * 1024 * 1024;
/**
 * Output bytes one WatchJob message carries unless the watcher asks otherwise: an output up to
 * this size travels inside its result, a larger one in OutputChunks of this size.
 */
export const DEFAULT_OUTPUT_CHUNK_BYTES = 1024 * 1024;
/** What a watcher may ask for as `output_chunk_bytes`. */
export const MIN_OUTPUT_CHUNK_BYTES = 4096;
export const MAX_OUTPUT_CHUNK_BYTES = MAX_OUTPUT_BYTES;
/**
 * A result's statistics (its steps) are cut to at most this many encoded bytes, so the result
 * plus one default chunk of output stays within {@link CLIENT_MESSAGE_LIMIT}.
 */
export const RESULT_STATS_LIMIT = 2 * 1024 * 1024;
/** A progress event relayed to watchers is at most this big (its events are dropped beyond). */
export const PROGRESS_MESSAGE_LIMIT = 1024 * 1024;

/** Sampler steps of one job. */
export const MAX_STEPS = 1_000_000;
/** Batch size B. */
export const MAX_BATCH = 4096;
/** Tokens per sample T. */
export const MAX_TOKENS = 1 << 20;
/** |max_vram_gib|: a million GiB is far beyond any device and far inside uint64 bytes. */
export const MAX_VRAM_GIB = 1e6;
/** Job priorities lie in [-MAX_PRIORITY, MAX_PRIORITY]. */
export const MAX_PRIORITY = 1000;
/** ListJobs page size: default and largest. */
export const DEFAULT_PAGE_SIZE = 100;
export const MAX_PAGE_SIZE = 1000;

/** Strings: a model reference (name or path). */
export const MAX_MODEL_REF_LENGTH = 4096;
/** Executor ids, job ids, idempotency keys, policy and option names. */
export const MAX_ID_LENGTH = 128;
/** How much of a caller's string an error message may quote. */
export const MAX_QUOTED_LENGTH = 80;

/**
 * Per-step statistics a job result keeps: the first few steps (cold start) and the most recent
 * ones; the rest are counted in `steps_omitted`. Bounds a million-step job's result and memory.
 */
export const RESULT_FIRST_STEPS = 8;
export const RESULT_STEPS = 1024;
/** Progress events a job keeps for a late watcher (the most recent). */
export const PROGRESS_HISTORY = 64;

/** Device and rate numbers an executor reports: bytes below 2^53, rates and counts sane. */
export const MAX_DEVICE_BYTES = Number.MAX_SAFE_INTEGER;
export const MAX_RATE = 1e9;
export const MAX_THREADS = 65_536;

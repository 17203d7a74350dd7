/**
 * Job results as they travel to watchers within {@link CLIENT_MESSAGE_LIMIT}: statistics cut to
 * {@link RESULT_STATS_LIMIT}, and an output larger than the watcher's chunk size sent as
 * OutputChunks just before the result (which then carries `output_bytes` and no output). The
 * client side puts the chunks back together and checks them.
 */
import {
  JobResult,
  type OutputChunk,
  type StepStats,
  type WatchJobResponse,
} from "../../gen/ferry/v1/scheduler";
import {
  MAX_OUTPUT_BYTES,
  RESULT_FIRST_STEPS,
  RESULT_STATS_LIMIT,
  DEFAULT_OUTPUT_CHUNK_BYTES,
} from "./limits";

/** Encoded bytes of a result without its output. */
function statsBytes(result: JobResult): number {
  return JobResult.encode({ ...result, output: Buffer.alloc(0) }).finish().length;
}

/**
 * The result with its statistics cut to `limit` encoded bytes: first the per-segment figures of
 * the steps in the middle go (the first and last steps keep theirs), then steps from the middle
 * (counted in `steps_omitted`). A result within the limit comes back as it is.
 */
export function fitResultStats(result: JobResult, limit = RESULT_STATS_LIMIT): JobResult {
  if (statsBytes(result) <= limit) return result;
  const keep = RESULT_FIRST_STEPS;
  let steps: StepStats[] = result.steps.map((step, i) =>
    i < keep || i >= result.steps.length - keep ? step : { ...step, segments: [], events: [] },
  );
  let omitted = result.stepsOmitted;
  let fitted = { ...result, steps, stepsOmitted: omitted };
  while (statsBytes(fitted) > limit && steps.length > 2 * keep) {
    // Halve the middle each round: a handful of encodes, whatever the size.
    const middle = steps.length - 2 * keep;
    const drop = Math.max(1, Math.ceil(middle / 2));
    steps = [...steps.slice(0, keep), ...steps.slice(keep + drop)];
    omitted += drop;
    fitted = { ...result, steps, stepsOmitted: omitted };
  }
  return fitted;
}

/**
 * What a watcher is sent for a finished job: the output in chunks of `chunkBytes` when it is
 * larger than that, then the result (statistics fitted, `output_bytes` set, the output inline
 * only when it fits one chunk).
 */
export function resultMessages(
  result: JobResult,
  chunkBytes = DEFAULT_OUTPUT_CHUNK_BYTES,
): WatchJobResponse[] {
  const fitted = fitResultStats(result);
  const output = fitted.output;
  const total = output.length;
  if (total <= chunkBytes) {
    return [{ event: { $case: "result", value: { ...fitted, outputBytes: total } } }];
  }
  const messages: WatchJobResponse[] = [];
  for (let offset = 0; offset < total; offset += chunkBytes) {
    messages.push({
      event: {
        $case: "outputChunk",
        value: {
          jobId: result.jobId,
          offset,
          data: output.subarray(offset, Math.min(total, offset + chunkBytes)),
          totalBytes: total,
        },
      },
    });
  }
  messages.push({
    event: {
      $case: "result",
      value: { ...fitted, output: Buffer.alloc(0), outputBytes: total },
    },
  });
  return messages;
}

/** Puts a watched job's output back together from its chunks, checking each as it comes. */
export class OutputAssembler {
  private buffer: Buffer | undefined;
  private received = 0;

  /** Takes the next chunk; throws when it is out of order, oversized or inconsistent. */
  add(chunk: OutputChunk): void {
    const total = chunk.totalBytes;
    if (total > MAX_OUTPUT_BYTES) {
      throw new Error(
        `an output chunk announces ${total} bytes; outputs are at most ${MAX_OUTPUT_BYTES}`,
      );
    }
    if (!this.buffer) this.buffer = Buffer.alloc(total);
    if (total !== this.buffer.length || chunk.offset !== this.received) {
      throw new Error(
        `output chunk at ${chunk.offset} of ${total} bytes does not follow the ${this.received} bytes received`,
      );
    }
    if (chunk.data.length === 0 || chunk.offset + chunk.data.length > total) {
      throw new Error(`output chunk at ${chunk.offset} overruns the ${total}-byte output`);
    }
    chunk.data.copy(this.buffer, chunk.offset);
    this.received += chunk.data.length;
  }

  /** The result with its output in place; throws when chunks are missing. */
  complete(result: JobResult): JobResult {
    if (result.output.length > 0 || result.outputBytes === 0) {
      if (this.buffer) throw new Error("output chunks came for a result that carries its output");
      return result;
    }
    if (!this.buffer || this.received !== result.outputBytes) {
      throw new Error(
        `the result announces ${result.outputBytes} output bytes; ${this.received} came in chunks`,
      );
    }
    return { ...result, output: this.buffer };
  }
}

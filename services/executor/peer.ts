/**
 * Executor to executor: a pipeline split's handoffs. Each executor serves ExecutorPeerService on
 * its peer address; a stage run streams the activations of every step to the next stage's
 * executor (the last stage's latent back to the first), chunked, without the scheduler in the
 * path. The receiving side reassembles each step's tensors and hands them to the stage's native
 * run (`NativeRun.deliver`), or keeps them until that run has started: a stage may be ahead of
 * its neighbour's RunJob by a message.
 */
import {
  Server,
  status,
  type ChannelCredentials,
  type ClientWritableStream,
  type ServerReadableStream,
  type sendUnaryData,
} from "@grpc/grpc-js";
import {
  ExecutorPeerServiceClient,
  ExecutorPeerServiceService,
  HandoffRequest,
  type HandoffResponse,
  type TensorPiece,
} from "../../gen/ferry/v1/peer";
import {
  bearerInterceptor,
  serverCredentials,
  tokenInterceptor,
  type ServerTlsFiles,
} from "../../lib/wire/credentials";
import { GRPC_MESSAGE_LIMIT } from "../../lib/wire/limits";
import { StatusError, toStatusError } from "../../lib/wire/statusError";
import { bindServer } from "../../lib/wire/listen";

/** Bytes of tensor data one HandoffRequest carries at most (its pieces together). */
export const HANDOFF_CHUNK_BYTES = 1024 * 1024;
/** The largest tensor a handoff may carry (a FLUX.1 1024² batch of 4's joint stream is ~150 MiB). */
export const MAX_HANDOFF_TENSOR_BYTES = 1024 * 1024 * 1024;
/** Tensors of one handoff at most. */
const MAX_HANDOFF_TENSORS = 64;

export type HandoffTensors = Record<string, Float32Array>;

/** Takes a complete handoff for a stage job (which may not have started here yet). */
export type HandoffSink = (jobId: string, step: number, tensors: HandoffTensors) => void;

/** Hears a stream refused for a stage job: that stage cannot get its activations. */
export type HandoffRefused = (jobId: string, message: string) => void;

/**
 * Handoffs for stage jobs that have not started here yet, until they do (or expire): bounded in
 * bytes and age, so a neighbour sending for a job that never starts cannot grow the executor.
 */
export class PendingHandoffs {
  private readonly held = new Map<
    string,
    { atMs: number; bytes: number; steps: { step: number; tensors: HandoffTensors }[] }
  >();
  private bytes = 0;

  constructor(
    private readonly maxBytes = 512 * 1024 * 1024,
    private readonly maxAgeMs = 10 * 60 * 1000,
  ) {}

  /** Keeps a handoff; false (and nothing kept) when it would pass the byte bound. */
  add(jobId: string, step: number, tensors: HandoffTensors, nowMs = Date.now()): boolean {
    this.expire(nowMs);
    const bytes = Object.values(tensors).reduce((sum, t) => sum + t.byteLength, 0);
    if (this.bytes + bytes > this.maxBytes) return false;
    const entry = this.held.get(jobId) ?? { atMs: nowMs, bytes: 0, steps: [] };
    entry.steps.push({ step, tensors });
    entry.bytes += bytes;
    this.held.set(jobId, entry);
    this.bytes += bytes;
    return true;
  }

  /** The job's held handoffs, in arrival order (and no longer held). */
  take(jobId: string): { step: number; tensors: HandoffTensors }[] {
    const entry = this.held.get(jobId);
    if (!entry) return [];
    this.held.delete(jobId);
    this.bytes -= entry.bytes;
    return entry.steps;
  }

  get heldBytes(): number {
    return this.bytes;
  }

  private expire(nowMs: number): void {
    for (const [jobId, entry] of this.held) {
      if (nowMs - entry.atMs > this.maxAgeMs) this.take(jobId);
    }
  }
}

/** A step's handoff being reassembled from its chunks. */
interface Assembling {
  step: number;
  tensors: HandoffTensors;
  filled: Map<string, number>;
}

/** Adds one message's pieces; a complete handoff (the step's last message) comes back. */
function addMessage(
  assembling: Assembling | undefined,
  message: HandoffRequest,
): { assembling: Assembling | undefined; complete?: Assembling } {
  const where = `handoff for job ${JSON.stringify(message.jobId)} step ${message.step}`;
  if (!message.jobId) throw new StatusError(status.INVALID_ARGUMENT, "handoff without a job_id");
  if (message.step < 1)
    throw new StatusError(status.INVALID_ARGUMENT, `${where}: step must be ≥ 1`);
  const current: Assembling = assembling ?? { step: message.step, tensors: {}, filled: new Map() };
  if (current.step !== message.step) {
    throw new StatusError(
      status.INVALID_ARGUMENT,
      `${where}: step ${current.step}'s handoff was not finished (no message with last = true)`,
    );
  }
  for (const piece of message.pieces) {
    const name = piece.tensor;
    let tensor = current.tensors[name];
    if (!tensor) {
      if (
        !name ||
        piece.tensorBytes % 4 !== 0 ||
        piece.tensorBytes > MAX_HANDOFF_TENSOR_BYTES ||
        Object.keys(current.tensors).length >= MAX_HANDOFF_TENSORS
      ) {
        throw new StatusError(
          status.INVALID_ARGUMENT,
          `${where}: tensor ${JSON.stringify(name)} of ${piece.tensorBytes} bytes (a named float32 tensor of at most ${MAX_HANDOFF_TENSOR_BYTES} bytes, ${MAX_HANDOFF_TENSORS} tensors)`,
        );
      }
      tensor = new Float32Array(piece.tensorBytes / 4);
      current.tensors[name] = tensor;
      current.filled.set(name, 0);
    }
    if (
      piece.tensorBytes !== tensor.byteLength ||
      piece.offset + piece.data.length > tensor.byteLength
    ) {
      throw new StatusError(
        status.INVALID_ARGUMENT,
        `${where}: ${piece.data.length} bytes at ${piece.offset} do not fit tensor ${JSON.stringify(name)} of ${tensor.byteLength} bytes`,
      );
    }
    new Uint8Array(tensor.buffer, tensor.byteOffset, tensor.byteLength).set(
      piece.data,
      piece.offset,
    );
    current.filled.set(name, current.filled.get(name)! + piece.data.length);
  }
  if (!message.last) return { assembling: current };
  for (const [name, tensor] of Object.entries(current.tensors)) {
    if (current.filled.get(name) !== tensor.byteLength) {
      throw new StatusError(
        status.INVALID_ARGUMENT,
        `${where}: tensor ${JSON.stringify(name)} got ${current.filled.get(name)} of ${tensor.byteLength} bytes`,
      );
    }
  }
  return { assembling: undefined, complete: current };
}

/** Serves ExecutorPeerService: reassembles handoffs and gives each to `sink`. */
export class PeerServer {
  private readonly server: Server;

  constructor(
    private readonly options: {
      sink: HandoffSink;
      refused?: HandoffRefused;
      token?: string;
      tls?: ServerTlsFiles;
      log: (line: string) => void;
    },
  ) {
    this.server = new Server({
      "grpc.max_receive_message_length": GRPC_MESSAGE_LIMIT,
      "grpc.max_send_message_length": GRPC_MESSAGE_LIMIT,
      interceptors: options.token ? [tokenInterceptor(options.token)] : [],
    });
    this.server.addService(ExecutorPeerServiceService, {
      handoff: (
        call: ServerReadableStream<HandoffRequest, HandoffResponse>,
        callback: sendUnaryData<HandoffResponse>,
      ) => this.handoff(call, callback),
    });
  }

  /** Listens on HOST:PORT (port 0: any free one); resolves to the address it listens on. */
  listen(address: string): Promise<string> {
    return bindServer(this.server, address, serverCredentials(this.options.tls), "--peer-listen");
  }

  stop(): void {
    this.server.forceShutdown();
  }

  private handoff(
    call: ServerReadableStream<HandoffRequest, HandoffResponse>,
    callback: sendUnaryData<HandoffResponse>,
  ): void {
    let assembling: Assembling | undefined;
    let handoffs = 0;
    let failed = false;
    let jobId = "";
    call.on("data", (chunk: HandoffRequest) => {
      if (failed) return;
      jobId ||= chunk.jobId;
      try {
        const added = addMessage(assembling, chunk);
        assembling = added.assembling;
        if (added.complete) {
          handoffs++;
          this.options.sink(chunk.jobId, added.complete.step, added.complete.tensors);
        }
      } catch (error) {
        failed = true;
        const err = toStatusError(error, this.options.log);
        this.options.log(`ferry executor: refused a pipeline handoff: ${err.message}`);
        callback(err);
        if (jobId) this.options.refused?.(jobId, err.message);
      }
    });
    call.on("end", () => {
      if (!failed) callback(null, { handoffs });
    });
    call.on("error", () => {
      failed = true;
    });
  }
}

/**
 * A stage run's stream to the next stage: each handoff cut into chunks and written in order, with
 * the stream's flow control (chunks wait in memory while it is full). `onError` hears a broken
 * stream (the next executor went away, refused the token or the data).
 */
export class HandoffSender {
  private readonly stream: ClientWritableStream<HandoffRequest>;
  private readonly waiting: HandoffRequest[] = [];
  private blocked = false;
  private closed = false;
  private aborted = false;
  sentBytes = 0;

  constructor(
    address: string,
    private readonly jobId: string,
    credentials: ChannelCredentials,
    token: string | undefined,
    onError: (message: string) => void,
    /** With TLS: the name the peer's certificate must carry (else the address's host). */
    tlsName?: string,
  ) {
    const client = new ExecutorPeerServiceClient(address, credentials, {
      "grpc.max_receive_message_length": GRPC_MESSAGE_LIMIT,
      "grpc.max_send_message_length": GRPC_MESSAGE_LIMIT,
      ...(tlsName ? { "grpc.ssl_target_name_override": tlsName } : {}),
      interceptors: token ? [bearerInterceptor(token)] : [],
    });
    this.stream = client.handoff((error) => {
      client.close();
      if (error && !this.aborted) onError(`${address}: ${error.details || error.message}`);
    });
    this.stream.on("drain", () => this.flush());
  }

  /**
   * Queues the handoff that feeds `step` of the next stage: its tensors' bytes packed into
   * messages of at most HANDOFF_CHUNK_BYTES (a small handoff is one message).
   */
  send(step: number, tensors: HandoffTensors): void {
    if (this.closed) return;
    let pieces: TensorPiece[] = [];
    let size = 0;
    const flush = (last: boolean) => {
      this.write(HandoffRequest.fromPartial({ jobId: this.jobId, step, pieces, last }));
      pieces = [];
      size = 0;
    };
    for (const [name, tensor] of Object.entries(tensors)) {
      const bytes = Buffer.from(tensor.buffer, tensor.byteOffset, tensor.byteLength);
      let offset = 0;
      do {
        if (size === HANDOFF_CHUNK_BYTES) flush(false);
        const take = Math.min(bytes.length - offset, HANDOFF_CHUNK_BYTES - size);
        pieces.push({
          tensor: name,
          tensorBytes: bytes.length,
          offset,
          data: bytes.subarray(offset, offset + take),
        });
        size += take;
        offset += take;
      } while (offset < bytes.length);
      this.sentBytes += bytes.length;
    }
    flush(true);
  }

  /** Ends the stream once what is queued has gone. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (!this.blocked) this.stream.end();
  }

  /** Drops the stream at once (the run failed). */
  abort(): void {
    this.closed = true;
    this.aborted = true;
    this.waiting.length = 0;
    this.stream.cancel();
  }

  private write(request: HandoffRequest): void {
    if (this.blocked) {
      this.waiting.push(request);
      return;
    }
    this.blocked = !this.stream.write(request);
  }

  private flush(): void {
    this.blocked = false;
    while (this.waiting.length > 0 && !this.blocked) {
      this.blocked = !this.stream.write(this.waiting.shift()!);
    }
    if (this.closed && !this.blocked && this.waiting.length === 0) this.stream.end();
  }
}

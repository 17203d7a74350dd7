import type { ClientDuplexStream } from "@grpc/grpc-js";
import { ConnectRequest, type ConnectResponse } from "../../gen/ferry/v1/scheduler";

/**
 * What an executor sends the scheduler on one Connect stream, in order, without letting a fast
 * job bury its heartbeats. Messages go straight to the stream while it takes them; once its
 * buffer is full (write() returned false) they wait here until it drains, and a newer progress
 * event of a job replaces that job's older one still waiting, as a newer heartbeat replaces an
 * older one: both are snapshots. Starts, results and command replies are never dropped, and a
 * job's progress never moves behind its result.
 *
 * Without this, a job stepping faster than the scheduler reads (thousands of tiny steps) queued
 * every step's message in the channel; heartbeats waited behind them past the scheduler's
 * deadline, and the job was re-queued as if its executor had died.
 */
export class OutboundQueue {
  private readonly waiting: ConnectRequest[] = [];
  private blocked = false;
  /** Progress events and heartbeats replaced by newer ones while the stream was full. */
  coalesced = 0;

  constructor(private readonly stream: ClientDuplexStream<ConnectRequest, ConnectResponse>) {
    stream.on("drain", () => this.flush());
  }

  /** Messages waiting for the stream to drain. */
  get length(): number {
    return this.waiting.length;
  }

  send(message: ConnectRequest["message"]): void {
    const request = ConnectRequest.fromPartial({ message });
    if (!this.blocked) {
      this.blocked = !this.stream.write(request);
      return;
    }
    const at = this.waiting.findIndex((queued) => sameSnapshot(queued, request));
    if (at >= 0) {
      this.waiting[at] = request;
      this.coalesced++;
    } else {
      this.waiting.push(request);
    }
  }

  private flush(): void {
    this.blocked = false;
    while (this.waiting.length > 0 && !this.blocked) {
      this.blocked = !this.stream.write(this.waiting.shift()!);
    }
  }
}

/** Whether `b` supersedes the waiting `a`: a heartbeat, or progress of the same job. */
function sameSnapshot(a: ConnectRequest, b: ConnectRequest): boolean {
  const x = a.message;
  const y = b.message;
  if (x?.$case === "heartbeat" && y?.$case === "heartbeat") return true;
  if (x?.$case !== "jobUpdate" || y?.$case !== "jobUpdate") return false;
  const u = x.value.update;
  const v = y.value.update;
  return u?.$case === "progress" && v?.$case === "progress" && u.value.jobId === v.value.jobId;
}

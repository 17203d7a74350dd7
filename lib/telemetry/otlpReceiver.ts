import { createServer, type Server as HttpServer } from "node:http";
import { gunzipSync } from "node:zlib";
import { Server as GrpcServer, ServerCredentials, type ServiceDefinition } from "@grpc/grpc-js";
import type { TraceSpan } from "./traceReport";

/**
 * A minimal OTLP trace receiver — the collector's `ExportTraceServiceRequest` over gRPC
 * (`opentelemetry.proto.collector.trace.v1.TraceService/Export`) and over HTTP/protobuf
 * (`POST /v1/traces`) — decoding spans into the same shape as trace files. For tests and
 * benches that need to see what a real process exports, without a collector.
 */
export interface OtlpReceiver {
  /** `http://127.0.0.1:PORT`: the OTEL_EXPORTER_OTLP_ENDPOINT of the gRPC server. */
  grpcEndpoint: string;
  /** `http://127.0.0.1:PORT`: the OTEL_EXPORTER_OTLP_ENDPOINT of the HTTP server. */
  httpEndpoint: string;
  /** Every span received so far, in arrival order. */
  spans: TraceSpan[];
  /** Export requests received, per transport. */
  requests: { grpc: number; http: number };
  /** Resolves once `predicate(spans)` holds; rejects after `timeoutMs`. */
  waitFor(predicate: (spans: TraceSpan[]) => boolean, timeoutMs?: number): Promise<TraceSpan[]>;
  close(): Promise<void>;
}

// ---- protobuf wire format, just what ExportTraceServiceRequest needs ----

class Reader {
  pos = 0;
  constructor(private readonly buf: Buffer) {}
  get done(): boolean {
    return this.pos >= this.buf.length;
  }
  varint(): bigint {
    let result = 0n;
    let shift = 0n;
    for (;;) {
      if (this.pos >= this.buf.length) throw new Error("truncated varint");
      const byte = this.buf[this.pos++];
      result |= BigInt(byte & 0x7f) << shift;
      if (!(byte & 0x80)) return result;
      shift += 7n;
      if (shift > 70n) throw new Error("varint too long");
    }
  }
  bytes(): Buffer {
    const length = Number(this.varint());
    if (this.pos + length > this.buf.length) throw new Error("truncated field");
    const out = this.buf.subarray(this.pos, this.pos + length);
    this.pos += length;
    return out;
  }
  fixed64(): Buffer {
    if (this.pos + 8 > this.buf.length) throw new Error("truncated fixed64");
    const out = this.buf.subarray(this.pos, this.pos + 8);
    this.pos += 8;
    return out;
  }
  /** Each field as (number, wire type, value reader); unknown fields are skipped. */
  *fields(): Generator<{ field: number; wire: number }> {
    while (!this.done) {
      const key = Number(this.varint());
      yield { field: key >> 3, wire: key & 7 };
    }
  }
  skip(wire: number): void {
    if (wire === 0) this.varint();
    else if (wire === 1) this.pos += 8;
    else if (wire === 2) this.bytes();
    else if (wire === 5) this.pos += 4;
    else throw new Error(`unsupported wire type ${wire}`);
  }
}

type AttributeValue = string | number | boolean;

function decodeAnyValue(buf: Buffer): AttributeValue {
  const reader = new Reader(buf);
  let value: AttributeValue = "";
  for (const { field, wire } of reader.fields()) {
    if (field === 1 && wire === 2) value = reader.bytes().toString("utf8");
    else if (field === 2 && wire === 0) value = reader.varint() !== 0n;
    else if (field === 3 && wire === 0) value = Number(BigInt.asIntN(64, reader.varint()));
    else if (field === 4 && wire === 1) value = reader.fixed64().readDoubleLE(0);
    else reader.skip(wire);
  }
  return value;
}

function decodeKeyValue(buf: Buffer): [string, AttributeValue] {
  const reader = new Reader(buf);
  let key = "";
  let value: AttributeValue = "";
  for (const { field, wire } of reader.fields()) {
    if (field === 1 && wire === 2) key = reader.bytes().toString("utf8");
    else if (field === 2 && wire === 2) value = decodeAnyValue(reader.bytes());
    else reader.skip(wire);
  }
  return [key, value];
}

function decodeResource(buf: Buffer): Record<string, AttributeValue> {
  const reader = new Reader(buf);
  const attributes: Record<string, AttributeValue> = {};
  for (const { field, wire } of reader.fields()) {
    if (field === 1 && wire === 2) {
      const [key, value] = decodeKeyValue(reader.bytes());
      attributes[key] = value;
    } else reader.skip(wire);
  }
  return attributes;
}

function decodeSpan(buf: Buffer, resource: Record<string, AttributeValue>): TraceSpan {
  const reader = new Reader(buf);
  const span: TraceSpan = {
    traceId: "",
    spanId: "",
    parentSpanId: "",
    name: "",
    startNs: 0n,
    endNs: 0n,
    attributes: {},
    resource,
  };
  for (const { field, wire } of reader.fields()) {
    if (field === 1 && wire === 2) span.traceId = reader.bytes().toString("hex");
    else if (field === 2 && wire === 2) span.spanId = reader.bytes().toString("hex");
    else if (field === 4 && wire === 2) span.parentSpanId = reader.bytes().toString("hex");
    else if (field === 5 && wire === 2) span.name = reader.bytes().toString("utf8");
    else if (field === 7 && wire === 1) span.startNs = reader.fixed64().readBigUInt64LE(0);
    else if (field === 8 && wire === 1) span.endNs = reader.fixed64().readBigUInt64LE(0);
    else if (field === 9 && wire === 2) {
      const [key, value] = decodeKeyValue(reader.bytes());
      span.attributes[key] = value;
    } else reader.skip(wire);
  }
  return span;
}

/** The spans of a protobuf-encoded `ExportTraceServiceRequest`. */
export function decodeExportTraceRequest(buf: Buffer): TraceSpan[] {
  const spans: TraceSpan[] = [];
  const request = new Reader(buf);
  for (const { field, wire } of request.fields()) {
    if (field !== 1 || wire !== 2) {
      request.skip(wire);
      continue;
    }
    const resourceSpans = new Reader(request.bytes());
    let resource: Record<string, AttributeValue> = {};
    const scopes: Buffer[] = [];
    for (const { field: f, wire: w } of resourceSpans.fields()) {
      if (f === 1 && w === 2) resource = decodeResource(resourceSpans.bytes());
      else if (f === 2 && w === 2) scopes.push(resourceSpans.bytes());
      else resourceSpans.skip(w);
    }
    for (const scope of scopes) {
      const scopeSpans = new Reader(scope);
      for (const { field: f, wire: w } of scopeSpans.fields()) {
        if (f === 2 && w === 2) spans.push(decodeSpan(scopeSpans.bytes(), resource));
        else scopeSpans.skip(w);
      }
    }
  }
  return spans;
}

// ---- the two servers ----

const TRACE_SERVICE: ServiceDefinition = {
  Export: {
    path: "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    requestStream: false,
    responseStream: false,
    requestSerialize: (value: Buffer) => value,
    requestDeserialize: (bytes: Buffer) => bytes,
    // An empty ExportTraceServiceResponse: full success.
    responseSerialize: () => Buffer.alloc(0),
    responseDeserialize: (bytes: Buffer) => bytes,
  },
};

/**
 * Starts both receivers on loopback, on free ports.
 * @param decode decode spans (else only count requests: a bench that measures the exporters'
 *   CPU in this process should not count the receiver's decoding too). @default true
 */
export async function startOtlpReceiver(decode = true): Promise<OtlpReceiver> {
  const spans: TraceSpan[] = [];
  const requests = { grpc: 0, http: 0 };
  const waiters = new Set<() => void>();
  const received = (batch: TraceSpan[]) => {
    spans.push(...batch);
    for (const wake of waiters) wake();
  };

  const grpc = new GrpcServer();
  grpc.addService(TRACE_SERVICE, {
    Export: (
      call: { request: Buffer },
      callback: (error: Error | null, response?: Buffer) => void,
    ) => {
      try {
        requests.grpc++;
        if (decode) received(decodeExportTraceRequest(call.request));
        callback(null, Buffer.alloc(0));
      } catch (error) {
        callback(error as Error);
      }
    },
  });
  const grpcPort = await new Promise<number>((resolvePort, reject) =>
    grpc.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (error, port) =>
      error ? reject(error) : resolvePort(port),
    ),
  );

  const http: HttpServer = createServer((request, response) => {
    const chunks: Buffer[] = [];
    request.on("data", (chunk: Buffer) => chunks.push(chunk));
    request.on("end", () => {
      try {
        if (request.method !== "POST" || request.url !== "/v1/traces") {
          response.writeHead(404).end();
          return;
        }
        let body = Buffer.concat(chunks);
        if (request.headers["content-encoding"] === "gzip") body = gunzipSync(body);
        if (!String(request.headers["content-type"] ?? "").includes("protobuf")) {
          response.writeHead(415).end("send application/x-protobuf");
          return;
        }
        requests.http++;
        if (decode) received(decodeExportTraceRequest(body));
        response.writeHead(200, { "content-type": "application/x-protobuf" }).end();
      } catch (error) {
        response.writeHead(400).end(String(error));
      }
    });
  });
  const httpPort = await new Promise<number>((resolvePort, reject) => {
    http.once("error", reject);
    http.listen(0, "127.0.0.1", () => {
      const address = http.address();
      resolvePort(typeof address === "object" && address ? address.port : 0);
    });
  });

  return {
    grpcEndpoint: `http://127.0.0.1:${grpcPort}`,
    httpEndpoint: `http://127.0.0.1:${httpPort}`,
    spans,
    requests,
    waitFor(predicate, timeoutMs = 20_000) {
      return new Promise((resolveWait, reject) => {
        const check = () => {
          if (!predicate(spans)) return;
          clearTimeout(timer);
          waiters.delete(check);
          resolveWait(spans);
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          reject(
            new Error(
              `the OTLP receiver did not get the expected spans in ${timeoutMs} ms (has ${spans.length})`,
            ),
          );
        }, timeoutMs);
        waiters.add(check);
        check();
      });
    },
    async close() {
      await new Promise<void>((done) => {
        http.close(() => done());
        http.closeAllConnections();
      });
      // Exporters keep their channels open; nothing in flight is worth waiting for here.
      grpc.forceShutdown();
    },
  };
}

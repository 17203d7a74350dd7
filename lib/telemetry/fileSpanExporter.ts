import { appendFileSync } from "node:fs";
import { ExportResultCode, type ExportResult } from "@opentelemetry/core";
import { JsonTraceSerializer } from "@opentelemetry/otlp-transformer";
import type { ReadableSpan, SpanExporter } from "@opentelemetry/sdk-trace-base";

/**
 * Appends spans to a file as OTLP-JSON lines, the OpenTelemetry collector file exporter's
 * format: one `{"resourceSpans": …}` object per line, one line per export batch. Lets a machine
 * with no collector keep traces (`FERRY_TRACE_FILE=path`) and `ferry trace report` read them.
 * Appends are synchronous and line-sized, so two processes sharing one file interleave lines,
 * never bytes within a line (O_APPEND writes of one buffer).
 */
export class FileSpanExporter implements SpanExporter {
  private stopped = false;

  constructor(private readonly path: string) {}

  export(spans: ReadableSpan[], resultCallback: (result: ExportResult) => void): void {
    if (this.stopped || spans.length === 0) {
      resultCallback({ code: ExportResultCode.SUCCESS });
      return;
    }
    try {
      const body = JsonTraceSerializer.serializeRequest(spans);
      if (!body) throw new Error("the OTLP JSON serializer returned nothing");
      appendFileSync(this.path, Buffer.concat([Buffer.from(body), Buffer.from("\n")]));
      resultCallback({ code: ExportResultCode.SUCCESS });
    } catch (error) {
      resultCallback({ code: ExportResultCode.FAILED, error: error as Error });
    }
  }

  async shutdown(): Promise<void> {
    this.stopped = true;
  }

  async forceFlush(): Promise<void> {}
}

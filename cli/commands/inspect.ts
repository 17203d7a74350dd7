/**
 * `ferry inspect MODEL`: what a model file holds — format, metadata, every tensor (dtype, shape,
 * stored bytes, file offset) and the base segments Ferry would stream — from the header alone, so
 * a 50 GB model is inspected in milliseconds. `--json` prints the same for programs.
 */
import { Command } from "commander";
import { formatBytes } from "../../lib/config/units";
import { ggufValueToJson, summarizeGgufValue } from "../../lib/model/gguf";
import { groupTensors, type TensorGroup } from "../../lib/model/grouping";
import { readModelHeader, type ModelFormat, type ModelHeader } from "../../lib/model/modelFile";
import { describeFlux } from "../../lib/model/flux";

/** Where the command writes; tests pass sinks, the CLI the process streams. */
export interface InspectCommandIo {
  stdout(text: string): void;
  stderr(text: string): void;
  /** Records a failure's exit code. @default sets process.exitCode */
  setExitCode?(code: number): void;
}

const processIo: InspectCommandIo = {
  stdout: (text) => void process.stdout.write(text),
  stderr: (text) => void process.stderr.write(text),
  setExitCode: (code) => {
    process.exitCode = code;
  },
};

export interface InspectOptions {
  /** Print JSON instead of tables. @default false */
  json?: boolean;
  /** Regex whose first capture group names a tensor's segment. @default the built-in rules */
  segmentRegex?: string;
}

/** `ferry inspect --json` output. */
export interface InspectReport {
  format: ModelFormat;
  /** safetensors `__metadata__` (strings), or GGUF metadata as JSON values (arrays in full). */
  metadata: Record<string, unknown>;
  /** In data order. Shapes are row-major (GGUF: ne reversed); offsets absolute. */
  tensors: { name: string; dtype: string; shape: number[]; bytes: number; offset: number }[];
  segments: { name: string; tensors: number; bytes: number }[];
}

/** Reads a model's header and builds the report (no tensor data is read). */
export async function inspectModel(
  path: string,
  options: Pick<InspectOptions, "segmentRegex"> = {},
): Promise<{ header: ModelHeader; groups: TensorGroup[]; report: InspectReport }> {
  // Compile the regex before reading the file: a bad flag should not wait on a slow disk.
  const groupingOptions =
    options.segmentRegex === undefined ? {} : { segmentRegex: options.segmentRegex };
  groupTensors([], groupingOptions);
  const header = await readModelHeader(path);
  const groups = groupTensors(header.tensors, groupingOptions);
  const metadata: Record<string, unknown> = {};
  if (header.format === "gguf") {
    for (const [key, value] of header.gguf.metadata) metadata[key] = ggufValueToJson(value);
  } else {
    Object.assign(metadata, header.metadata);
  }
  const report: InspectReport = {
    format: header.format,
    metadata,
    tensors: header.tensors.map((t) => ({
      name: t.name,
      dtype: t.dtype,
      shape: t.shape,
      bytes: t.bytes,
      offset: t.begin,
    })),
    segments: groups.map((g) => ({ name: g.name, tensors: g.tensorNames.length, bytes: g.bytes })),
  };
  return { header, groups, report };
}

function table(rows: string[][], rightAligned: ReadonlySet<number>): string {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  return rows
    .map(
      (r) =>
        "  " +
        r
          .map((cell, c) =>
            rightAligned.has(c) ? cell.padStart(widths[c]!) : cell.padEnd(widths[c]!),
          )
          .join("  ")
          .trimEnd(),
    )
    .join("\n");
}

const count = (n: number): string => n.toLocaleString("en-US");

/** The human-readable report: summary line, metadata, tensor table, segment table. */
export function formatInspect(header: ModelHeader, groups: readonly TensorGroup[]): string {
  const lines: string[] = [];
  const total = header.tensors.reduce((s, t) => s + t.bytes, 0);
  const kind =
    header.format === "gguf"
      ? `GGUF v${header.gguf.version}, alignment ${header.gguf.alignment}`
      : "safetensors";
  lines.push(
    `${header.path}: ${kind}; ${count(header.tensors.length)} tensors, ` +
      `${formatBytes(total)} of weights in a ${formatBytes(header.fileBytes)} file; ` +
      `data starts at byte ${count(header.dataStart)}`,
  );
  if (header.ditConfig) {
    const c = header.ditConfig;
    lines.push(
      `Ferry DiT: ${c.blocks} blocks, hidden ${c.hidden}, ${c.heads} heads, ${c.channels} channels`,
    );
  }
  if (header.fluxModel) {
    const { config, prefix } = header.fluxModel;
    lines.push(`${describeFlux(config)}${prefix ? ` (tensors under ${prefix})` : ""}`);
  }
  const entries: [string, string][] =
    header.format === "gguf"
      ? [...header.gguf.metadata].map(([k, v]) => [k, `${v.type} ${summarizeGgufValue(v)}`])
      : Object.entries(header.metadata).map(([k, v]) => [k, JSON.stringify(v)]);
  lines.push("", `metadata (${entries.length}):`);
  if (entries.length === 0) lines.push("  (none)");
  const keyWidth = Math.max(0, ...entries.map(([k]) => k.length));
  for (const [k, v] of entries) lines.push(`  ${k.padEnd(keyWidth)}  ${v}`);

  lines.push(
    "",
    `tensors (${count(header.tensors.length)}; shapes row-major${header.format === "gguf" ? ", the reverse of GGUF's ne" : ""}):`,
  );
  if (header.tensors.length === 0) lines.push("  (none)");
  else {
    lines.push(
      table(
        [
          ["NAME", "DTYPE", "SHAPE", "BYTES", "OFFSET"],
          ...header.tensors.map((t) => [
            t.name,
            t.dtype,
            `[${t.shape.join(", ")}]`,
            count(t.bytes),
            count(t.begin),
          ]),
        ],
        new Set([3, 4]),
      ),
    );
  }
  lines.push("", `segments (${groups.length}):`);
  if (groups.length === 0) lines.push("  (none)");
  else {
    lines.push(
      table(
        [
          ["NAME", "TENSORS", "BYTES", ""],
          ...groups.map((g) => [
            g.name,
            String(g.tensorNames.length),
            count(g.bytes),
            formatBytes(g.bytes),
          ]),
        ],
        new Set([1, 2, 3]),
      ),
    );
  }
  return `${lines.join("\n")}\n`;
}

function isScalar(value: unknown): boolean {
  return value === null || typeof value !== "object";
}

function isFlatRecord(value: unknown): boolean {
  return (
    value !== null &&
    typeof value === "object" &&
    !Array.isArray(value) &&
    Object.values(value).every((v) => isScalar(v) || (Array.isArray(v) && v.every(isScalar)))
  );
}

/**
 * JSON indented like JSON.stringify(value, null, 2), except that arrays of scalars (shapes, a
 * 128k-token vocabulary) stay on one line instead of one line per item, and so do flat objects
 * inside arrays (one tensor per line).
 */
export function stringifyReport(value: unknown, indent = ""): string {
  if (Array.isArray(value)) {
    if (value.every(isScalar)) return JSON.stringify(value);
    const inner = indent + "  ";
    // A table row — an object of scalars and scalar arrays (a tensor, a segment) — on one line.
    const item = (v: unknown): string =>
      isFlatRecord(v)
        ? `{${Object.entries(v as Record<string, unknown>)
            .filter(([, x]) => x !== undefined)
            .map(([k, x]) => `${JSON.stringify(k)}: ${JSON.stringify(x)}`)
            .join(", ")}}`
        : stringifyReport(v, inner);
    return `[\n${value.map((v) => inner + item(v)).join(",\n")}\n${indent}]`;
  }
  if (value !== null && typeof value === "object") {
    const keys = Object.entries(value as Record<string, unknown>).filter(
      ([, v]) => v !== undefined,
    );
    if (keys.length === 0) return "{}";
    const inner = indent + "  ";
    return `{\n${keys
      .map(([k, v]) => `${inner}${JSON.stringify(k)}: ${stringifyReport(v, inner)}`)
      .join(",\n")}\n${indent}}`;
  }
  return JSON.stringify(value);
}

/** Adds `inspect` to a `ferry` program. */
export function register(program: Command, io: InspectCommandIo = processIo): void {
  const command = program
    .command("inspect")
    .description(
      "show a model file's metadata, tensors and base segments (GGUF or safetensors; header only)",
    )
    .argument("<model>", "model file (.gguf or .safetensors)")
    .option("--json", "print JSON: format, metadata, tensors, segments", false)
    .option(
      "--segment-regex <regex>",
      "group tensors into segments by this regex's first capture group instead of the " +
        "built-in rules (blocks.N, blk.N, layers.N, double/single_blocks.N, input/output_blocks.N…)",
    )
    .allowExcessArguments(false)
    .addHelpText(
      "after",
      [
        "",
        "Examples:",
        "  ferry inspect model.gguf",
        "  ferry inspect model.safetensors --json",
        "  ferry inspect sd.safetensors --segment-regex '^(model\\.diffusion_model\\.\\w+\\.\\d+)\\.'",
      ].join("\n"),
    )
    .action(async (modelPath: string, options: InspectOptions) => {
      // As cli/action.ts does for every command, with the io sinks tests use.
      try {
        const { header, groups, report } = await inspectModel(modelPath, options);
        io.stdout(options.json ? `${stringifyReport(report)}\n` : formatInspect(header, groups));
      } catch (error) {
        const err = error as Error;
        io.stderr(`ferry inspect: ${err?.message ?? String(error)}\n`);
        if (process.env.FERRY_DEBUG && err?.stack) io.stderr(`${err.stack}\n`);
        (io.setExitCode ?? processIo.setExitCode!)(1);
      }
    });
  command.configureOutput({
    outputError: (text, write) => write(text.replace(/^error: /, "ferry inspect: ")),
  });
}

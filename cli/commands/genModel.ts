import type { Command } from "commander";
import {
  GEN_MODEL_DEFAULTS,
  GEN_MODEL_FLOAT_DTYPES,
  GEN_MODEL_FORMATS,
  GEN_MODEL_QUANT_DTYPES,
  genModel,
  genModelSize,
  resolveGenModelOptions,
  type GenModelDtype,
  type GenModelFormat,
} from "../../lib/model/genModel";
import { genFluxModel, genFluxSize, resolveGenFluxOptions } from "../../lib/model/genFlux";
import { describeFlux } from "../../lib/model/flux";
import { action } from "../action";

interface GenModelFlags {
  out: string;
  arch: string;
  blocks?: string;
  hidden?: string;
  heads?: string;
  channels?: string;
  depth?: string;
  depthSingle?: string;
  guidance?: boolean;
  prefix?: boolean;
  dtype: string;
  format?: string;
  seed: string;
}

/** Models at least this large report progress on stderr; smaller ones finish too fast to need it. */
const PROGRESS_MIN_BYTES = 64 * 1024 * 1024;
const PROGRESS_INTERVAL_MS = 1000;

/** A flag's text as a positive integer; plain decimal only, so "1e3" or "12abc" are refused. */
function positiveInteger(flag: string, text: string): number {
  const value = /^[0-9]+$/.test(text) ? Number(text) : NaN;
  if (!Number.isSafeInteger(value) || value <= 0) {
    throw new RangeError(`${flag} must be a positive integer (got '${text}')`);
  }
  return value;
}

function seedFlag(text: string): bigint {
  if (!/^[0-9]+$/.test(text) || BigInt(text) >= 1n << 64n) {
    throw new RangeError(`--seed must be an integer in [0, 2^64) (got '${text}')`);
  }
  return BigInt(text);
}

/** 0 or more (FLUX's --depth-single). */
function nonNegativeInteger(flag: string, text: string): number {
  return text === "0" ? 0 : positiveInteger(flag, text);
}

/** Progress on stderr for a model of `dataBytes` (none for small ones). */
function progressReporter(dataBytes: number) {
  let lastReport = Date.now();
  return dataBytes >= PROGRESS_MIN_BYTES
    ? (written: number, total: number) => {
        const now = Date.now();
        if (written < total && now - lastReport < PROGRESS_INTERVAL_MS) return;
        lastReport = now;
        const percent = Math.floor((100 * written) / total);
        process.stderr.write(
          `ferry gen-model: ${percent}% (${humanBytes(written)} of ${humanBytes(total)})\n`,
        );
      }
    : undefined;
}

/** 1536 → "1.5 KiB". */
function humanBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(1)} ${units[unit]}`;
}

export function register(program: Command): void {
  program
    .command("gen-model")
    .description(
      "write a synthetic model with deterministic weights: Ferry's DiT, or a FLUX.1-shaped transformer in BFL's naming (safetensors or GGUF)",
    )
    .requiredOption("--out <path>", "output file, e.g. model.safetensors or model.gguf")
    .option("--arch <arch>", "dit (Ferry's DiT) or flux (FLUX.1's layout and names)", "dit")
    .option("--blocks <n>", `dit: transformer blocks (default ${GEN_MODEL_DEFAULTS.blocks})`)
    .option(
      "--hidden <d>",
      `hidden width (default ${GEN_MODEL_DEFAULTS.hidden}; flux: a multiple of 128)`,
    )
    .option(
      "--heads <h>",
      `dit: attention heads, must divide --hidden (default ${GEN_MODEL_DEFAULTS.heads})`,
    )
    .option("--channels <c>", `dit: latent channels (default ${GEN_MODEL_DEFAULTS.channels})`)
    .option("--depth <n>", "flux: double-stream blocks (default 2)")
    .option("--depth-single <n>", "flux: single-stream blocks (default 2)")
    .option("--guidance", "flux: FLUX.1-dev's guidance embedding (default: schnell's layout)")
    .option("--prefix", "flux: tensors under model.diffusion_model. (safetensors only)")
    .option(
      "--dtype <type>",
      `weight type: ${GEN_MODEL_FLOAT_DTYPES.join(", ")}, or (GGUF only) ` +
        `${GEN_MODEL_QUANT_DTYPES.join(", ")}, which quantize the weight matrices`,
      GEN_MODEL_DEFAULTS.dtype,
    )
    .option(
      "--format <format>",
      `file format: ${GEN_MODEL_FORMATS.join(", ")} (default: gguf for a .gguf file, else safetensors)`,
    )
    .option("--seed <s>", "weight seed, integer in [0, 2^64)", String(GEN_MODEL_DEFAULTS.seed))
    .action(
      action("gen-model", async (flags: GenModelFlags) => {
        if (flags.arch === "flux") return genFlux(flags);
        if (flags.arch !== "dit") {
          throw new RangeError(`--arch must be dit or flux (got ${flags.arch})`);
        }
        for (const flag of ["depth", "depthSingle", "guidance", "prefix"] as const) {
          if (flags[flag] !== undefined) {
            throw new RangeError(
              `--${flag === "depthSingle" ? "depth-single" : flag} is for --arch flux`,
            );
          }
        }
        const options = {
          blocks: positiveInteger("--blocks", flags.blocks ?? String(GEN_MODEL_DEFAULTS.blocks)),
          hidden: positiveInteger("--hidden", flags.hidden ?? String(GEN_MODEL_DEFAULTS.hidden)),
          heads: positiveInteger("--heads", flags.heads ?? String(GEN_MODEL_DEFAULTS.heads)),
          channels: positiveInteger(
            "--channels",
            flags.channels ?? String(GEN_MODEL_DEFAULTS.channels),
          ),
          dtype: flags.dtype as GenModelDtype,
          format: flags.format as GenModelFormat | undefined,
          seed: seedFlag(flags.seed),
        };
        // Validate every flag (and their combination) before touching the file system.
        const { config, dtype, format } = resolveGenModelOptions(options, flags.out);
        const { dataBytes } = genModelSize(config, dtype);
        const result = await genModel(flags.out, {
          ...options,
          onProgress: progressReporter(dataBytes),
        });
        process.stdout.write(
          `wrote ${result.path}: DiT ${config.blocks} blocks, hidden ${config.hidden}, ` +
            `${config.heads} heads, ${config.channels} channels, ${dtype}` +
            `${format === "gguf" ? " GGUF" : ""}; ` +
            `${result.params.toLocaleString("en-US")} params, ` +
            `${result.bytes.toLocaleString("en-US")} bytes (${humanBytes(result.bytes)})\n`,
        );
      }),
    );
}

async function genFlux(flags: GenModelFlags): Promise<void> {
  for (const flag of ["blocks", "heads", "channels"] as const) {
    if (flags[flag] !== undefined) throw new RangeError(`--${flag} is for --arch dit`);
  }
  const options = {
    hidden: flags.hidden === undefined ? undefined : positiveInteger("--hidden", flags.hidden),
    depth: flags.depth === undefined ? undefined : positiveInteger("--depth", flags.depth),
    depthSingle:
      flags.depthSingle === undefined
        ? undefined
        : nonNegativeInteger("--depth-single", flags.depthSingle),
    guidance: flags.guidance ?? false,
    prefix: flags.prefix ?? false,
    dtype: flags.dtype as GenModelDtype,
    format: flags.format as GenModelFormat | undefined,
    seed: seedFlag(flags.seed),
  };
  const { config, dtype, format, prefix } = resolveGenFluxOptions(options, flags.out);
  const { dataBytes } = genFluxSize(config, dtype);
  const result = await genFluxModel(flags.out, {
    ...options,
    onProgress: progressReporter(dataBytes),
  });
  process.stdout.write(
    `wrote ${result.path}: ${describeFlux(config)}, ${dtype}${format === "gguf" ? " GGUF" : ""}` +
      `${prefix ? ` under ${prefix}` : ""}; ${result.params.toLocaleString("en-US")} params, ` +
      `${result.bytes.toLocaleString("en-US")} bytes (${humanBytes(result.bytes)})\n`,
  );
}

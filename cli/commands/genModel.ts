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
import { action } from "../action";

interface GenModelFlags {
  out: string;
  blocks: string;
  hidden: string;
  heads: string;
  channels: string;
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
    .description("write a synthetic DiT model (safetensors or GGUF) with deterministic weights")
    .requiredOption("--out <path>", "output file, e.g. model.safetensors or model.gguf")
    .option("--blocks <n>", "transformer blocks", String(GEN_MODEL_DEFAULTS.blocks))
    .option("--hidden <d>", "hidden width", String(GEN_MODEL_DEFAULTS.hidden))
    .option(
      "--heads <h>",
      "attention heads (must divide --hidden)",
      String(GEN_MODEL_DEFAULTS.heads),
    )
    .option("--channels <c>", "latent channels", String(GEN_MODEL_DEFAULTS.channels))
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
        const options = {
          blocks: positiveInteger("--blocks", flags.blocks),
          hidden: positiveInteger("--hidden", flags.hidden),
          heads: positiveInteger("--heads", flags.heads),
          channels: positiveInteger("--channels", flags.channels),
          dtype: flags.dtype as GenModelDtype,
          format: flags.format as GenModelFormat | undefined,
          seed: seedFlag(flags.seed),
        };
        // Validate every flag (and their combination) before touching the file system.
        const { config, dtype, format } = resolveGenModelOptions(options, flags.out);
        const { dataBytes } = genModelSize(config, dtype);
        let lastReport = Date.now();
        const onProgress =
          dataBytes >= PROGRESS_MIN_BYTES
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
        const result = await genModel(flags.out, { ...options, onProgress });
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

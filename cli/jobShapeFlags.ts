/**
 * The job-shape flags `ferry run` and `ferry plan` share: `--batch`, `--tokens` (the DiT's T) or,
 * for FLUX.1, `--img-tokens L` or `--width/--height` in pixels (L = (H/16)·(W/16)), and
 * `--txt-tokens T`; and `--inputs DIR` for the job's input tensors as raw float32 files.
 */
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import type { Command } from "commander";
import type { InputTensor } from "../gen/ferry/v1/scheduler";
import { parseIntegerFlag } from "../lib/config/config";
import { FLUX_CONSTANTS, fluxImageTokens } from "../lib/model/flux";
import { MAX_INPUT_BYTES, MAX_TOKENS } from "../lib/wire/limits";

export interface JobShapeFlags {
  tokens?: string;
  imgTokens?: string;
  width?: string;
  height?: string;
  txtTokens?: string;
}

/** Adds --img-tokens, --width, --height and --txt-tokens (--tokens is the command's own). */
export function addFluxShapeOptions(command: Command): Command {
  return command
    .option("--img-tokens <n>", "FLUX: image tokens L per sample (same as --tokens)")
    .option("--width <px>", "FLUX: image width in pixels, a multiple of 16 (with --height)")
    .option("--height <px>", "FLUX: image height in pixels; L = (H/16)·(W/16)")
    .option("--txt-tokens <n>", "FLUX: text tokens T per sample (default 512)");
}

/**
 * Tokens per sample (the DiT's T, FLUX's L) and text tokens (0 = the model's default) from the
 * flags; `fallback` when none of --tokens, --img-tokens, --width/--height is given.
 */
export function resolveJobShape(
  flags: JobShapeFlags,
  fallback: number,
): { tokens: number; contextTokens: number } {
  const given = [
    flags.tokens !== undefined && "--tokens",
    flags.imgTokens !== undefined && "--img-tokens",
    (flags.width !== undefined || flags.height !== undefined) && "--width/--height",
  ].filter(Boolean);
  if (given.length > 1) throw new Error(`give one of ${given.join(", ")}, not several`);
  let tokens = fallback;
  if (flags.tokens !== undefined)
    tokens = parseIntegerFlag("--tokens", flags.tokens, 1, MAX_TOKENS);
  if (flags.imgTokens !== undefined) {
    tokens = parseIntegerFlag("--img-tokens", flags.imgTokens, 1, MAX_TOKENS);
  }
  if (flags.width !== undefined || flags.height !== undefined) {
    if (flags.width === undefined || flags.height === undefined) {
      throw new Error("--width and --height go together");
    }
    tokens = fluxImageTokens(
      parseIntegerFlag("--width", flags.width, 1, 1 << 20),
      parseIntegerFlag("--height", flags.height, 1, 1 << 20),
    );
    if (tokens > MAX_TOKENS) throw new Error(`--width × --height gives ${tokens} image tokens`);
  }
  const contextTokens =
    flags.txtTokens === undefined
      ? 0
      : parseIntegerFlag("--txt-tokens", flags.txtTokens, 1, MAX_TOKENS);
  return { tokens, contextTokens };
}

/**
 * Input files `--inputs DIR` may hold, and each one's row-major shape for a job of B samples, L
 * (or the DiT's T) tokens and T text tokens. The DiT's z [B, T, C] takes C from the file's size.
 */
const INPUT_FILES: Record<string, (b: number, l: number, t: number, values: number) => number[]> = {
  img: (b, l) => [b, l, FLUX_CONSTANTS.channels],
  txt: (b, _l, t) => [b, t || 512, FLUX_CONSTANTS.context],
  vec: (b) => [b, FLUX_CONSTANTS.vec],
  img_ids: (b, l) => [b, l, 3],
  z: (b, l, _t, values) => [b, l, Math.floor(values / Math.max(1, b * l))],
};

/**
 * The tensors in DIR (img.bin, txt.bin, vec.bin, img_ids.bin for FLUX.1; z.bin for the DiT): raw
 * little-endian float32, row-major. The scheduler checks them against the model and names any
 * that does not fit; absent ones are generated from the seed. Text tokens, when the job does not
 * say, are what txt.bin holds.
 */
export async function readInputDir(
  dir: string,
  job: { batch: number; tokens: number; contextTokens: number },
): Promise<{ inputs: InputTensor[]; contextTokens: number }> {
  const files = new Set(await readdir(dir));
  const out: InputTensor[] = [];
  let total = 0;
  let contextTokens = job.contextTokens;
  for (const [name, shapeOf] of Object.entries(INPUT_FILES)) {
    if (!files.has(`${name}.bin`)) continue;
    const data = await readFile(join(dir, `${name}.bin`));
    total += data.length;
    if (total > MAX_INPUT_BYTES) {
      throw new Error(`--inputs ${dir}: the inputs exceed ${MAX_INPUT_BYTES} bytes together`);
    }
    if (data.length % 4 !== 0) {
      throw new Error(`--inputs ${dir}: ${name}.bin is ${data.length} bytes, not whole float32s`);
    }
    // Without --txt-tokens, T is what txt.bin holds.
    const values = data.length / 4;
    if (name === "txt" && contextTokens === 0) {
      contextTokens = Math.max(1, Math.floor(values / (job.batch * FLUX_CONSTANTS.context)));
    }
    const shape = shapeOf(job.batch, job.tokens, contextTokens, values);
    out.push({ name, shape, data });
  }
  if (out.length === 0) {
    throw new Error(
      `--inputs ${dir}: none of ${Object.keys(INPUT_FILES)
        .map((n) => `${n}.bin`)
        .join(", ")} is there`,
    );
  }
  return { inputs: out, contextTokens };
}

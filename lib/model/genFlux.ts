/**
 * `ferry gen-model --arch flux`: a random FLUX.1-shaped transformer in the real naming — BFL's
 * tensor names and shapes (the native architecture's layout, lib/model/flux.ts), safetensors or
 * GGUF (`general.architecture = "flux"`, as the widely shared quantized files declare), optionally
 * under the `model.diffusion_model.` prefix of ComfyUI/sd.cpp checkpoints — so tests, the demo and
 * benchmarks run FLUX.1's code paths without a 24 GB download.
 *
 * Weights follow gen-model's rules (genModel.ts): per-tensor SplitMix64 streams keyed by seed and
 * name (the name without the prefix, so the prefixed and bare files of one seed hold the same
 * model); matrices u/√in, biases 0.02·u, QK norm scales 1 + 0.1·u; quantized types quantize
 * matrices whose rows are whole blocks (others f16), vectors stay f32.
 *
 * GGUF tensor names are at most 63 bytes in ggml: the prefixed names (up to 69) do not fit, and no
 * shared FLUX.1 GGUF carries the prefix, so the prefix is a safetensors option.
 */
import type { GgufValue } from "./gguf";
import { writeGguf, type GgufTensorToWrite } from "./ggufWriter";
import { FLUX_PREFIX, fluxLayout, GGUF_FLUX_ARCHITECTURE, type FluxConfig } from "./flux";
import {
  chunkBuffers,
  encodeAs,
  resolveFileOptions,
  genModelTensorType,
  isQuantDtype,
  SAFETENSORS_DTYPE,
  tensorChunks,
  type GenModelDtype,
  type GenModelFormat,
  tensorsSize,
} from "./genModel";
import { encodeFloats } from "./half";
import { writeSafetensors, type TensorToWrite } from "./safetensors";

export interface GenFluxOptions {
  /** Hidden size, a multiple of 128 (one head each). @default 256 */
  hidden?: number;
  /** Double-stream blocks. @default 2 */
  depth?: number;
  /** Single-stream blocks. @default 2 */
  depthSingle?: number;
  /** FLUX.1 [dev]: write guidance_in (else [schnell]). @default false */
  guidance?: boolean;
  /** Put the tensors under `model.diffusion_model.` (safetensors only). @default false */
  prefix?: boolean;
  /** Weight type, as gen-model's --dtype. @default "f32" */
  dtype?: GenModelDtype;
  /** @default "gguf" for a path ending in .gguf, else "safetensors" */
  format?: GenModelFormat;
  /** Weight seed, an integer in [0, 2^64). @default 0 */
  seed?: number | bigint;
  onProgress?: (written: number, total: number) => void;
}

export const GEN_FLUX_DEFAULTS = { hidden: 256, depth: 2, depthSingle: 2 } as const;

export interface GenFluxResult {
  path: string;
  config: FluxConfig;
  prefix: string;
  dtype: GenModelDtype;
  format: GenModelFormat;
  params: number;
  bytes: number;
}

/** Validates the options (RangeError phrased as CLI flags); `out` decides the format if unset. */
export function resolveGenFluxOptions(
  options: GenFluxOptions,
  out?: string,
): {
  config: FluxConfig;
  prefix: string;
  dtype: GenModelDtype;
  format: GenModelFormat;
  seed: bigint;
} {
  const config: FluxConfig = {
    hidden: options.hidden ?? GEN_FLUX_DEFAULTS.hidden,
    depth: options.depth ?? GEN_FLUX_DEFAULTS.depth,
    depthSingle: options.depthSingle ?? GEN_FLUX_DEFAULTS.depthSingle,
    guidance: options.guidance ?? false,
  };
  if (!Number.isSafeInteger(config.hidden) || config.hidden <= 0 || config.hidden % 128 !== 0) {
    throw new RangeError(
      `--hidden must be a positive multiple of 128 for FLUX (128-wide heads; got ${config.hidden})`,
    );
  }
  if (!Number.isSafeInteger(config.depth) || config.depth <= 0) {
    throw new RangeError(`--depth must be a positive integer (got ${config.depth})`);
  }
  if (!Number.isSafeInteger(config.depthSingle) || config.depthSingle < 0) {
    throw new RangeError(
      `--depth-single must be a non-negative integer (got ${config.depthSingle})`,
    );
  }
  const { dtype, format, seed } = resolveFileOptions(options, out);
  if (format === "gguf" && options.prefix) {
    throw new RangeError(
      `--prefix writes "${FLUX_PREFIX}…" names, longer than GGUF's 63 bytes: use safetensors`,
    );
  }
  return { config, prefix: options.prefix ? FLUX_PREFIX : "", dtype, format, seed };
}

/** Every tensor of the layout (names without the prefix), row-major shapes, in segment order. */
export function fluxTensorSpecs(config: FluxConfig): { name: string; shape: number[] }[] {
  return fluxLayout(config).segments.flatMap((s) =>
    s.weights.map(({ name, shape }) => ({ name, shape })),
  );
}

/** Parameter count and tensor bytes as stored, without generating anything. */
export function genFluxSize(
  config: FluxConfig,
  dtype: GenModelDtype,
): { params: number; dataBytes: number } {
  return tensorsSize(fluxTensorSpecs(config), dtype);
}

/** Writes a random FLUX.1-shaped transformer to `out` (atomically). Same options, same bytes. */
export async function genFluxModel(
  out: string,
  options: GenFluxOptions = {},
): Promise<GenFluxResult> {
  const { config, prefix, dtype, format, seed } = resolveGenFluxOptions(options, out);
  const specs = fluxTensorSpecs(config);
  const buffers = chunkBuffers();
  const { params } = genFluxSize(config, dtype);
  let bytes: number;
  if (format === "gguf") {
    const tensors: GgufTensorToWrite[] = specs.map((spec) => {
      const type = genModelTensorType(spec, dtype);
      const row = spec.shape[spec.shape.length - 1]!;
      return {
        name: spec.name,
        type,
        ne: spec.shape.slice().reverse(),
        data: () => {
          const { values, encoded } = buffers(spec);
          return tensorChunks(seed, spec, (v, o) => encodeAs(type, v, row, o), values, encoded);
        },
      };
    });
    const metadata = new Map<string, GgufValue>([
      ["general.architecture", { type: "string", value: GGUF_FLUX_ARCHITECTURE }],
      ["general.name", { type: "string", value: "ferry gen-model flux" }],
    ]);
    bytes = (await writeGguf(out, metadata, tensors, { onProgress: options.onProgress })).bytes;
  } else {
    if (isQuantDtype(dtype)) throw new RangeError(`--dtype ${dtype} needs GGUF`);
    const type = SAFETENSORS_DTYPE[dtype];
    const tensors: TensorToWrite[] = specs.map((spec) => ({
      name: prefix + spec.name,
      dtype: type,
      shape: spec.shape,
      data: () => {
        const { values, encoded } = buffers(spec);
        return tensorChunks(seed, spec, (v, o) => encodeFloats(v, type, o), values, encoded);
      },
    }));
    bytes = (await writeSafetensors(out, {}, tensors, { onProgress: options.onProgress })).bytes;
  }
  return { path: out, config, prefix, dtype, format, params, bytes };
}

/**
 * A model file reduced to what the planner needs — its base segments and their footprints — from
 * the file's header (read here, in TypeScript) and the architecture's real graphs (built and
 * measured by the native addon without weights: ggml_gallocr's compute buffers, the activations
 * each segment reads and writes, FLOPs counted from the graph). A model far larger than memory is
 * planned in milliseconds, with the compute buffers the executor will really allocate.
 */
import { basename } from "node:path";
import { loadAddon, mapNativeError } from "../native/addon";
import { ditSegmentNames, baseSegmentOf, type DitConfig } from "./dit";
import {
  checkFluxTensors,
  FLUX_DEFAULT_TXT_TOKENS,
  fluxNativeConfig,
  type FluxConfig,
  type FluxModel,
} from "./flux";
import {
  checkDitModelTensors,
  readModelHeader,
  requireModelArchitecture,
  type ModelHeader,
} from "./modelFile";
import type { BaseSegment, ModelProfile } from "./profile";

export interface ModelProfileOptions {
  /** Samples per step (B). */
  batch: number;
  /** Tokens per sample (the DiT's T; FLUX's image tokens L). */
  tokens: number;
  /** FLUX: text tokens T (0 or absent: 512). Ignored by the DiT. */
  contextTokens?: number;
}

/** Each base segment of an architecture measured by the addon for a job (param_bytes 0). */
async function archFootprints(
  arch: string,
  config: Record<string, number>,
  options: ModelProfileOptions,
): Promise<BaseSegment[]> {
  for (const [label, value] of [
    ["batch", options.batch],
    ["tokens", options.tokens],
    ["context tokens", options.contextTokens ?? 0],
  ] as const) {
    if (!Number.isSafeInteger(value) || value < (label === "context tokens" ? 0 : 1)) {
      throw new RangeError(`${label} must be a positive integer (got ${value})`);
    }
  }
  const measured = await loadAddon()
    .measureSegments(arch, config, {
      batch: options.batch,
      tokens: options.tokens,
      contextTokens: options.contextTokens ?? 0,
    })
    .catch((error: unknown) => {
      throw mapNativeError(error);
    });
  return measured.map((m) => ({
    name: m.name,
    param_bytes: 0,
    compute_buffer_bytes: m.computeBufferBytes,
    output_bytes: m.outputBytes,
    prev_cut_bytes: m.prevCutBytes,
    external_bytes: m.externalBytes,
    flops: m.flops,
  }));
}

/**
 * Footprints of a DiT's base segments for a job of `batch` × `tokens`, without a file: each base
 * segment's graph measured by the native addon (`param_bytes` is 0 — it depends on the stored
 * types).
 */
export async function ditFootprints(
  config: DitConfig,
  options: ModelProfileOptions,
): Promise<BaseSegment[]> {
  return archFootprints(
    "ferry-dit",
    { ...config },
    { batch: options.batch, tokens: options.tokens },
  );
}

/**
 * Footprints of a FLUX.1 transformer's base segments for a job of `batch` samples, `tokens` image
 * tokens and `contextTokens` text tokens (default 512), measured by the addon (param_bytes 0).
 */
export async function fluxFootprints(
  config: FluxConfig,
  options: ModelProfileOptions,
): Promise<BaseSegment[]> {
  return archFootprints("flux", fluxNativeConfig(config), {
    ...options,
    contextTokens: options.contextTokens || FLUX_DEFAULT_TXT_TOKENS,
  });
}

/**
 * Base segments of a model file (GGUF or safetensors; a Ferry DiT or a FLUX.1 transformer) for a
 * job of `batch` × `tokens` (FLUX: image tokens, plus `contextTokens` text tokens): param_bytes
 * are the tensors' bytes as stored (ggml_nbytes, quantized bytes for quantized types); the rest
 * is measured on the segments' graphs. The header's tensors must be exactly the layout of its
 * architecture, else a ModelFormatError naming the tensor.
 */
export async function modelProfileFromFile(
  path: string,
  options: ModelProfileOptions,
): Promise<ModelProfile> {
  return modelProfileFromHeader(await readModelHeader(path), options);
}

/** {@link modelProfileFromFile} from a header already read (the scheduler caches headers). */
export async function modelProfileFromHeader(
  header: ModelHeader,
  options: ModelProfileOptions,
): Promise<ModelProfile> {
  const path = header.path;
  const architecture = requireModelArchitecture(header);
  if (architecture.arch === "flux") return fluxProfile(header, architecture.flux, options);
  const config = architecture.config;
  const tensors = checkDitModelTensors(header, config);
  const paramBytes = new Map<string, number>();
  for (const t of tensors) {
    const segment = baseSegmentOf(t.name)!; // checkDitTensors admits only layout names
    paramBytes.set(segment, (paramBytes.get(segment) ?? 0) + t.bytes);
  }
  const footprints = await ditFootprints(config, options);
  const names = ditSegmentNames(config);
  if (footprints.map((s) => s.name).join() !== names.join()) {
    throw new Error(`${path}: the native architecture's segments differ from the file layout's`);
  }
  const segments = footprints.map((s) => ({ ...s, param_bytes: paramBytes.get(s.name) ?? 0 }));
  return { name: basename(path), segments };
}

async function fluxProfile(
  header: ModelHeader,
  flux: FluxModel,
  options: ModelProfileOptions,
): Promise<ModelProfile> {
  const bound = checkFluxTensors(header, flux);
  const footprints = await fluxFootprints(flux.config, options);
  const segments = footprints.map((s, i) => ({
    ...s,
    param_bytes: bound[i]!.tensors.reduce((sum, t) => sum + t.bytes, 0),
  }));
  return { name: basename(header.path), segments };
}

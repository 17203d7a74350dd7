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
  checkDitModelTensors,
  readModelHeader,
  requireDitConfig,
  type ModelHeader,
} from "./modelFile";
import type { BaseSegment, ModelProfile } from "./profile";

export interface ModelProfileOptions {
  /** Samples per step (B). */
  batch: number;
  /** Tokens per sample (T). */
  tokens: number;
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
  for (const [label, value] of [
    ["batch", options.batch],
    ["tokens", options.tokens],
  ] as const) {
    if (!Number.isSafeInteger(value) || value <= 0) {
      throw new RangeError(`${label} must be a positive integer (got ${value})`);
    }
  }
  const measured = await loadAddon()
    .measureSegments("ferry-dit", { ...config }, { batch: options.batch, tokens: options.tokens })
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
 * Base segments (prelude, blocks.0 …, final) of a DiT file (GGUF or safetensors) for a job of
 * `batch` × `tokens`: param_bytes are the tensors' bytes as stored (ggml_nbytes, quantized bytes
 * for quantized types); the rest is measured on the segments' graphs (ditFootprints). The header's
 * tensors must be exactly the DiT layout its metadata declares, else a ModelFormatError naming
 * the tensor.
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
  const config = requireDitConfig(header);
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

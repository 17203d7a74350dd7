/**
 * A DiT model file reduced to what the planner needs — its base segments and their footprints —
 * from the file's header alone (GGUF or safetensors), so a model far larger than memory is
 * planned in milliseconds.
 */
import { basename } from "node:path";
import { ditSegmentNames, baseSegmentOf } from "./dit";
import { segmentFootprint } from "./footprint";
import {
  checkDitModelTensors,
  readModelHeader,
  requireDitConfig,
  type ModelHeader,
} from "./modelFile";
import type { BaseSegment, ModelProfile } from "./profile";

export { segmentFootprint, type DitFootprint, type SegmentFootprint } from "./footprint";

export interface ModelProfileOptions {
  /** Samples per step (B). */
  batch: number;
  /** Tokens per sample (T). */
  tokens: number;
}

/**
 * Base segments (prelude, blocks.0 …, final) of a DiT file (GGUF or safetensors) for a job of
 * `batch` × `tokens`: param_bytes are the tensors' bytes as stored (quantized bytes for q8_0 /
 * q4_0, ggml_nbytes); the rest is segmentFootprint. The header's tensors must be exactly the DiT
 * layout its metadata declares, else a ModelFormatError naming the tensor.
 */
export async function modelProfileFromFile(
  path: string,
  options: ModelProfileOptions,
): Promise<ModelProfile> {
  return modelProfileFromHeader(await readModelHeader(path), options);
}

/** {@link modelProfileFromFile} from a header already read (the scheduler caches headers). */
export function modelProfileFromHeader(
  header: ModelHeader,
  options: ModelProfileOptions,
): ModelProfile {
  const path = header.path;
  const config = requireDitConfig(header);
  const tensors = checkDitModelTensors(header, config);
  const footprint = segmentFootprint(config, options.batch, options.tokens);
  const paramBytes = new Map<string, number>();
  for (const t of tensors) {
    const segment = baseSegmentOf(t.name)!; // checkDitTensors admits only layout names
    paramBytes.set(segment, (paramBytes.get(segment) ?? 0) + t.bytes);
  }
  const segments: BaseSegment[] = ditSegmentNames(config).map((name) => {
    const shape =
      name === "prelude" ? footprint.prelude : name === "final" ? footprint.final : footprint.block;
    return { name, param_bytes: paramBytes.get(name) ?? 0, ...shape };
  });
  return { name: basename(path), segments };
}

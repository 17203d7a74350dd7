/**
 * The tensors a job may bring with its request — FLUX.1's img, txt, vec and img_ids, the DiT's z
 * — and their checks. Which inputs a model takes, and their shapes for a job, are the native
 * architecture's (its activations of role input or latent, from the addon's describeArch); the
 * guidance scale is an option, not a tensor. Every input sent must be one of them, with exactly
 * that shape and 4 bytes per value, finite; absent ones are generated from the seed natively.
 */
import { InvalidArgumentError, loadAddon, mapNativeError } from "../native/addon";
import type { NativeJobShape } from "../native/AddonTypes";
import { MAX_INPUT_BYTES } from "../wire/limits";
import { FLUX_DEFAULT_TXT_TOKENS, fluxNativeConfig } from "./flux";
import { requireModelArchitecture, type ModelHeader } from "./modelFile";

/** A float32 tensor of a request: raw little-endian values, row-major. */
export interface JobInputTensor {
  name: string;
  shape: number[];
  data: Uint8Array;
}

/** An input a model takes: its name, row-major shape and what it is. */
export interface JobInputSpec {
  name: string;
  shape: number[];
  /** "input" (set once) or "latent" (the sampler's, and the job's result). */
  role: "input" | "latent";
}

/** FLUX's text tokens when the job does not say (0). */
export function resolvedContextTokens(header: ModelHeader, contextTokens: number): number {
  return requireModelArchitecture(header).arch === "flux"
    ? contextTokens || FLUX_DEFAULT_TXT_TOKENS
    : 0;
}

/**
 * The inputs a job of `job`'s shape on this model takes, in the architecture's order.
 * InvalidArgumentError for a job the architecture refuses; ModelFormatError for a file that is
 * no known architecture.
 */
export function jobInputSpecs(header: ModelHeader, job: NativeJobShape): JobInputSpec[] {
  const architecture = requireModelArchitecture(header);
  const [arch, config] =
    architecture.arch === "flux"
      ? ["flux", fluxNativeConfig(architecture.flux.config)]
      : ["ferry-dit", { ...architecture.config }];
  let layout;
  try {
    layout = loadAddon().describeArch(arch, config, {
      batch: job.batch,
      tokens: job.tokens,
      contextTokens: job.contextTokens ?? 0,
    });
  } catch (error) {
    throw mapNativeError(error);
  }
  return (layout.activations ?? [])
    .filter((a) => (a.role === "input" || a.role === "latent") && a.name !== "guidance")
    .map((a) => ({ name: a.name, shape: a.shape, role: a.role as "input" | "latent" }));
}

/** Bytes of every input together; InvalidArgumentError over MAX_INPUT_BYTES. */
export function checkInputBytes(inputs: readonly JobInputTensor[]): number {
  const total = inputs.reduce((sum, t) => sum + t.data.length, 0);
  if (total > MAX_INPUT_BYTES) {
    throw new InvalidArgumentError(
      `the request's inputs hold ${total} bytes; at most ${MAX_INPUT_BYTES} (leave large inputs out to generate them from the seed)`,
    );
  }
  return total;
}

/**
 * The request's inputs as float32 arrays by name, checked against `specs`: known names, each once,
 * the expected shape, 4 bytes per value, finite values. InvalidArgumentError naming the tensor.
 */
export function checkJobInputs(
  specs: readonly JobInputSpec[],
  inputs: readonly JobInputTensor[],
): Map<string, Float32Array> {
  checkInputBytes(inputs);
  const byName = new Map(specs.map((s) => [s.name, s]));
  const out = new Map<string, Float32Array>();
  for (const input of inputs) {
    const name = JSON.stringify(input.name.slice(0, 80));
    const spec = byName.get(input.name);
    if (!spec) {
      throw new InvalidArgumentError(
        `input ${name} is not one this model takes (${specs.map((s) => s.name).join(", ")})`,
      );
    }
    if (out.has(input.name)) throw new InvalidArgumentError(`input ${name} is given twice`);
    const shape = input.shape.map(Number);
    if (shape.length !== spec.shape.length || shape.some((d, i) => d !== spec.shape[i])) {
      throw new InvalidArgumentError(
        `input ${name} has shape [${shape.join(", ")}], expected [${spec.shape.join(", ")}] for this job`,
      );
    }
    const count = spec.shape.reduce((a, b) => a * b, 1);
    if (input.data.length !== count * 4) {
      throw new InvalidArgumentError(
        `input ${name} holds ${input.data.length} bytes, expected ${count * 4} (float32 [${spec.shape.join(", ")}])`,
      );
    }
    // A copy: aligned, and independent of the request's buffer.
    const values = new Float32Array(count);
    new Uint8Array(values.buffer).set(input.data);
    const bad = values.findIndex((v) => !Number.isFinite(v));
    if (bad >= 0) {
      throw new InvalidArgumentError(`input ${name} holds a non-finite value at index ${bad}`);
    }
    out.set(input.name, values);
  }
  return out;
}

/** Shared by the model tests: writes DiT files with hand-chosen weights. */
import { ditMetadata, ditTensorSpecs, type DitConfig } from "../lib/model/dit";
import { encodeFloats, type FloatDtype } from "../lib/model/half";
import { writeSafetensors } from "../lib/model/safetensors";

/**
 * Writes a DiT file whose tensors are all zeros except those in `values` (by name, row-major).
 * `dtypes` overrides the dtype of individual tensors.
 */
export async function writeDit(
  path: string,
  config: DitConfig,
  values: Record<string, ArrayLike<number>>,
  dtype: FloatDtype = "F32",
  dtypes: Record<string, FloatDtype> = {},
): Promise<void> {
  const specs = ditTensorSpecs(config);
  for (const name of Object.keys(values)) {
    if (!specs.some((s) => s.name === name)) throw new Error(`writeDit: no tensor ${name}`);
  }
  await writeSafetensors(
    path,
    ditMetadata(config),
    specs.map((spec) => {
      const count = spec.shape.reduce((a, b) => a * b, 1);
      const data = new Float32Array(count);
      const given = values[spec.name];
      if (given) {
        if (given.length !== count) throw new Error(`writeDit: ${spec.name} needs ${count} values`);
        data.set(Array.from(given));
      }
      const type = dtypes[spec.name] ?? dtype;
      return { name: spec.name, dtype: type, shape: spec.shape, data: encodeFloats(data, type) };
    }),
  );
}

/** Row-major identity matrix n×n. */
export function identity(n: number): number[] {
  return Array.from({ length: n * n }, (_, i) => (Math.floor(i / n) === i % n ? 1 : 0));
}

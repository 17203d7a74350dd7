/**
 * Every ggml tensor element type, as ggml defines it: the numeric id stored in GGUF tensor infos,
 * ggml's own name (`ggml_type_name`), the block size (elements per quantization block) and the
 * type size (bytes per block). Sizes are what planning needs: a segment's `param_bytes` is the sum
 * of its tensors' `ggml_nbytes`, so a q4_K model is planned with its real, quantized bytes.
 *
 * Source (ggml-org/llama.cpp, 2026):
 *   - ids: ggml/include/ggml.h `enum ggml_type`;
 *   - names and block sizes: ggml/src/ggml.c `type_traits[GGML_TYPE_COUNT]` (`.type_name`,
 *     `.blck_size` — QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0 = QK8_1 = QK4_NL = QK_MXFP4 = 32,
 *     QK_NVFP4 = QK2_0 = 64, QK1_0 = 128, QK_K = 256);
 *   - type sizes: `.type_size = sizeof(block_*)`, the block structs of ggml/src/ggml-common.h
 *     (each checked there by a static_assert; the sum is spelled out next to each entry below).
 * Ids 4, 5 (Q4_2, Q4_3), 31–33 (Q4_0_4_4, Q4_0_4_8, Q4_0_8_8) and 36–38 (IQ4_NL_4_4 …) were
 * removed from ggml; files using them are rejected as unknown types, as ggml does.
 */
import { ModelFormatError } from "./safetensors";

/** ggml's traits of one element type. */
export interface GgmlTypeTraits {
  /** `enum ggml_type` value, as stored in GGUF tensor infos. */
  readonly id: number;
  /** `ggml_type_name`: "f32", "q8_0", "q4_K", "iq2_xxs", … */
  readonly name: GgmlTypeName;
  /** Elements per block (`blck_size`); 1 for plain element types. */
  readonly blockSize: number;
  /** Bytes per block (`type_size`). */
  readonly typeSize: number;
  /** `is_quantized` in ggml. */
  readonly quantized: boolean;
}

/** ggml's type names, in id order. */
export const GGML_TYPE_NAMES = [
  "f32",
  "f16",
  "q4_0",
  "q4_1",
  "q5_0",
  "q5_1",
  "q8_0",
  "q8_1",
  "q2_K",
  "q3_K",
  "q4_K",
  "q5_K",
  "q6_K",
  "q8_K",
  "iq2_xxs",
  "iq2_xs",
  "iq3_xxs",
  "iq1_s",
  "iq4_nl",
  "iq3_s",
  "iq2_s",
  "iq4_xs",
  "i8",
  "i16",
  "i32",
  "i64",
  "f64",
  "iq1_m",
  "bf16",
  "tq1_0",
  "tq2_0",
  "mxfp4",
  "nvfp4",
  "q1_0",
  "q2_0",
] as const;

export type GgmlTypeName = (typeof GGML_TYPE_NAMES)[number];

const QK_K = 256;

function t(
  id: number,
  name: GgmlTypeName,
  blockSize: number,
  typeSize: number,
  quantized: boolean,
): GgmlTypeTraits {
  return Object.freeze({ id, name, blockSize, typeSize, quantized });
}

/** Every ggml type, in id order. */
export const GGML_TYPES: readonly GgmlTypeTraits[] = Object.freeze([
  t(0, "f32", 1, 4, false), // float
  t(1, "f16", 1, 2, false), // ggml_fp16_t
  t(2, "q4_0", 32, 18, true), // d:f16 + qs[16]
  t(3, "q4_1", 32, 20, true), // d,m:f16 + qs[16]
  t(6, "q5_0", 32, 22, true), // d:f16 + qh[4] + qs[16]
  t(7, "q5_1", 32, 24, true), // d,m:f16 + qh[4] + qs[16]
  t(8, "q8_0", 32, 34, true), // d:f16 + qs[32]
  t(9, "q8_1", 32, 36, true), // d,s:f16 + qs[32]
  t(10, "q2_K", QK_K, 84, true), // scales[16] + qs[64] + d,dmin:f16
  t(11, "q3_K", QK_K, 110, true), // hmask[32] + qs[64] + scales[12] + d:f16
  t(12, "q4_K", QK_K, 144, true), // d,dmin:f16 + scales[12] + qs[128]
  t(13, "q5_K", QK_K, 176, true), // d,dmin:f16 + scales[12] + qh[32] + qs[128]
  t(14, "q6_K", QK_K, 210, true), // ql[128] + qh[64] + scales[16] + d:f16
  t(15, "q8_K", QK_K, 292, true), // d:f32 + qs[256] + bsums:i16[16]
  t(16, "iq2_xxs", QK_K, 66, true), // d:f16 + qs:u16[32]
  t(17, "iq2_xs", QK_K, 74, true), // d:f16 + qs:u16[32] + scales[8]
  t(18, "iq3_xxs", QK_K, 98, true), // d:f16 + qs[96]
  t(19, "iq1_s", QK_K, 50, true), // d:f16 + qs[32] + qh:u16[8]
  t(20, "iq4_nl", 32, 18, true), // d:f16 + qs[16]
  t(21, "iq3_s", QK_K, 110, true), // d:f16 + qs[64] + qh[8] + signs[32] + scales[4]
  t(22, "iq2_s", QK_K, 82, true), // d:f16 + qs[64] + qh[8] + scales[8]
  t(23, "iq4_xs", QK_K, 136, true), // d:f16 + scales_h:u16 + scales_l[4] + qs[128]
  t(24, "i8", 1, 1, false),
  t(25, "i16", 1, 2, false),
  t(26, "i32", 1, 4, false),
  t(27, "i64", 1, 8, false),
  t(28, "f64", 1, 8, false),
  t(29, "iq1_m", QK_K, 56, true), // qs[32] + qh[16] + scales[8]
  t(30, "bf16", 1, 2, false), // ggml_bf16_t
  t(34, "tq1_0", QK_K, 54, true), // qs[48] + qh[4] + d:f16
  t(35, "tq2_0", QK_K, 66, true), // qs[64] + d:f16
  t(39, "mxfp4", 32, 17, true), // e:E8M0 + qs[16]
  t(40, "nvfp4", 64, 36, true), // d:UE4M3[4] + qs[32]
  t(41, "q1_0", 128, 18, true), // d:f16 + qs[16]
  t(42, "q2_0", 64, 18, true), // d:f16 + qs[16]
]);

/** Ids ggml once used and has removed, with their old names, for a precise error. */
export const GGML_REMOVED_TYPE_IDS: ReadonlyMap<number, string> = new Map([
  [4, "Q4_2"],
  [5, "Q4_3"],
  [31, "Q4_0_4_4"],
  [32, "Q4_0_4_8"],
  [33, "Q4_0_8_8"],
  [36, "IQ4_NL_4_4"],
  [37, "IQ4_NL_4_8"],
  [38, "IQ4_NL_8_8"],
]);

const BY_ID = new Map(GGML_TYPES.map((traits) => [traits.id, traits]));
// Case-insensitive: ggml spells "q4_K", gguf-py and llama.cpp's CLI "Q4_K", users anything.
const BY_NAME = new Map(GGML_TYPES.map((traits) => [traits.name.toLowerCase(), traits]));

/** The traits of type id `id`, or undefined for an id ggml does not define (or has removed). */
export function ggmlTypeById(id: number): GgmlTypeTraits | undefined {
  return BY_ID.get(id);
}

/** The traits of a type by name, case-insensitively ("Q8_0", "q8_0"), or undefined. */
export function ggmlTypeByName(name: string): GgmlTypeTraits | undefined {
  return BY_NAME.get(name.toLowerCase());
}

/** True when `name` is a ggml type name (case-insensitive). */
export function isGgmlTypeName(name: string): boolean {
  return BY_NAME.has(name.toLowerCase());
}

/** The traits of a type given by name or id; a RangeError naming the known types otherwise. */
export function ggmlType(type: GgmlTypeName | string | number | GgmlTypeTraits): GgmlTypeTraits {
  if (typeof type === "object") return type;
  const traits = typeof type === "number" ? ggmlTypeById(type) : ggmlTypeByName(type);
  if (traits) return traits;
  if (typeof type === "number" && GGML_REMOVED_TYPE_IDS.has(type)) {
    throw new RangeError(
      `ggml type ${type} (${GGML_REMOVED_TYPE_IDS.get(type)}) has been removed from ggml`,
    );
  }
  throw new RangeError(
    `unknown ggml type ${JSON.stringify(type)} (known: ${GGML_TYPE_NAMES.join(", ")})`,
  );
}

/** Bytes of one row of `ne0` elements (`ggml_row_size`); ne0 must be a whole number of blocks. */
export function ggmlRowSize(type: GgmlTypeName | string | number | GgmlTypeTraits, ne0: number) {
  return ggmlNbytes(type, [ne0]);
}

/**
 * Bytes of a contiguous tensor of shape `ne` (ggml order: ne[0] innermost), as `ggml_nbytes`
 * computes them: (ne0 / blck_size) · type_size · ne1 · ne2 · ne3, and 0 when any dimension is 0.
 * ne0 must be a multiple of the block size — a quantized row is whole blocks — else a
 * ModelFormatError; a size past 2^53 is a ModelFormatError too (no real file holds it, and a
 * corrupt shape must not turn into an imprecise number).
 */
export function ggmlNbytes(
  type: GgmlTypeName | string | number | GgmlTypeTraits,
  ne: readonly number[],
): number {
  const traits = ggmlType(type);
  if (ne.length === 0) {
    throw new ModelFormatError(`ggml ${traits.name}: a tensor needs at least one dimension`);
  }
  for (const d of ne) {
    if (!Number.isSafeInteger(d) || d < 0) {
      throw new ModelFormatError(
        `ggml ${traits.name}: dimension ${d} of [${ne.join(", ")}] is not a non-negative integer`,
      );
    }
  }
  const ne0 = ne[0]!;
  if (ne0 % traits.blockSize !== 0) {
    throw new ModelFormatError(
      `ggml ${traits.name}: ne0 = ${ne0} is not a multiple of the block size ${traits.blockSize} (shape [${ne.join(", ")}], ggml order)`,
    );
  }
  // BigInt: the product of four corrupt dimensions overflows 2^53 long before it overflows this.
  let bytes = BigInt(ne0 / traits.blockSize) * BigInt(traits.typeSize);
  for (let i = 1; i < ne.length; i++) bytes *= BigInt(ne[i]!);
  if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new ModelFormatError(
      `ggml ${traits.name}: shape [${ne.join(", ")}] needs ${bytes} bytes, more than any file can hold`,
    );
  }
  return Number(bytes);
}

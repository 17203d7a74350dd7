/**
 * Base segments from tensor names alone (header-only), for any model layout: one segment per
 * block of the network, plus a `prelude` and a `final` segment for everything else — the unit
 * stable-diffusion.cpp streams and the planner merges.
 *
 * Built-in rules (a name may carry any dotted prefix, e.g. "model.diffusion_model.", which stays
 * part of the segment name, so sub-models never mix):
 *   - Ferry DiT:        blocks.N.
 *   - Flux (BFL):       double_blocks.N. then single_blocks.N.
 *   - Flux (diffusers): transformer_blocks.N. then single_transformer_blocks.N.
 *   - SD UNet:          input_blocks.N., then middle_block., then output_blocks.N.
 *   - llama.cpp GGUF:   blk.N.        - Hugging Face transformers: layers.N.
 * Within one prefix, segments run in the order above, N ascending numerically (not the file's
 * order, which is often alphabetical: "10" < "2"); different prefixes keep the order in which
 * they first appear in the file. A tensor matching no rule belongs to `prelude` when it comes
 * before the first block tensor in file order, else to `final`.
 *
 * A user regex replaces the rules: its first capture group names the segment; tensors it does not
 * match go to prelude/final by position as above; segments are ordered by name, numbers compared
 * numerically ("layers.2" before "layers.10").
 */

/** A tensor as grouping sees it: its name and stored bytes. */
export interface GroupableTensor {
  name: string;
  bytes: number;
}

/** One base segment: its tensors (in file order) and their total stored bytes. */
export interface TensorGroup {
  name: string;
  tensorNames: string[];
  bytes: number;
}

export interface GroupingOptions {
  /**
   * Regex (or its source text) whose first capture group names a tensor's segment; replaces the
   * built-in rules. @default the built-in rules
   */
  segmentRegex?: RegExp | string;
}

export const PRELUDE_SEGMENT = "prelude";
export const FINAL_SEGMENT = "final";

interface BlockKind {
  /** Kinds of one architecture share a family; `rank` orders them within it. */
  family: string;
  rank: number;
  /** Followed by a block number ("blocks.3.") or not ("middle_block."). */
  indexed: boolean;
}

/**
 * Name components that start a block. Matching whole components keeps "double_blocks" from
 * matching "blocks", and "single_transformer_blocks" from matching "transformer_blocks".
 */
const BLOCK_KINDS: ReadonlyMap<string, BlockKind> = new Map([
  ["double_blocks", { family: "flux", rank: 0, indexed: true }],
  ["single_blocks", { family: "flux", rank: 1, indexed: true }],
  ["transformer_blocks", { family: "flux-diffusers", rank: 0, indexed: true }],
  ["single_transformer_blocks", { family: "flux-diffusers", rank: 1, indexed: true }],
  ["input_blocks", { family: "unet", rank: 0, indexed: true }],
  ["middle_block", { family: "unet", rank: 1, indexed: false }],
  ["output_blocks", { family: "unet", rank: 2, indexed: true }],
  ["blocks", { family: "dit", rank: 0, indexed: true }],
  ["blk", { family: "gguf", rank: 0, indexed: true }],
  ["layers", { family: "layers", rank: 0, indexed: true }],
]);

const INDEX = /^(?:0|[1-9][0-9]*)$/;

interface BlockKey {
  segment: string;
  /** prefix + family: the unit that keeps its first-appearance position. */
  group: string;
  rank: number;
  index: number;
}

/**
 * The built-in block a tensor belongs to, or undefined. A block is a kind component (followed by
 * a number when indexed) with at least one more component after it — the tensor's own name. When
 * several match (a "layers.N" inside a "blocks.M"), the outermost, leftmost one wins.
 */
function builtinBlock(name: string): BlockKey | undefined {
  const parts = name.split(".");
  for (let i = 0; i < parts.length - 1; i++) {
    const kind = BLOCK_KINDS.get(parts[i]!);
    if (!kind) continue;
    const prefix = parts.slice(0, i).join(".");
    const lead = prefix ? `${prefix}.` : "";
    if (!kind.indexed) {
      return {
        segment: `${lead}${parts[i]}`,
        group: `${lead}\u0000${kind.family}`,
        rank: kind.rank,
        index: 0,
      };
    }
    const number = parts[i + 1]!;
    if (i + 2 < parts.length && INDEX.test(number)) {
      return {
        segment: `${lead}${parts[i]}.${number}`,
        group: `${lead}\u0000${kind.family}`,
        rank: kind.rank,
        index: Number(number),
      };
    }
  }
  return undefined;
}

function compileRegex(regex: RegExp | string): RegExp {
  let re: RegExp;
  if (typeof regex === "string") {
    try {
      re = new RegExp(regex);
    } catch (err) {
      throw new RangeError(
        `--segment-regex ${JSON.stringify(regex)} is not a valid regular expression: ${(err as Error).message}`,
        { cause: err },
      );
    }
  } else {
    re = regex;
  }
  // Count capture groups without matching any tensor: an alternation with the empty pattern
  // always matches "", and the match array holds one slot per group.
  const flags = re.flags.replace(/[gy]/g, "");
  const groups = new RegExp(`${re.source}|`, flags).exec("")!.length - 1;
  if (groups < 1) {
    throw new RangeError(
      `--segment-regex ${JSON.stringify(re.source)} has no capture group; its first group names the segment`,
    );
  }
  // Drop g/y: they make exec() stateful across tensors.
  return new RegExp(re.source, flags);
}

const NATURAL = new Intl.Collator("en", { numeric: true });

/**
 * Groups tensors (given in file order) into base segments: `prelude` (if any tensor precedes the
 * first block), the blocks in network order, then `final` (if any). Empty segments are omitted.
 * `options.segmentRegex` replaces the built-in rules (see the module comment). An invalid regex,
 * or one without a capture group, is a RangeError.
 */
export function groupTensors(
  tensors: readonly GroupableTensor[],
  options: GroupingOptions = {},
): TensorGroup[] {
  const custom =
    options.segmentRegex === undefined ? undefined : compileRegex(options.segmentRegex);
  const prelude: TensorGroup = { name: PRELUDE_SEGMENT, tensorNames: [], bytes: 0 };
  const final: TensorGroup = { name: FINAL_SEGMENT, tensorNames: [], bytes: 0 };
  const blocks = new Map<string, TensorGroup & { key?: BlockKey }>();
  const groupFirst = new Map<string, number>();
  let seenBlock = false;
  tensors.forEach((t, position) => {
    let segment: string | undefined;
    let key: BlockKey | undefined;
    if (custom) {
      const m = custom.exec(t.name);
      segment = m?.[1] || undefined;
    } else {
      key = builtinBlock(t.name);
      segment = key?.segment;
    }
    let target: TensorGroup;
    if (segment === PRELUDE_SEGMENT) target = prelude;
    else if (segment === FINAL_SEGMENT) target = final;
    else if (segment === undefined) target = seenBlock ? final : prelude;
    else {
      seenBlock = true;
      let group = blocks.get(segment);
      if (!group) {
        group = { name: segment, tensorNames: [], bytes: 0, key };
        blocks.set(segment, group);
        if (key && !groupFirst.has(key.group)) groupFirst.set(key.group, position);
      }
      target = group;
    }
    target.tensorNames.push(t.name);
    target.bytes += t.bytes;
  });
  const ordered = [...blocks.values()].sort((a, b) => {
    if (!a.key || !b.key) return NATURAL.compare(a.name, b.name);
    return (
      groupFirst.get(a.key.group)! - groupFirst.get(b.key.group)! ||
      a.key.rank - b.key.rank ||
      a.key.index - b.key.index
    );
  });
  const result: TensorGroup[] = [];
  if (prelude.tensorNames.length > 0) result.push(prelude);
  for (const { name, tensorNames, bytes } of ordered) result.push({ name, tensorNames, bytes });
  if (final.tensorNames.length > 0) result.push(final);
  return result;
}

import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { ditTensorSpecs } from "../lib/model/dit";
import { groupTensors, type GroupableTensor } from "../lib/model/grouping";
import { readModelHeader } from "../lib/model/modelFile";
import { FIXTURES_DIR } from "./fixturesDir";

const LLAMA = join(FIXTURES_DIR, "gguf", "llama-2-tiny-random.gguf");

const named = (...names: string[]): GroupableTensor[] => names.map((name) => ({ name, bytes: 1 }));
const summary = (tensors: GroupableTensor[], regex?: string | RegExp) =>
  groupTensors(tensors, regex === undefined ? {} : { segmentRegex: regex }).map((g) => [
    g.name,
    g.tensorNames.length,
  ]);

describe("groupTensors: built-in rules", () => {
  it("groups the real tiny Llama GGUF into prelude, blk.0, final", async () => {
    const header = await readModelHeader(LLAMA);
    const groups = groupTensors(header.tensors);
    expect(groups.map((g) => [g.name, g.tensorNames, g.bytes])).toEqual([
      ["prelude", ["token_embd.weight"], 512_000],
      [
        "blk.0",
        [
          "blk.0.attn_q.weight",
          "blk.0.attn_k.weight",
          "blk.0.attn_v.weight",
          "blk.0.attn_output.weight",
          "blk.0.ffn_gate.weight",
          "blk.0.ffn_up.weight",
          "blk.0.ffn_down.weight",
          "blk.0.attn_norm.weight",
          "blk.0.ffn_norm.weight",
        ],
        4 * 128 + 3 * 512 + 2 * 32,
      ],
      ["final", ["output_norm.weight", "output.weight"], 32 + 512_000],
    ]);
  });

  it("gives Ferry's DiT its own segment names", () => {
    const specs = ditTensorSpecs({ blocks: 3, hidden: 8, heads: 2, channels: 4 });
    const groups = groupTensors(specs.map((s) => ({ name: s.name, bytes: 2 })));
    expect(groups.map((g) => g.name)).toEqual([
      "prelude",
      "blocks.0",
      "blocks.1",
      "blocks.2",
      "final",
    ]);
    for (const g of groups) {
      expect(g.tensorNames).toEqual(specs.filter((s) => s.segment === g.name).map((s) => s.name));
    }
  });

  it("orders blocks numerically and Flux double blocks before single blocks", () => {
    // Alphabetical file order, as many writers produce: "10" before "2", final_layer in between.
    const tensors = named(
      "double_blocks.0.img_attn.qkv.weight",
      "double_blocks.1.img_attn.qkv.weight",
      "double_blocks.10.img_attn.qkv.weight",
      "double_blocks.2.img_attn.qkv.weight",
      "final_layer.linear.weight",
      "img_in.weight",
      "single_blocks.0.linear1.weight",
      "single_blocks.1.linear1.weight",
      "time_in.in_layer.weight",
    );
    expect(summary(tensors)).toEqual([
      ["double_blocks.0", 1],
      ["double_blocks.1", 1],
      ["double_blocks.2", 1],
      ["double_blocks.10", 1],
      ["single_blocks.0", 1],
      ["single_blocks.1", 1],
      // final_layer, img_in and time_in come after the first block in file order
      ["final", 3],
    ]);
    // In writing order, the inputs come first and are the prelude.
    expect(
      summary(
        named(
          "img_in.weight",
          "single_blocks.0.x",
          "double_blocks.0.x",
          "final_layer.linear.weight",
        ),
      ),
    ).toEqual([
      ["prelude", 1],
      ["double_blocks.0", 1],
      ["single_blocks.0", 1],
      ["final", 1],
    ]);
  });

  it("knows diffusers Flux: transformer_blocks then single_transformer_blocks", () => {
    expect(
      summary(
        named(
          "x_embedder.weight",
          "single_transformer_blocks.0.attn.to_q.weight",
          "transformer_blocks.1.attn.to_q.weight",
          "transformer_blocks.0.attn.to_q.weight",
          "proj_out.weight",
        ),
      ),
    ).toEqual([
      ["prelude", 1],
      ["transformer_blocks.0", 1],
      ["transformer_blocks.1", 1],
      ["single_transformer_blocks.0", 1],
      ["final", 1],
    ]);
  });

  it("orders an SD UNet as inputs, middle, outputs, keeping the prefix in the names", () => {
    const p = "model.diffusion_model.";
    expect(
      summary(
        named(
          `${p}input_blocks.0.0.weight`,
          `${p}input_blocks.1.0.in_layers.0.weight`,
          `${p}input_blocks.1.1.proj_in.weight`,
          `${p}input_blocks.11.0.skip.weight`,
          `${p}middle_block.0.in_layers.0.weight`,
          `${p}middle_block.1.proj_in.weight`,
          `${p}out.0.weight`,
          `${p}output_blocks.0.0.in_layers.0.weight`,
          `${p}output_blocks.2.1.conv.weight`,
          `${p}time_embed.0.weight`,
        ),
      ),
    ).toEqual([
      [`${p}input_blocks.0`, 1],
      [`${p}input_blocks.1`, 2],
      [`${p}input_blocks.11`, 1],
      [`${p}middle_block`, 2],
      [`${p}output_blocks.0`, 1],
      [`${p}output_blocks.2`, 1],
      ["final", 2],
    ]);
  });

  it("matches whole name components, outermost first, for layers.N and nested blocks", () => {
    expect(
      summary(
        named(
          "model.embed_tokens.weight",
          "model.layers.0.self_attn.q_proj.weight",
          "model.layers.1.mlp.blocks.3.weight", // outer "layers.1" wins over inner "blocks.3"
          "model.layers.1.self_attn.q_proj.weight",
          "model.norm.weight",
          "lm_head.weight",
        ),
      ),
    ).toEqual([
      ["prelude", 1],
      ["model.layers.0", 1],
      ["model.layers.1", 2],
      ["final", 2],
    ]);
    // Not blocks: a kind as the last component, a kind without a number, a leading-zero number,
    // and kinds glued into other words.
    expect(
      summary(named("blocks", "blocks.x.weight", "blocks.01.weight", "myblocks.0.weight", "blk.3")),
    ).toEqual([["prelude", 5]]);
  });

  it("keeps sub-models apart, in the order they first appear", () => {
    expect(
      summary(
        named(
          "text.layers.1.w",
          "text.layers.0.w",
          "unet.input_blocks.0.w",
          "unet.output_blocks.0.w",
          "unet.middle_block.w",
        ),
      ),
    ).toEqual([
      ["text.layers.0", 1],
      ["text.layers.1", 1],
      ["unet.input_blocks.0", 1],
      ["unet.middle_block", 1],
      ["unet.output_blocks.0", 1],
    ]);
  });

  it("handles no tensors and no blocks", () => {
    expect(groupTensors([])).toEqual([]);
    expect(summary(named("a", "b"))).toEqual([["prelude", 2]]);
  });
});

describe("groupTensors: a user regex", () => {
  it("names segments by its first capture group, ordered by name with numbers compared numerically", () => {
    const tensors = named(
      "emb.weight",
      "enc.stage10.conv.weight",
      "enc.stage2.conv.weight",
      "enc.stage2.norm.weight",
      "head.weight",
    );
    expect(summary(tensors, /^enc\.(stage\d+)\./)).toEqual([
      ["prelude", 1],
      ["stage2", 2],
      ["stage10", 1],
      ["final", 1],
    ]);
    // As text too, and a stateful /g flag does not skip tensors.
    expect(summary(tensors, "^enc\\.(stage\\d+)\\.")).toEqual(
      summary(tensors, /^enc\.(stage\d+)\./g),
    );
  });

  it("lets a capture of prelude/final target those segments, and ignores empty captures", () => {
    expect(summary(named("a.0", "b.0", "c.0", "z"), /^(?:(a)|(?:b)|(?:c)|final)?([a-z]*)/)).toEqual(
      [
        ["a", 1],
        ["final", 3],
      ],
    );
    // "prelude.z" comes after a block but is named into the prelude explicitly.
    expect(summary(named("final.x", "b.w", "prelude.z"), /^(\w+)\./)).toEqual([
      ["prelude", 1],
      ["b", 1],
      ["final", 1],
    ]);
  });

  it("rejects an invalid regex or one without a capture group", () => {
    expect(() => groupTensors([], { segmentRegex: "(" })).toThrow(
      /--segment-regex "\(" is not a valid regular expression/,
    );
    expect(() => groupTensors([], { segmentRegex: "blk\\.\\d+" })).toThrow(
      /has no capture group; its first group names the segment/,
    );
    expect(() => groupTensors([], { segmentRegex: /(?:x)/ })).toThrow(/no capture group/);
  });
});

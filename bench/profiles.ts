/**
 * Planner profiles of real models and GPUs, derived from public architecture configs and spec
 * sheets rather than measured: the plan bench (bench/plan.ts) runs on them, and
 * `ferry bench profiles --out test/fixtures/profiles` writes them as profile files
 * (models/<model>-<quant>.json, devices/<device>.json) whose `source` and `notes` fields say how
 * each number was obtained. A test checks that the files match this code.
 *
 * Common assumptions (also written into each file):
 * - One step = one forward pass of the diffusion model at 1024×1024, batch 1 (latent 128×128;
 *   classifier-free guidance would double compute and activations).
 * - Parameter bytes per dtype: bf16 2 B/param; q8_0 34/32 B/param; q4_0 18/32 B/param (ggml
 *   blocks of 32 with a 16-bit scale). 1-D tensors (biases, norm scales) stay f32 (4 B) in every
 *   file, as GGUF converters keep them; convolution kernels stay 16-bit in q8_0/q4_0 because
 *   ggml's im2col convolution takes f16 kernels. Sizes are therefore approximate to within a few
 *   MB per segment.
 * - FLOPs per segment: 2 · (weight-matrix params) · (tokens the matrix is applied to) for linear
 *   layers, 2 · k² · C_in · C_out · H · W for convolutions, plus attention 4 · T² · D (QKᵀ and
 *   AV) for self-attention over T tokens of width D (4 · T · T_ctx · D for cross-attention).
 *   Norms, activations and softmax are left out (memory-bound, a few % of the time).
 * - Activations are f32 (4 B per value), as ggml's graphs keep them. output_bytes = the segment's
 *   output; prev_cut_bytes = everything crossing the cut before the segment (the running hidden
 *   state plus, in the UNet, skip connections still waiting); external_bytes = inputs computed
 *   outside the network (RoPE tables, text context).
 * - compute_buffer_bytes = the peak of live f32 intermediates of one block with flash attention
 *   (sd.cpp `--diffusion-fa`; no T² score matrix), estimated from the block's dataflow as
 *   k · T · D · 4 B; k is stated per architecture. The planner only needs the right magnitude.
 */
import { GiB } from "../lib/config/units";
import type { BaseSegment, DeviceProfile, ModelProfile } from "../lib/model/profile";

/** Weight formats the bench covers. */
export type Quant = "bf16" | "q8_0" | "q4_0";
export const QUANTS: readonly Quant[] = ["bf16", "q8_0", "q4_0"];

/** Bytes per parameter of a weight matrix in each format. */
export const MATRIX_BYTES: Record<Quant, number> = { bf16: 2, q8_0: 34 / 32, q4_0: 18 / 32 };

/** Activation bytes per value (f32). */
const ACT = 4;

/** Parameter counts of a segment by how they are stored. */
interface ParamCounts {
  /** Weight matrices (quantized in q8_0/q4_0). */
  matrix: number;
  /** Convolution kernels (16-bit in every format). */
  conv: number;
  /** Biases and norm scales (f32 in every format). */
  vector: number;
  /** Other tables stored 16-bit and never quantized (SD3's positional embedding). */
  table: number;
}

const none = (): ParamCounts => ({ matrix: 0, conv: 0, vector: 0, table: 0 });

function add(into: ParamCounts, more: ParamCounts): ParamCounts {
  into.matrix += more.matrix;
  into.conv += more.conv;
  into.vector += more.vector;
  into.table += more.table;
  return into;
}

function paramBytes(counts: ParamCounts, quant: Quant): number {
  return Math.ceil(
    counts.matrix * MATRIX_BYTES[quant] + counts.conv * 2 + counts.vector * 4 + counts.table * 2,
  );
}

function totalParams(counts: ParamCounts): number {
  return counts.matrix + counts.conv + counts.vector + counts.table;
}

/** A linear layer in→out (weight matrix + optional bias). */
function linear(inputs: number, outputs: number, bias = true): ParamCounts {
  return { ...none(), matrix: inputs * outputs, vector: bias ? outputs : 0 };
}

function conv(inputs: number, outputs: number, kernel: number): ParamCounts {
  return { ...none(), conv: inputs * outputs * kernel * kernel, vector: outputs };
}

function vector(count: number): ParamCounts {
  return { ...none(), vector: count };
}

/** A segment before its dtype is chosen. */
interface Block {
  name: string;
  params: ParamCounts;
  flops: number;
  compute_buffer_bytes: number;
  output_bytes: number;
  prev_cut_bytes: number;
  external_bytes: number;
}

/** An architecture: its blocks for one job and where the numbers come from. */
interface Architecture {
  id: string;
  title: string;
  source: string;
  notes: string[];
  blocks: Block[];
}

// ---------------------------------------------------------------------------------------------
// SDXL UNet

const SDXL_CTX = 2048;
const SDXL_CTX_TOKENS = 77;
const SDXL_EMB = 1280;

function resBlock(cin: number, cout: number): ParamCounts {
  const p = add(vector(2 * cin), conv(cin, cout, 3));
  add(p, linear(SDXL_EMB, cout));
  add(p, vector(2 * cout));
  add(p, conv(cout, cout, 3));
  if (cin !== cout) add(p, conv(cin, cout, 1));
  return p;
}

function resBlockFlops(cin: number, cout: number, hw: number): number {
  return (
    2 * 9 * cin * cout * hw +
    2 * 9 * cout * cout * hw +
    2 * SDXL_EMB * cout +
    (cin !== cout ? 2 * cin * cout * hw : 0)
  );
}

/** Live f32 tensors of a ResBlock (in, norm, conv out ×2, skip) plus f16 im2col of the wider conv. */
function resBlockBuffer(cin: number, cout: number, hw: number): number {
  return ACT * hw * (2 * cin + 3 * cout) + 2 * 9 * Math.max(cin, cout) * hw;
}

function transformerBlock(c: number): ParamCounts {
  const p = linear(c, c, false); // attn1 q
  add(p, linear(c, c, false)); // k
  add(p, linear(c, c, false)); // v
  add(p, linear(c, c)); // out
  add(p, linear(c, c, false)); // attn2 q
  add(p, linear(SDXL_CTX, c, false)); // k from text context
  add(p, linear(SDXL_CTX, c, false)); // v
  add(p, linear(c, c)); // out
  add(p, linear(c, 8 * c)); // GEGLU proj
  add(p, linear(4 * c, c)); // ff out
  add(p, vector(6 * c)); // three LayerNorms
  return p;
}

function spatialTransformer(c: number, depth: number): ParamCounts {
  const p = add(vector(2 * c), linear(c, c)); // GroupNorm, proj_in
  for (let i = 0; i < depth; i++) add(p, transformerBlock(c));
  return add(p, linear(c, c)); // proj_out
}

function spatialTransformerFlops(c: number, depth: number, hw: number): number {
  const perBlock =
    2 * (4 * c * c) * hw + // attn1 q, k, v, out
    4 * hw * hw * c + // self-attention
    2 * (2 * c * c) * hw + // attn2 q, out
    2 * (2 * SDXL_CTX * c) * SDXL_CTX_TOKENS + // attn2 k, v over the text tokens
    4 * hw * SDXL_CTX_TOKENS * c + // cross-attention
    2 * (8 * c * c + 4 * c * c) * hw; // GEGLU MLP
  return 2 * (2 * c * c) * hw + depth * perBlock;
}

/** GEGLU MLP peak: in, norm, 8C projection, 4C gated, out ≈ 14 · T · C floats. */
function spatialTransformerBuffer(c: number, hw: number): number {
  return ACT * 14 * hw * c;
}

function sdxl(): Architecture {
  const res = [128 * 128, 64 * 64, 32 * 32];
  const channels = [320, 640, 1280];
  const out = (c: number, hw: number) => ACT * c * hw;
  const blocks: Block[] = [];
  const emb = ACT * SDXL_EMB;
  const embParams = add(
    add(linear(320, SDXL_EMB), linear(SDXL_EMB, SDXL_EMB)),
    linear(2816, SDXL_EMB),
  );
  add(embParams, linear(SDXL_EMB, SDXL_EMB));
  blocks.push({
    name: "prelude",
    params: embParams,
    flops: 2 * totalParams(embParams),
    compute_buffer_bytes: ACT * 4 * 2816,
    output_bytes: emb,
    prev_cut_bytes: 0,
    external_bytes: 0,
  });

  // Input blocks: [params, flops, buffer, output channels, output hw].
  type Spec = {
    name: string;
    params: ParamCounts;
    flops: number;
    buffer: number;
    c: number;
    hw: number;
  };
  const input: Spec[] = [];
  input.push({
    name: "input_blocks.0",
    params: conv(4, 320, 3),
    flops: 2 * 9 * 4 * 320 * res[0],
    buffer: ACT * res[0] * (4 + 320) + 2 * 9 * 4 * res[0],
    c: 320,
    hw: res[0],
  });
  for (const i of [1, 2]) {
    input.push({
      name: `input_blocks.${i}`,
      params: resBlock(320, 320),
      flops: resBlockFlops(320, 320, res[0]),
      buffer: resBlockBuffer(320, 320, res[0]),
      c: 320,
      hw: res[0],
    });
  }
  input.push({
    name: "input_blocks.3",
    params: conv(320, 320, 3),
    flops: 2 * 9 * 320 * 320 * res[1],
    buffer: ACT * (res[0] + res[1]) * 320 + 2 * 9 * 320 * res[1],
    c: 320,
    hw: res[1],
  });
  const attnLevel = (i: number, cin: number, c: number, depth: number, hw: number): Spec => ({
    name: `input_blocks.${i}`,
    params: add(resBlock(cin, c), spatialTransformer(c, depth)),
    flops: resBlockFlops(cin, c, hw) + spatialTransformerFlops(c, depth, hw),
    buffer: Math.max(resBlockBuffer(cin, c, hw), spatialTransformerBuffer(c, hw)),
    c,
    hw,
  });
  input.push(attnLevel(4, 320, 640, 2, res[1]));
  input.push(attnLevel(5, 640, 640, 2, res[1]));
  input.push({
    name: "input_blocks.6",
    params: conv(640, 640, 3),
    flops: 2 * 9 * 640 * 640 * res[2],
    buffer: ACT * (res[1] + res[2]) * 640 + 2 * 9 * 640 * res[2],
    c: 640,
    hw: res[2],
  });
  input.push(attnLevel(7, 640, 1280, 10, res[2]));
  input.push(attnLevel(8, 1280, 1280, 10, res[2]));

  // Skip connections wait on the device from their input block to their output block.
  const skips = input.map((s) => out(s.c, s.hw));
  let alive = 0;
  for (const spec of input) {
    blocks.push({
      name: spec.name,
      params: spec.params,
      flops: spec.flops,
      compute_buffer_bytes: spec.buffer,
      output_bytes: out(spec.c, spec.hw),
      // The running h is the newest skip; the time embedding crosses every cut.
      prev_cut_bytes: alive + emb,
      // input_blocks.0 reads the latent; every transformer reads the text context.
      external_bytes: ACT * (SDXL_CTX * SDXL_CTX_TOKENS + (alive === 0 ? 4 * res[0] : 0)),
    });
    alive += out(spec.c, spec.hw);
  }
  const c2 = channels[2];
  const middle = add(add(resBlock(c2, c2), spatialTransformer(c2, 10)), resBlock(c2, c2));
  blocks.push({
    name: "middle_block",
    params: middle,
    flops: 2 * resBlockFlops(c2, c2, res[2]) + spatialTransformerFlops(c2, 10, res[2]),
    compute_buffer_bytes: Math.max(
      resBlockBuffer(c2, c2, res[2]),
      spatialTransformerBuffer(c2, res[2]),
    ),
    output_bytes: out(c2, res[2]),
    prev_cut_bytes: alive + emb,
    external_bytes: ACT * SDXL_CTX * SDXL_CTX_TOKENS,
  });

  // Output blocks: ResBlock(concat with the skip) [+ transformer] [+ upsample].
  const levels = [2, 2, 2, 1, 1, 1, 0, 0, 0];
  const depths = [10, 10, 10, 2, 2, 2, 0, 0, 0];
  let h = { c: c2, hw: res[2] };
  let remaining = alive;
  for (let k = 0; k < 9; k++) {
    const skip = input[8 - k];
    const c = channels[levels[k]];
    const hw = res[levels[k]];
    const cin = h.c + skip.c;
    const params = resBlock(cin, c);
    let flops = resBlockFlops(cin, c, hw);
    let buffer = resBlockBuffer(cin, c, hw);
    if (depths[k] > 0) {
      add(params, spatialTransformer(c, depths[k]));
      flops += spatialTransformerFlops(c, depths[k], hw);
      buffer = Math.max(buffer, spatialTransformerBuffer(c, hw));
    }
    let outHw = hw;
    if (k === 2 || k === 5) {
      add(params, conv(c, c, 3)); // Upsample: nearest ×2, then a 3×3 conv at the new size
      outHw = hw * 4;
      flops += 2 * 9 * c * c * outHw;
      buffer = Math.max(buffer, ACT * c * (hw + 2 * outHw) + 2 * 9 * c * outHw);
    }
    blocks.push({
      name: `output_blocks.${k}`,
      params,
      flops,
      compute_buffer_bytes: buffer,
      output_bytes: out(c, outHw),
      prev_cut_bytes: out(h.c, h.hw) + remaining + emb,
      external_bytes: ACT * SDXL_CTX * SDXL_CTX_TOKENS,
    });
    remaining -= skips[8 - k];
    h = { c, hw: outHw };
  }
  const final = add(vector(2 * 320), conv(320, 4, 3));
  blocks.push({
    name: "final",
    params: final,
    flops: 2 * 9 * 320 * 4 * res[0],
    compute_buffer_bytes: ACT * res[0] * 2 * 320 + 2 * 9 * 320 * res[0],
    output_bytes: ACT * 4 * res[0],
    prev_cut_bytes: out(320, res[0]) + emb,
    external_bytes: 0,
  });
  return {
    id: "sdxl-unet",
    title: "SDXL 1.0 UNet (2.6B)",
    source:
      "stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (sgm UNetModel: model_channels " +
      "320, channel_mult [1,2,4], num_res_blocks 2, transformer_depth [0,2,10], " +
      "num_head_channels 64, context_dim 2048, adm_in_channels 2816, use_linear_in_transformer)",
    notes: [
      "Base segments as sd.cpp splits the UNet: prelude (time_embed + label_emb), " +
        "input_blocks.0-8, middle_block, output_blocks.0-8, final (out: GroupNorm + conv 320→4).",
      "Job: 1024×1024, batch 1 → latent 128×128; levels at 128² (320 ch), 64² (640 ch), " +
        "32² (1280 ch) positions; text context 77 tokens × 2048 (external).",
      "ResBlock params: 2 GroupNorms, two 3×3 convs, emb Linear(1280, C_out), a 1×1 skip conv " +
        "when C_in ≠ C_out. Transformer block: self-attn (q,k,v,out C×C), cross-attn (q,out C×C; " +
        "k,v 2048×C), GEGLU C→8C and 4C→C, 3 LayerNorms; proj_in/proj_out Linear(C, C).",
      "FLOPs: convs 2·9·C_in·C_out·H·W, linears 2·params·tokens, self-attention 4·T²·C, " +
        "cross-attention 4·T·77·C.",
      "compute buffer: ResBlock (2·C_in + 3·C_out)·HW f32 + f16 im2col 9·C·HW; transformer " +
        "14·T·C f32 (GEGLU peak); the larger of the two.",
      "prev_cut_bytes include every skip connection still waiting for its output block (they " +
        "occupy the device across the cut) plus the 1280-float time embedding.",
    ],
    blocks,
  };
}

// ---------------------------------------------------------------------------------------------
// Transformer (DiT / MMDiT) helpers

/** Self-attention over T tokens of width D: 4 · T² · D. */
const attention = (tokens: number, width: number) => 4 * tokens * tokens * width;

function flux(): Architecture {
  const D = 3072;
  const imgTokens = 4096;
  const txtTokens = 512;
  const T = imgTokens + txtTokens;
  const headDim = 128;
  const blocks: Block[] = [];
  const vec = ACT * D;
  const rope = ACT * T * (headDim / 2) * 4; // cos/sin 2×2 rotation per pair
  const stream = (): ParamCounts => {
    const p = linear(D, 6 * D); // modulation
    add(p, linear(D, 3 * D)); // qkv
    add(p, vector(2 * headDim)); // q/k RMSNorm scales
    add(p, linear(D, D)); // proj
    add(p, linear(D, 4 * D)); // mlp in
    add(p, linear(4 * D, D)); // mlp out
    return p;
  };
  const prelude = linear(64, D);
  for (const inputs of [256, 768, 256]) add(add(prelude, linear(inputs, D)), linear(D, D));
  add(prelude, linear(4096, D));
  blocks.push({
    name: "prelude",
    params: prelude,
    flops: 2 * 64 * D * imgTokens + 2 * 4096 * D * txtTokens + 2 * 3 * (256 * D + D * D),
    compute_buffer_bytes: ACT * (imgTokens * (64 + D) + txtTokens * (4096 + D)),
    output_bytes: ACT * T * D + vec,
    prev_cut_bytes: 0,
    external_bytes: ACT * (imgTokens * 64 + txtTokens * 4096) + rope,
  });
  const perStreamMatrix = 12 * D * D; // qkv + proj + MLP, applied to the stream's tokens
  for (let i = 0; i < 19; i++) {
    blocks.push({
      name: `double_blocks.${i}`,
      params: add(stream(), stream()),
      flops: 2 * perStreamMatrix * T + 2 * 2 * 6 * D * D + attention(T, D),
      compute_buffer_bytes: ACT * 11 * T * D,
      output_bytes: ACT * T * D + vec,
      prev_cut_bytes: ACT * T * D + vec,
      external_bytes: rope,
    });
  }
  for (let i = 0; i < 38; i++) {
    const p = linear(D, 3 * D); // modulation
    add(p, linear(D, 7 * D)); // linear1: qkv + MLP in
    add(p, linear(5 * D, D)); // linear2: attention out + MLP out
    add(p, vector(2 * headDim));
    blocks.push({
      name: `single_blocks.${i}`,
      params: p,
      flops: 2 * 12 * D * D * T + 2 * 3 * D * D + attention(T, D),
      compute_buffer_bytes: ACT * 16 * T * D,
      output_bytes: ACT * T * D + vec,
      prev_cut_bytes: ACT * T * D + vec,
      external_bytes: rope,
    });
  }
  const final = add(linear(D, 2 * D), linear(D, 64));
  blocks.push({
    name: "final",
    params: final,
    flops: 2 * D * 64 * imgTokens + 2 * 2 * D * D,
    compute_buffer_bytes: ACT * imgTokens * (2 * D + 64),
    output_bytes: ACT * imgTokens * 64,
    prev_cut_bytes: ACT * T * D + vec,
    external_bytes: 0,
  });
  return {
    id: "flux1-dev",
    title: "FLUX.1-dev (12B)",
    source:
      "black-forest-labs/FLUX.1-dev transformer/config.json (hidden 3072 = 24 heads × 128, " +
      "19 double-stream + 38 single-stream blocks, mlp_ratio 4, in_channels 64, " +
      "joint_attention_dim 4096, pooled_projection_dim 768, guidance_embeds true)",
    notes: [
      "Base segments: prelude (img_in, time_in, vector_in, guidance_in, txt_in), double_blocks.0-18, " +
        "single_blocks.0-37, final (adaLN Linear(D, 2D) + Linear(D, 64)).",
      "Job: 1024×1024, batch 1 → 64×64 = 4096 image tokens (2×2 patches of the 128×128×16 latent) " +
        "+ 512 T5 tokens = 4608 tokens, D = 3072.",
      "Double block: per stream modulation Linear(D, 6D), qkv Linear(D, 3D), proj Linear(D, D), " +
        "MLP D→4D→D (≈ 339.8M params). Single block: modulation Linear(D, 3D), linear1 " +
        "Linear(D, 7D), linear2 Linear(5D, D) (≈ 141.6M params). Total ≈ 11.9B.",
      "FLOPs per block: 2 · 12D² · T (linears) + 4 · T² · D (joint attention) ≈ 1.30 TFLOP.",
      "compute buffer: 11 · T · D f32 for a double block (modulated input, q/k/v, attention out, " +
        "4D MLP hidden and its GELU), 16 · T · D for a single block (fused 7D linear1 output, " +
        "4D GELU, 5D concat).",
      "external: the RoPE table (T × 64 rotation pairs × 4 floats).",
    ],
    blocks,
  };
}

function zImage(): Architecture {
  const D = 3840;
  const ffn = 10240; // int(D / 3 · 8)
  const imgTokens = 4096;
  const capTokens = 256;
  const T = imgTokens + capTokens;
  const adaln = 256;
  const headDim = 128;
  const rope = ACT * T * (headDim / 2) * 4;
  const layer = (modulated: boolean): ParamCounts => {
    const p = linear(D, 3 * D, false); // qkv
    add(p, linear(D, D, false)); // out
    add(p, vector(2 * headDim + 4 * D)); // q/k norms, sandwich RMSNorms
    add(p, linear(D, ffn, false)); // w1
    add(p, linear(D, ffn, false)); // w3
    add(p, linear(ffn, D, false)); // w2
    if (modulated) add(p, linear(adaln, 4 * D));
    return p;
  };
  const matrixFlops = (tokens: number) => 2 * (4 * D * D + 3 * D * ffn) * tokens;
  const buffer = (tokens: number) => ACT * 12 * tokens * D;
  const blocks: Block[] = [];
  const prelude = add(linear(64, D), add(linear(256, 1024), linear(1024, adaln)));
  add(prelude, add(vector(2560), linear(2560, D)));
  add(prelude, vector(2 * D)); // pad tokens
  blocks.push({
    name: "prelude",
    params: prelude,
    flops: 2 * 64 * D * imgTokens + 2 * 2560 * D * capTokens,
    compute_buffer_bytes: ACT * (imgTokens * (64 + D) + capTokens * (2560 + D)),
    output_bytes: ACT * T * D,
    prev_cut_bytes: 0,
    external_bytes: ACT * (imgTokens * 64 + capTokens * 2560) + rope,
  });
  for (let i = 0; i < 2; i++) {
    blocks.push({
      name: `noise_refiner.${i}`,
      params: layer(true),
      flops: matrixFlops(imgTokens) + attention(imgTokens, D),
      compute_buffer_bytes: buffer(imgTokens),
      output_bytes: ACT * T * D,
      prev_cut_bytes: ACT * T * D,
      external_bytes: rope,
    });
  }
  for (let i = 0; i < 2; i++) {
    blocks.push({
      name: `context_refiner.${i}`,
      params: layer(false),
      flops: matrixFlops(capTokens) + attention(capTokens, D),
      compute_buffer_bytes: buffer(capTokens),
      output_bytes: ACT * T * D,
      prev_cut_bytes: ACT * T * D,
      external_bytes: rope,
    });
  }
  for (let i = 0; i < 30; i++) {
    blocks.push({
      name: `layers.${i}`,
      params: layer(true),
      flops: matrixFlops(T) + attention(T, D),
      compute_buffer_bytes: buffer(T),
      output_bytes: ACT * T * D,
      prev_cut_bytes: ACT * T * D,
      external_bytes: rope,
    });
  }
  const final = add(linear(D, 64), linear(adaln, D));
  blocks.push({
    name: "final",
    params: final,
    flops: 2 * D * 64 * imgTokens,
    compute_buffer_bytes: ACT * imgTokens * (2 * D + 64),
    output_bytes: ACT * imgTokens * 64,
    prev_cut_bytes: ACT * T * D,
    external_bytes: 0,
  });
  return {
    id: "z-image",
    title: "Z-Image (6B, S3-DiT)",
    source:
      "Tongyi-MAI/Z-Image-Turbo transformer/config.json (dim 3840, n_layers 30, " +
      "n_refiner_layers 2, n_heads 30, qk_norm, cap_feat_dim 2560, in_channels 16, patch 2; " +
      "FFN hidden int(dim/3·8) = 10240 SwiGLU; adaLN embedding 256)",
    notes: [
      "Base segments: prelude (x_embedder, t_embedder 256→1024→256, cap_embedder RMSNorm + " +
        "Linear(2560, D), pad tokens), noise_refiner.0-1, context_refiner.0-1 (no modulation), " +
        "layers.0-29, final (Linear(D, 64) + adaLN Linear(256, D)).",
      "Job: 1024×1024, batch 1 → 4096 image tokens + 256 caption tokens (assumed prompt length " +
        "after padding) = 4352 tokens in the main layers, D = 3840.",
      "Layer: qkv Linear(D, 3D) and out Linear(D, D) without bias, SwiGLU w1/w3 D→10240, " +
        "w2 10240→D, adaLN Linear(256, 4D), RMSNorms (≈ 180.9M params). Total ≈ 6.15B.",
      "FLOPs per layer: 2 · (4D² + 3·D·10240) · T + 4 · T² · D ≈ 1.83 TFLOP; noise refiners run " +
        "on the 4096 image tokens, context refiners on the 256 caption tokens.",
      "compute buffer: 12 · T · D f32 (SwiGLU: input, norm, w1 and w3 outputs at 8/3·D each, " +
        "their product, output).",
    ],
    blocks,
  };
}

function sd35Large(): Architecture {
  const D = 2432; // 64 · depth
  const depth = 38;
  const imgTokens = 4096;
  const ctxTokens = 77 + 256; // CLIP-L/G + T5
  const T = imgTokens + ctxTokens;
  const headDim = 64;
  const stream = (preOnly: boolean): ParamCounts => {
    if (preOnly) {
      // The last block's context stream only feeds the joint attention.
      return add(add(linear(D, 2 * D), linear(D, 3 * D)), vector(2 * headDim));
    }
    const p = linear(D, 6 * D);
    add(p, linear(D, 3 * D));
    add(p, vector(2 * headDim));
    add(p, linear(D, D));
    add(p, linear(D, 4 * D));
    add(p, linear(4 * D, D));
    return p;
  };
  const blocks: Block[] = [];
  const prelude = add(conv(16, D, 2), add(linear(256, D), linear(D, D)));
  add(prelude, add(linear(2048, D), linear(D, D)));
  add(prelude, linear(4096, D));
  add(prelude, { ...none(), table: 192 * 192 * D }); // pos_embed_max_size 192
  blocks.push({
    name: "prelude",
    params: prelude,
    flops: 2 * 16 * 4 * D * imgTokens + 2 * 4096 * D * ctxTokens,
    compute_buffer_bytes: ACT * (imgTokens * (64 + 2 * D) + ctxTokens * (4096 + D)),
    output_bytes: ACT * (T * D + D),
    prev_cut_bytes: 0,
    external_bytes: ACT * (imgTokens * 64 + ctxTokens * 4096 + 2048),
  });
  for (let i = 0; i < depth; i++) {
    const last = i === depth - 1;
    const ctxMatrix = last ? 3 * D * D : 12 * D * D;
    blocks.push({
      name: `joint_blocks.${i}`,
      params: add(stream(false), stream(last)),
      flops:
        2 * 12 * D * D * imgTokens +
        2 * ctxMatrix * ctxTokens +
        2 * 2 * 6 * D * D +
        attention(T, D),
      compute_buffer_bytes: ACT * 11 * T * D,
      output_bytes: ACT * ((last ? imgTokens : T) * D + D),
      prev_cut_bytes: ACT * (T * D + D),
      external_bytes: 0,
    });
  }
  const final = add(linear(D, 2 * D), linear(D, 64));
  blocks.push({
    name: "final",
    params: final,
    flops: 2 * D * 64 * imgTokens + 2 * 2 * D * D,
    compute_buffer_bytes: ACT * imgTokens * (2 * D + 64),
    output_bytes: ACT * imgTokens * 64,
    prev_cut_bytes: ACT * (imgTokens * D + D),
    external_bytes: 0,
  });
  return {
    id: "sd3.5-large",
    title: "Stable Diffusion 3.5 Large (8B, MMDiT)",
    source:
      "stabilityai/stable-diffusion-3.5-large transformer/config.json (num_layers 38, " +
      "attention_head_dim 64, num_attention_heads 38 → D = 2432, joint_attention_dim 4096, " +
      "pooled_projection_dim 2048, patch_size 2, in_channels 16, pos_embed_max_size 192, " +
      "qk_norm rms_norm)",
    notes: [
      "Base segments: prelude (patch-embed conv, t_embedder, y_embedder, context_embedder, " +
        "pos_embed table 192²×D kept 16-bit), joint_blocks.0-37, final (adaLN + Linear(D, 64)).",
      "Job: 1024×1024, batch 1 → 4096 image tokens + 333 context tokens (77 CLIP + 256 T5) = " +
        "4429 tokens, D = 2432.",
      "Joint block: per stream adaLN Linear(D, 6D), qkv Linear(D, 3D), proj Linear(D, D), " +
        "MLP D→4D→D (≈ 212.9M params); the last block's context stream is pre-only (adaLN " +
        "Linear(D, 2D) + qkv). Total ≈ 8.1B.",
      "FLOPs per block: 2 · 12D² · T + 4 · T² · D ≈ 0.82 TFLOP.",
      "compute buffer: 11 · T · D f32 (as a Flux double block).",
    ],
    blocks,
  };
}

/** Every architecture the bench covers. */
export function architectures(): Architecture[] {
  return [sdxl(), zImage(), flux(), sd35Large()];
}

/** A model profile with where it comes from. */
export interface BenchModel {
  /** File stem: `<architecture>-<quant>`. */
  id: string;
  quant: Quant;
  model: ModelProfile;
  source: string;
  notes: string[];
  /** Parameters (not bytes), for the notes and the bench's table. */
  params: number;
}

/** Every architecture in every format. */
export function benchModels(): BenchModel[] {
  const models: BenchModel[] = [];
  for (const arch of architectures()) {
    const params = arch.blocks.reduce((sum, block) => sum + totalParams(block.params), 0);
    const flops = arch.blocks.reduce((sum, block) => sum + block.flops, 0);
    for (const quant of QUANTS) {
      const segments: BaseSegment[] = arch.blocks.map((block) => ({
        name: block.name,
        param_bytes: paramBytes(block.params, quant),
        compute_buffer_bytes: Math.round(block.compute_buffer_bytes),
        output_bytes: Math.round(block.output_bytes),
        prev_cut_bytes: Math.round(block.prev_cut_bytes),
        external_bytes: Math.round(block.external_bytes),
        flops: Math.round(block.flops),
      }));
      const bytes = segments.reduce((sum, s) => sum + s.param_bytes, 0);
      models.push({
        id: `${arch.id}-${quant}`,
        quant,
        model: { name: `${arch.id}-${quant}-1024x1024-b1`, segments },
        source: arch.source,
        notes: [
          `${arch.title} in ${quant}: ${(params / 1e9).toFixed(2)}B parameters, ` +
            `${(bytes / GiB).toFixed(2)} GiB of weights, ${(flops / 1e12).toFixed(1)} TFLOP ` +
            "per forward pass.",
          ...arch.notes,
          "Bytes: weight matrices " +
            `${MATRIX_BYTES[quant]} B/param (${quant}); biases and norm scales f32; ` +
            "convolution kernels 16-bit. Activations f32; flash attention assumed.",
          "Generated by `ferry bench profiles` from bench/profiles.ts; edit that file, not this one.",
        ],
        params,
      });
    }
  }
  return models;
}

/** A device profile with where it comes from. */
export interface BenchDevice {
  id: string;
  device: DeviceProfile;
  source: string;
  notes: string[];
}

/** The GPUs of the bench, with effective (achieved, not peak) rates. */
export function benchDevices(): BenchDevice[] {
  const MiB = 1024 * 1024;
  return [
    {
      id: "rtx3060-12gb",
      device: {
        name: "RTX 3060 12GB",
        total_bytes: 12 * GiB,
        free_bytes: 12 * GiB - 512 * MiB,
        h2d_gbps: 24,
        tflops: 13,
        dispatch_us: 30,
      },
      source: "NVIDIA GeForce RTX 3060 (GA106) spec sheet; PCIe 4.0 x16",
      notes: [
        "free: 12 GiB less 512 MiB for the CUDA context and a desktop.",
        "h2d 24 GB/s: pinned cudaMemcpyAsync over PCIe 4.0 x16 (31.5 GB/s raw) achieves 24-26 GB/s.",
        "tflops 13: dense bf16 tensor rate with fp32 accumulation is 25.4 TFLOP/s; diffusion " +
          "blocks reach about half of it (ggml kernels, norms and attention in between).",
        "dispatch 30 µs: one merged segment's graph launch and synchronisation on a consumer GPU.",
      ],
    },
    {
      id: "rtx4090-24gb",
      device: {
        name: "RTX 4090 24GB",
        total_bytes: 24 * GiB,
        free_bytes: 24 * GiB - 512 * MiB,
        h2d_gbps: 25,
        tflops: 100,
        dispatch_us: 20,
      },
      source: "NVIDIA GeForce RTX 4090 (AD102) spec sheet; PCIe 4.0 x16",
      notes: [
        "free: 24 GiB less 512 MiB for the CUDA context and a desktop.",
        "h2d 25 GB/s: pinned copies over PCIe 4.0 x16.",
        "tflops 100: dense bf16 with fp32 accumulation is 165 TFLOP/s; about 60% is achieved on " +
          "large GEMM-bound blocks.",
        "dispatch 20 µs per merged segment.",
      ],
    },
    {
      id: "h100-pcie-80gb",
      device: {
        name: "H100 PCIe 80GB",
        total_bytes: 80 * GiB,
        free_bytes: 80 * GiB - 1024 * MiB,
        h2d_gbps: 50,
        tflops: 450,
        dispatch_us: 15,
      },
      source: "NVIDIA H100 PCIe 80GB (GH100) datasheet; PCIe 5.0 x16",
      notes: [
        "free: 80 GiB less 1 GiB for the CUDA context and other processes.",
        "h2d 50 GB/s: pinned copies over PCIe 5.0 x16 (63 GB/s raw).",
        "tflops 450: dense bf16 is 756 TFLOP/s on the PCIe card; about 60% is achieved.",
        "dispatch 15 µs per merged segment.",
      ],
    },
  ];
}

/** The JSON of a model profile file, as written under models/. */
export function modelProfileJson(model: BenchModel): unknown {
  return { source: model.source, notes: model.notes, model: model.model };
}

/** The JSON of a device profile file, as written under devices/. */
export function deviceProfileJson(device: BenchDevice): unknown {
  return { source: device.source, notes: device.notes, device: device.device };
}

/**
 * Every profile file `ferry bench profiles --out DIR` writes: `models/<id>.json` and
 * `devices/<id>.json`, paths relative to DIR.
 */
export function profileFiles(): Array<{ path: string; json: unknown }> {
  return [
    ...benchModels().map((model) => ({
      path: `models/${model.id}.json`,
      json: modelProfileJson(model),
    })),
    ...benchDevices().map((device) => ({
      path: `devices/${device.id}.json`,
      json: deviceProfileJson(device),
    })),
  ];
}

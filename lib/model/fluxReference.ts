/**
 * A plain TypeScript FLUX.1 transformer, written from Black Forest Labs' reference implementation
 * (github.com/black-forest-labs/flux: model.py, modules/layers.py, math.py, sampling.py), in
 * float64 from a file's weights: the ground truth the native architecture
 * (native/src/archs/flux.cpp: ggml, float32, streamed) is compared against. For small models.
 *
 * Per sample (B samples, L image tokens, T text tokens, hidden H, heads H/128; Linear weights
 * [out, in], y = x·Wᵀ + b):
 *   img = img_in(img); vec = time_in(emb(1000·t)) [+ guidance_in(emb(1000·g))] + vector_in(y);
 *   txt = txt_in(txt); MLPEmbedder = out_layer(silu(in_layer(x))); emb: [cos | sin] of
 *   t·10000^(−j/128), j < 128.
 *   pe: ids = (txt: zeros, img: img_ids); per axis a (dims 16, 56, 56) and pair j:
 *   angle = id[a]·10000^(−2j/dim_a); rope(x)[2i] = x[2i]·cos − x[2i+1]·sin,
 *   rope(x)[2i+1] = x[2i]·sin + x[2i+1]·cos.
 *   double block, per stream s (img, txt): shift1, scale1, gate1, shift2, scale2, gate2 =
 *   s_mod.lin(silu(vec)); q, k, v = s_attn.qkv((1 + scale1)·LN(s) + shift1) split [3, heads,
 *   128]; q, k = RMSNorm(q)·query_norm.scale, RMSNorm(k)·key_norm.scale; attention over txt then
 *   img tokens with rope(q), rope(k); s += gate1·s_attn.proj(attn_s);
 *   s += gate2·s_mlp.2(gelu_tanh(s_mlp.0((1 + scale2)·LN(s) + shift2))).
 *   single block on x = [txt, img]: shift, scale, gate = modulation.lin(silu(vec));
 *   [qkv | mlp] = linear1((1 + scale)·LN(x) + shift); x += gate·linear2([attn | gelu_tanh(mlp)]).
 *   final: shift, scale = adaLN_modulation.1(silu(vec)); v = linear((1 + scale)·LN(img) + shift).
 *   LN: no affine, eps 1e-6; RMSNorm eps 1e-6; attention softmax(q·kᵀ/√128)·v, no mask.
 * Sampler: t = linspace(1, 0, S+1) (or get_schedule's shift); img ← img + (t[i+1] − t[i])·v(img, t[i]).
 *
 * Where ggml's arithmetic departs from float64 on purpose, this follows it: matrix products
 * convert activations to the weight type's dot type (matmulActivations, as lib/model/reference.ts),
 * the timestep embedding is ggml's float32 formula, and the timestep itself is a float32.
 */
import { promises as fs } from "node:fs";
import { fillUniform, normalizeSeed, toU64 } from "./initialInput";
import { checkFluxTensors, FLUX_CONSTANTS, type FluxConfig, type FluxModel } from "./flux";
import { readModelHeader, requireModelArchitecture } from "./modelFile";
import { decodeStored, geluTanh, linear, readStored, softmaxInPlace } from "./reference";
import { ModelFormatError } from "./safetensors";

const EPS = 1e-6;
const TIME_DIM = 256;
const MAX_PERIOD = 10000;

/** A FLUX file's weights as float64 values by name (without the prefix), and their types. */
export interface FluxWeights {
  config: FluxConfig;
  tensors: Map<string, Float64Array>;
  types: Map<string, string>;
}

/** The inputs of a FLUX job, row-major float32 (as `ferry run --inputs` takes them). */
export interface FluxInputs {
  /** [B, L, 64] */
  img: Float32Array;
  /** [B, T, 4096] */
  txt: Float32Array;
  /** [B, 768] */
  vec: Float32Array;
  /** [B, L, 3] */
  img_ids: Float32Array;
}

export interface FluxJob {
  batch: number;
  /** Image tokens L. */
  tokens: number;
  /** Text tokens T. */
  contextTokens: number;
  steps: number;
  /** FLUX.1-dev's guidance. @default 3.5 */
  guidance?: number;
  /** get_schedule's shift. @default false */
  shift?: boolean;
}

/** Loads a (small) FLUX file's transformer weights, checked against the layout. */
export async function loadFluxWeights(
  path: string,
  maxModelBytes = 1024 ** 3,
): Promise<FluxWeights> {
  const header = await readModelHeader(path);
  const architecture = requireModelArchitecture(header);
  if (architecture.arch !== "flux") {
    throw new ModelFormatError(`${path}: not a FLUX.1 transformer (it is ${architecture.arch})`);
  }
  const flux: FluxModel = architecture.flux;
  const tensors = checkFluxTensors(header, flux).flatMap((s) => s.tensors);
  const total = tensors.reduce((sum, t) => sum + t.bytes, 0);
  if (total > maxModelBytes) {
    throw new RangeError(`${path}: ${total} bytes of weights is more than the reference loads`);
  }
  const out: FluxWeights = { config: flux.config, tensors: new Map(), types: new Map() };
  const fh = await fs.open(path, "r");
  try {
    for (const t of tensors) {
      const name = t.name.slice(flux.prefix.length);
      out.tensors.set(name, decodeStored(header.format, t, await readStored(fh, path, t)));
      out.types.set(name, t.dtype);
    }
  } finally {
    await fh.close();
  }
  return out;
}

/**
 * The inputs a native FLUX job generates from `seed` when the request gives none: img, txt and
 * vec are the k-th generated inputs (uniform in [−1, 1) from seed + k·2^32, as runner.cpp), and
 * img_ids the positions (0, row, column) of an h×w grid, h the largest divisor of L up to √L.
 */
export function fluxGeneratedInputs(job: FluxJob, seed: number | bigint = 0): FluxInputs {
  const { batch: B, tokens: L, contextTokens: T } = job;
  const base = normalizeSeed(seed);
  const uniform = (n: number, k: bigint) => {
    const out = new Float32Array(n);
    fillUniform(out, toU64((base + (k << 32n)) & ((1n << 64n) - 1n)));
    return out;
  };
  let h = 1;
  for (let d = 1; d * d <= L; d++) if (L % d === 0) h = d;
  const w = L / h;
  const ids = new Float32Array(B * L * 3);
  for (let b = 0; b < B; b++) {
    for (let l = 0; l < L; l++) {
      ids[(b * L + l) * 3 + 1] = Math.floor(l / w);
      ids[(b * L + l) * 3 + 2] = l % w;
    }
  }
  return {
    img: uniform(B * L * FLUX_CONSTANTS.channels, 0n),
    txt: uniform(B * T * FLUX_CONSTANTS.context, 1n),
    vec: uniform(B * FLUX_CONSTANTS.vec, 2n),
    img_ids: ids,
  };
}

/** BFL's get_schedule: linspace(1, 0, S+1), shifted by mu(L) when `shift`. */
export function fluxSchedule(steps: number, imageTokens: number, shift: boolean): number[] {
  const t = Array.from({ length: steps + 1 }, (_, i) => 1 - i / steps);
  if (!shift) return t;
  const m = (1.15 - 0.5) / (4096 - 256);
  const mu = m * imageTokens + (0.5 - m * 256);
  return t.map((v) => (v > 0 ? Math.exp(mu) / (Math.exp(mu) + (1 / v - 1)) : v));
}

/** ggml's timestep embedding of one (float32) value: [cos | sin], 256 wide. */
export function timestepEmbedding(value: number): Float64Array {
  const half = TIME_DIM / 2;
  const out = new Float64Array(TIME_DIM);
  const logMax = Math.fround(Math.log(MAX_PERIOD));
  for (let j = 0; j < half; j++) {
    const freq = Math.fround(Math.exp(Math.fround(Math.fround(-logMax * j) / half)));
    const arg = Math.fround(Math.fround(value) * freq);
    out[j] = Math.cos(arg);
    out[j + half] = Math.sin(arg);
  }
  return out;
}

const silu = (x: Float64Array) => x.map((v) => v / (1 + Math.exp(-v)));

/** Per row of d: LayerNorm without affine. */
function layerNorm(x: Float64Array, d: number): Float64Array {
  const y = new Float64Array(x.length);
  for (let o = 0; o < x.length; o += d) {
    let mean = 0;
    for (let k = 0; k < d; k++) mean += x[o + k]!;
    mean /= d;
    let v = 0;
    for (let k = 0; k < d; k++) v += (x[o + k]! - mean) ** 2;
    const s = 1 / Math.sqrt(v / d + EPS);
    for (let k = 0; k < d; k++) y[o + k] = (x[o + k]! - mean) * s;
  }
  return y;
}

class Forward {
  readonly H: number;
  readonly heads: number;
  constructor(
    readonly w: FluxWeights,
    readonly job: FluxJob,
  ) {
    this.H = w.config.hidden;
    this.heads = this.H / FLUX_CONSTANTS.headDim;
  }

  t(name: string): Float64Array {
    const v = this.w.tensors.get(name);
    if (!v) throw new ModelFormatError(`flux reference: missing tensor "${name}"`);
    return v;
  }

  /** A Linear layer `p` (p.weight, p.bias) on rows of x. */
  lin(p: string, x: Float64Array, rows: number): Float64Array {
    const b = this.t(`${p}.bias`);
    return linear(
      x,
      rows,
      { w: this.t(`${p}.weight`), type: this.w.types.get(`${p}.weight`) ?? "f32" },
      b,
      b.length,
    );
  }

  embedder(p: string, x: Float64Array, rows: number): Float64Array {
    return this.lin(`${p}.out_layer`, silu(this.lin(`${p}.in_layer`, x, rows)), rows);
  }

  /** (1 + scale)·LN(x) + shift over `rows` rows of one sample; mod chunks k (shift), k+1 (scale). */
  modulate(x: Float64Array, mod: Float64Array, k: number): Float64Array {
    const H = this.H;
    const y = layerNorm(x, H);
    for (let i = 0; i < y.length; i++) {
      const c = i % H;
      y[i] = (1 + mod[(k + 1) * H + c]!) * y[i]! + mod[k * H + c]!;
    }
    return y;
  }

  /** x += gate (chunk k of mod) · y, rows of one sample. */
  gated(x: Float64Array, y: Float64Array, mod: Float64Array, k: number): void {
    const H = this.H;
    for (let i = 0; i < x.length; i++) x[i] = x[i]! + mod[k * H + (i % H)]! * y[i]!;
  }

  /**
   * Heads of part `part` (0 q, 1 k, 2 v) of rows [n, width] starting at column part·H, as
   * [heads][n][128]; q and k RMS-normalised with `scale` and rotated by `pe`.
   */
  heads3(
    rows: Float64Array,
    n: number,
    part: number,
    scale: Float64Array | undefined,
    pe: Float64Array | undefined,
  ): Float64Array[] {
    const D = FLUX_CONSTANTS.headDim;
    const width = rows.length / n;
    const out: Float64Array[] = [];
    for (let h = 0; h < this.heads; h++) {
      const head = new Float64Array(n * D);
      for (let i = 0; i < n; i++) {
        const o = i * width + part * this.H + h * D;
        let ss = 0;
        for (let d = 0; d < D; d++) ss += rows[o + d]! ** 2;
        const r = scale ? 1 / Math.sqrt(ss / D + EPS) : 1;
        const v = new Float64Array(D);
        for (let d = 0; d < D; d++) v[d] = scale ? rows[o + d]! * r * scale[d]! : rows[o + d]!;
        if (pe) {
          for (let p = 0; p < D / 2; p++) {
            const c = pe[(i * (D / 2) + p) * 2]!;
            const s = pe[(i * (D / 2) + p) * 2 + 1]!;
            const a = v[2 * p]!;
            const b = v[2 * p + 1]!;
            v[2 * p] = a * c - b * s;
            v[2 * p + 1] = a * s + b * c;
          }
        }
        head.set(v, i * D);
      }
      out.push(head);
    }
    return out;
  }

  /** softmax(q·kᵀ/√128)·v per head; → [n, H]. */
  attend(q: Float64Array[], k: Float64Array[], v: Float64Array[], n: number): Float64Array {
    const D = FLUX_CONSTANTS.headDim;
    const out = new Float64Array(n * this.H);
    const scores = new Float64Array(n);
    for (let h = 0; h < this.heads; h++) {
      for (let i = 0; i < n; i++) {
        for (let j = 0; j < n; j++) {
          let dot = 0;
          for (let d = 0; d < D; d++) dot += q[h]![i * D + d]! * k[h]![j * D + d]!;
          scores[j] = dot / Math.sqrt(D);
        }
        softmaxInPlace(scores);
        for (let j = 0; j < n; j++) {
          const p = scores[j]!;
          for (let d = 0; d < D; d++) {
            out[i * this.H + h * D + d] = out[i * this.H + h * D + d]! + p * v[h]![j * D + d]!;
          }
        }
      }
    }
    return out;
  }

  /** RoPE angles of one sample's N = T + L tokens: [N][64 pairs][cos, sin]. */
  ropeTable(ids: Float32Array, b: number): Float64Array {
    const { tokens: L, contextTokens: T } = this.job;
    const D = FLUX_CONSTANTS.headDim;
    const pe = new Float64Array((T + L) * D);
    for (let n = 0; n < T + L; n++) {
      let pair = 0;
      for (let a = 0; a < 3; a++) {
        const dim = FLUX_CONSTANTS.axes[a]!;
        const pos = n < T ? 0 : ids[(b * L + n - T) * 3 + a]!;
        for (let j = 0; j < dim / 2; j++, pair++) {
          const angle = pos * Math.pow(FLUX_CONSTANTS.theta, (-2 * j) / dim);
          pe[(n * (D / 2) + pair) * 2] = Math.cos(angle);
          pe[(n * (D / 2) + pair) * 2 + 1] = Math.sin(angle);
        }
      }
    }
    return pe;
  }

  /** The velocity v(img, t) of every sample, [B, L, 64]. */
  velocity(img: Float64Array, t: number, inputs: FluxInputs): Float64Array {
    const { batch: B, tokens: L, contextTokens: T } = this.job;
    const H = this.H;
    const C = FLUX_CONSTANTS.channels;
    const N = T + L;
    const out = new Float64Array(B * L * C);
    const tf = Math.fround(Math.fround(t) * 1000);
    const gf = Math.fround(Math.fround(this.job.guidance ?? 3.5) * 1000);
    for (let b = 0; b < B; b++) {
      let cond = this.embedder("time_in", timestepEmbedding(tf), 1);
      if (this.w.config.guidance) {
        const g = this.embedder("guidance_in", timestepEmbedding(gf), 1);
        cond = cond.map((v, i) => v + g[i]!);
      }
      const y = this.embedder(
        "vector_in",
        Float64Array.from(
          inputs.vec.subarray(b * FLUX_CONSTANTS.vec, (b + 1) * FLUX_CONSTANTS.vec),
        ),
        1,
      );
      cond = cond.map((v, i) => v + y[i]!);
      const sc = silu(cond);
      let imgX = this.lin("img_in", img.subarray(b * L * C, (b + 1) * L * C), L);
      const ctx = FLUX_CONSTANTS.context;
      let txtX = this.lin(
        "txt_in",
        Float64Array.from(inputs.txt.subarray(b * T * ctx, (b + 1) * T * ctx)),
        T,
      );
      const pe = this.ropeTable(inputs.img_ids, b);
      for (let i = 0; i < this.w.config.depth; i++) {
        const p = `double_blocks.${i}`;
        const streams = [
          { name: "txt", x: txtX, n: T },
          { name: "img", x: imgX, n: L },
        ].map((s) => {
          const mod = this.lin(`${p}.${s.name}_mod.lin`, sc, 1);
          const qkv = this.lin(`${p}.${s.name}_attn.qkv`, this.modulate(s.x, mod, 0), s.n);
          return { ...s, mod, qkv };
        });
        // Joint attention: txt tokens then img tokens.
        const joined = new Float64Array(N * 3 * H);
        joined.set(streams[0]!.qkv, 0);
        joined.set(streams[1]!.qkv, T * 3 * H);
        const q = this.heads3(joined, N, 0, this.t(`${p}.txt_attn.norm.query_norm.scale`), pe);
        const k = this.heads3(joined, N, 1, this.t(`${p}.txt_attn.norm.key_norm.scale`), pe);
        // Each stream normalises its own tokens with its own scales.
        const qi = this.heads3(joined, N, 0, this.t(`${p}.img_attn.norm.query_norm.scale`), pe);
        const ki = this.heads3(joined, N, 1, this.t(`${p}.img_attn.norm.key_norm.scale`), pe);
        for (let h = 0; h < this.heads; h++) {
          q[h]!.set(qi[h]!.subarray(T * 128), T * 128);
          k[h]!.set(ki[h]!.subarray(T * 128), T * 128);
        }
        const v = this.heads3(joined, N, 2, undefined, undefined);
        const attn = this.attend(q, k, v, N);
        for (const [index, s] of streams.entries()) {
          const part = attn.subarray(index === 0 ? 0 : T * H, index === 0 ? T * H : N * H);
          this.gated(s.x, this.lin(`${p}.${s.name}_attn.proj`, part, s.n), s.mod, 2);
          const hidden = this.lin(`${p}.${s.name}_mlp.0`, this.modulate(s.x, s.mod, 3), s.n);
          this.gated(s.x, this.lin(`${p}.${s.name}_mlp.2`, hidden.map(geluTanh), s.n), s.mod, 5);
        }
        txtX = streams[0]!.x;
        imgX = streams[1]!.x;
      }
      const x = new Float64Array(N * H);
      x.set(txtX, 0);
      x.set(imgX, T * H);
      const M = FLUX_CONSTANTS.mlpRatio * H;
      for (let i = 0; i < this.w.config.depthSingle; i++) {
        const p = `single_blocks.${i}`;
        const mod = this.lin(`${p}.modulation.lin`, sc, 1);
        const h = this.lin(`${p}.linear1`, this.modulate(x, mod, 0), N);
        const q = this.heads3(h, N, 0, this.t(`${p}.norm.query_norm.scale`), pe);
        const k = this.heads3(h, N, 1, this.t(`${p}.norm.key_norm.scale`), pe);
        const v = this.heads3(h, N, 2, undefined, undefined);
        const attn = this.attend(q, k, v, N);
        const cat = new Float64Array(N * (H + M));
        for (let n = 0; n < N; n++) {
          cat.set(attn.subarray(n * H, (n + 1) * H), n * (H + M));
          for (let c = 0; c < M; c++) {
            cat[n * (H + M) + H + c] = geluTanh(h[n * (3 * H + M) + 3 * H + c]!);
          }
        }
        this.gated(x, this.lin(`${p}.linear2`, cat, N), mod, 2);
      }
      const mod = this.lin("final_layer.adaLN_modulation.1", sc, 1);
      const v = this.lin("final_layer.linear", this.modulate(x.subarray(T * H), mod, 0), L);
      out.set(v, b * L * C);
    }
    return out;
  }
}

/** A FLUX job in float64: the final img tokens [B, L, 64] as float32. */
export function runFluxReference(
  weights: FluxWeights,
  job: FluxJob,
  inputs: FluxInputs,
): Float32Array {
  const { batch: B, tokens: L, contextTokens: T } = job;
  const sizes: [keyof FluxInputs, number][] = [
    ["img", B * L * FLUX_CONSTANTS.channels],
    ["txt", B * T * FLUX_CONSTANTS.context],
    ["vec", B * FLUX_CONSTANTS.vec],
    ["img_ids", B * L * 3],
  ];
  for (const [name, n] of sizes) {
    if (inputs[name].length !== n) {
      throw new RangeError(
        `flux reference: ${name} has ${inputs[name].length} values, expected ${n}`,
      );
    }
  }
  const forward = new Forward(weights, job);
  const img = Float64Array.from(inputs.img);
  const t = fluxSchedule(job.steps, L, job.shift ?? false);
  for (let i = 0; i < job.steps; i++) {
    const v = forward.velocity(img, t[i]!, inputs);
    const dt = Math.fround(t[i + 1]! - t[i]!);
    for (let k = 0; k < img.length; k++) img[k] = img[k]! + dt * v[k]!;
  }
  return Float32Array.from(img);
}

/**
 * The model repository: the files under the scheduler's `--model-dir` directories, the only
 * files the scheduler reads and the only ones a job may name.
 *
 * A model is named by its path relative to its directory without the extension
 * (`dir/sub/tiny.safetensors` is "sub/tiny"); a file of the same name in a later directory is
 * shadowed by the earlier one (as on $PATH) and listed under its absolute path instead, and where
 * one directory holds both `x.safetensors` and `x.gguf`, the safetensors file is "x" and the
 * other "x.gguf". A job may also give a path: absolute, or relative to one of the directories.
 *
 * Every reference is resolved to a real path (symlinks followed) that must lie inside one of the
 * directories' real paths, and is then opened non-blocking and checked to be a regular file on
 * the open descriptor. A reference that does not resolve inside — `..`, a symlink out, a file
 * elsewhere, a file that does not exist — gets the same NOT_FOUND message, so the answer says
 * nothing about files outside the repository. Errors quote at most a short prefix of the
 * reference and never a file's bytes.
 */
import { promises as fs } from "node:fs";
import { extname, isAbsolute, join, relative, resolve, sep } from "node:path";
import { status } from "@grpc/grpc-js";
import type { ModelInfo } from "../../gen/ferry/v1/scheduler";
import { readModelHeader, type ModelHeader } from "../../lib/model/modelFile";
import { openRegularFile } from "../../lib/model/openRegularFile";
import { modelProfileFromHeader } from "../../lib/model/segments";
import type { ModelProfile } from "../../lib/model/profile";
import { MAX_MODEL_REF_LENGTH } from "../../lib/wire/limits";
import { StatusError } from "../../lib/wire/statusError";
import { checkString, quote } from "../../lib/wire/validate";
import { isFluxHeader } from "../../lib/model/flux";

const MODEL_EXTENSIONS = [".safetensors", ".gguf"];
/** A scan stops descending this deep and after this many directory entries. */
const MAX_SCAN_DEPTH = 8;
const MAX_SCAN_ENTRIES = 20_000;
/** Parsed headers kept (by path, size and mtime). */
const HEADER_CACHE_ENTRIES = 64;

/** A model reference resolved to a file inside the repository. */
export interface ResolvedModel {
  /** The real path (no symlinks): what executors open. */
  path: string;
  /** Its repository name, or its path when it has none (shadowed). */
  name: string;
  bytes: number;
  mtimeMs: number;
}

interface CachedHeader {
  size: number;
  mtimeMs: number;
  header?: ModelHeader;
  error?: Error;
}

export class ModelRepository {
  private readonly headers = new Map<string, CachedHeader>();

  private constructor(
    /** The directories' real paths, in the order given. */
    readonly dirs: readonly string[],
  ) {}

  /** Checks each directory exists and is a directory; throws naming the first that is not. */
  static async open(dirs: readonly string[]): Promise<ModelRepository> {
    const real: string[] = [];
    for (const dir of dirs) {
      let path: string;
      try {
        path = await fs.realpath(resolve(dir));
      } catch {
        throw new Error(`--model-dir ${dir}: no such directory`);
      }
      if (!(await fs.stat(path)).isDirectory()) {
        throw new Error(`--model-dir ${dir}: not a directory`);
      }
      if (!real.includes(path)) real.push(path);
    }
    return new ModelRepository(real);
  }

  private notFound(ref: string): StatusError {
    return new StatusError(
      status.NOT_FOUND,
      `model ${quote(ref)} is not in the model repository: name a model ListModels lists, or a file inside one of the scheduler's --model-dir directories`,
    );
  }

  private inside(real: string): boolean {
    return this.dirs.some((dir) => real.startsWith(dir + sep));
  }

  /**
   * Resolves a job's model reference (a name or a path) to a regular file inside the
   * repository, or throws NOT_FOUND (or FAILED_PRECONDITION when there is no repository).
   */
  async resolve(ref: string): Promise<ResolvedModel> {
    checkString("model", ref, MAX_MODEL_REF_LENGTH);
    if (ref === "") throw new StatusError(status.INVALID_ARGUMENT, "model_path is required");
    if (this.dirs.length === 0) {
      throw new StatusError(
        status.FAILED_PRECONDITION,
        "the scheduler has no model repository: start it with --model-dir DIR (repeatable)",
      );
    }
    const candidates = isAbsolute(ref)
      ? [ref]
      : this.dirs.flatMap((dir) => [
          ...MODEL_EXTENSIONS.map((ext) => join(dir, ref + ext)),
          join(dir, ref),
        ]);
    for (const candidate of candidates) {
      let real: string;
      try {
        real = await fs.realpath(candidate);
      } catch {
        continue;
      }
      if (!this.inside(real)) continue;
      let bytes: number;
      let mtimeMs: number;
      try {
        const { fh, info } = await openRegularFile(real);
        try {
          bytes = info.size;
          mtimeMs = info.mtimeMs;
        } finally {
          await fh.close();
        }
      } catch (error) {
        if ((error as Error).name === "ModelFormatError") {
          throw new StatusError(
            status.INVALID_ARGUMENT,
            `model ${quote(ref)} is not a regular file (a directory, FIFO or device)`,
          );
        }
        continue;
      }
      return { path: real, name: this.nameOf(real), bytes, mtimeMs };
    }
    throw this.notFound(ref);
  }

  /** The repository name of a file inside (its relative path without the extension). */
  nameOf(real: string): string {
    const dir = this.dirs.find((d) => real.startsWith(d + sep));
    if (!dir) return real;
    const rel = relative(dir, real).split(sep).join("/");
    const ext = extname(rel);
    return MODEL_EXTENSIONS.includes(ext) ? rel.slice(0, -ext.length) : rel;
  }

  /** The file's header, parsed once per (path, size, mtime). */
  async header(model: ResolvedModel): Promise<ModelHeader> {
    const cached = this.headers.get(model.path);
    if (cached && cached.size === model.bytes && cached.mtimeMs === model.mtimeMs) {
      // Refresh its place in the LRU order.
      this.headers.delete(model.path);
      this.headers.set(model.path, cached);
      if (cached.error) throw cached.error;
      return cached.header!;
    }
    const entry: CachedHeader = { size: model.bytes, mtimeMs: model.mtimeMs };
    try {
      entry.header = await readModelHeader(model.path);
    } catch (error) {
      if ((error as Error).name !== "ModelFormatError") throw error;
      entry.error = error as Error;
    }
    this.headers.set(model.path, entry);
    for (const key of this.headers.keys()) {
      if (this.headers.size <= HEADER_CACHE_ENTRIES) break;
      this.headers.delete(key);
    }
    if (entry.error) throw entry.error;
    return entry.header!;
  }

  /**
   * The model's base segments for a job of `batch` × `tokens` (FLUX: image tokens, with
   * `contextTokens` text tokens); ModelFormatError if no known architecture.
   */
  async profile(
    model: ResolvedModel,
    batch: number,
    tokens: number,
    contextTokens = 0,
  ): Promise<ModelProfile> {
    return modelProfileFromHeader(await this.header(model), { batch, tokens, contextTokens });
  }

  /** Every model file in the repository, by directory order then path. */
  async list(): Promise<ModelInfo[]> {
    const models: ModelInfo[] = [];
    const named = new Map<string, string>();
    let budget = MAX_SCAN_ENTRIES;
    const files: string[] = [];
    const walk = async (dir: string, depth: number): Promise<void> => {
      if (depth > MAX_SCAN_DEPTH) return;
      let entries;
      try {
        entries = await fs.readdir(dir, { withFileTypes: true });
      } catch {
        return;
      }
      entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
      for (const entry of entries) {
        if (--budget < 0) return;
        const path = join(dir, entry.name);
        if (entry.isDirectory()) await walk(path, depth + 1);
        else if (MODEL_EXTENSIONS.includes(extname(entry.name))) files.push(path);
      }
    };
    for (const dir of this.dirs) {
      const start = files.length;
      await walk(dir, 0);
      // safetensors before gguf of the same name, so the safetensors file gets the bare name.
      const mine = files.slice(start).sort((a, b) => {
        const [ka, kb] = [a.slice(0, -extname(a).length), b.slice(0, -extname(b).length)];
        return ka < kb ? -1 : ka > kb ? 1 : extname(a) === ".safetensors" ? -1 : 1;
      });
      for (const file of mine) {
        let real: string;
        let info;
        try {
          real = await fs.realpath(file);
          info = await fs.stat(real);
        } catch {
          continue;
        }
        // Symlinks out of the repository, and anything but a regular file, are not models.
        if (!this.inside(real) || !info.isFile()) continue;
        const rel = relative(dir, file).split(sep).join("/");
        let name = rel.slice(0, -extname(rel).length);
        // Taken in this directory (x.safetensors beside x.gguf): the name with its extension,
        // which resolve() finds; taken by an earlier directory (shadowed): the absolute path.
        const owner = named.get(name);
        if (owner !== undefined) name = owner === dir ? rel : real;
        named.set(name, dir);
        models.push(
          await this.describe({ path: real, name, bytes: info.size, mtimeMs: info.mtimeMs }),
        );
      }
    }
    return models;
  }

  private async describe(model: ResolvedModel): Promise<ModelInfo> {
    const info: ModelInfo = {
      name: model.name,
      path: model.path,
      architecture: "",
      format: extname(model.path).slice(1),
      bytes: model.bytes,
      dtype: "",
      paramBytes: 0,
      error: "",
    };
    try {
      const header = await this.header(model);
      info.format = header.format;
      const dtypes = new Set(header.tensors.map((t) => t.dtype));
      info.dtype = dtypes.size === 1 ? [...dtypes][0] : dtypes.size === 0 ? "" : "mixed";
      info.paramBytes = header.tensors.reduce((sum, t) => sum + t.bytes, 0);
      if (header.ditConfig) info.architecture = "ferry-dit";
      else if (header.fluxModel || isFluxHeader(header)) info.architecture = "flux";
      else {
        info.architecture =
          header.format === "gguf"
            ? (header.metadata["general.architecture"] ?? "")
            : (header.metadata["ferry.arch"] ?? "");
        info.error = "not a model Ferry runs (Ferry runs ferry-dit models and FLUX.1 transformers)";
      }
      if (info.architecture === "ferry-dit" || info.architecture === "flux") {
        try {
          // Awaited: on the ggml native layer, profiles are measured by the addon, asynchronously.
          await modelProfileFromHeader(header, { batch: 1, tokens: 1 });
        } catch (error) {
          info.error = shortError(error);
        }
      }
    } catch (error) {
      info.error = shortError(error);
    }
    info.architecture = info.architecture.slice(0, 64);
    return info;
  }
}

/** A reader's message, without the path it starts with, cut short. */
function shortError(error: unknown): string {
  const message = (error as Error)?.message ?? String(error);
  const stripped = message.replace(/^[^:]*: /, "");
  return stripped.length > 200 ? `${stripped.slice(0, 200)}…` : stripped;
}

#!/usr/bin/env node
// Builds everything a fresh clone needs, in order: protos → TypeScript stubs (buf + ts-proto),
// ggml's sources, the native addon and its ctest suite (cmake-js, ggml as a CMake subproject),
// then the TypeScript (tsc). `npm ci` runs this through `prepare`; `--only proto|native|ts` runs
// one stage.
//
// ggml comes from the npm package node-llama-cpp (pinned exactly in package.json): it ships
// llama/gitRelease.bundle, a git bundle of the llama.cpp release it was built from, whose ggml/
// directory is extracted once into deps/ggml/ (nothing is downloaded here; not under build/,
// which cmake-js may wipe). FERRY_GGML_DIR
// points at another ggml checkout instead. FERRY_CUDA=1 builds ggml's CUDA backend too (it needs
// the CUDA toolkit with cuBLAS); FERRY_PORTABLE=1 builds without -march=native.
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { GGML_FIXES } from "./ggml-fixes.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const bin = (name) => join(root, "node_modules", ".bin", name);
const onlyIndex = process.argv.indexOf("--only");
const only = onlyIndex >= 0 ? process.argv[onlyIndex + 1] : undefined;

function run(label, command, args, options = {}) {
  process.stderr.write(`[ferry build] ${label}\n`);
  const result = spawnSync(command, args, { cwd: root, stdio: "inherit", ...options });
  if (result.error) {
    fail(`${label}: could not start ${command}: ${result.error.message}`);
  }
  if (result.status !== 0) {
    fail(`${label} failed (exit ${result.status}).`);
  }
}

function fail(message) {
  process.stderr.write(`\n[ferry build] ERROR: ${message}\n`);
  process.exit(1);
}

function requireTool(command, args, hint) {
  const probe = spawnSync(command, args, { stdio: "ignore" });
  if (probe.error || probe.status !== 0) {
    fail(`'${command}' was not found, and Ferry's native addon needs it. ${hint}`);
  }
}

function buildProto() {
  rmSync(join(root, "gen"), { recursive: true, force: true });
  run("protos → gen/ (buf generate, ts-proto)", bin("buf"), ["generate"]);
}

/** Where ggml's sources are: FERRY_GGML_DIR, or deps/ggml extracted from the bundle. */
function ggmlSources() {
  const override = process.env.FERRY_GGML_DIR;
  if (override) {
    if (
      !existsSync(join(override, "CMakeLists.txt")) ||
      !existsSync(join(override, "include", "ggml.h"))
    ) {
      fail(
        `FERRY_GGML_DIR=${override} is not a ggml checkout (no CMakeLists.txt and include/ggml.h there).`,
      );
    }
    return override;
  }
  const bundle = join(root, "node_modules", "node-llama-cpp", "llama", "gitRelease.bundle");
  if (!existsSync(bundle)) {
    fail(
      `${bundle} is missing: run \`npm ci\` (the node-llama-cpp package carries ggml's sources), or set FERRY_GGML_DIR to a ggml checkout.`,
    );
  }
  const dest = join(root, "deps", "ggml");
  const stamp = join(dest, ".ferry-bundle-sha256");
  // The bundle and the fixes applied to it: either changing extracts again.
  const digest = createHash("sha256")
    .update(readFileSync(bundle))
    .update(JSON.stringify(GGML_FIXES))
    .digest("hex");
  if (existsSync(stamp) && readFileSync(stamp, "utf8").trim() === digest) return dest;
  requireTool(
    "git",
    ["--version"],
    "Install git (Debian: apt-get install git): ggml is extracted from a git bundle.",
  );
  const scratch = join(root, "deps", "ggml-bundle.git");
  const partial = `${dest}.partial`;
  rmSync(scratch, { recursive: true, force: true });
  rmSync(partial, { recursive: true, force: true });
  mkdirSync(partial, { recursive: true });
  run("ggml sources ← node-llama-cpp's llama.cpp bundle", "git", [
    "clone",
    "--quiet",
    "--bare",
    bundle,
    scratch,
  ]);
  // git archive | tar, without a shell: the archive goes through a buffer (ggml/ is ~10 MB).
  const archive = spawnSync(
    "git",
    ["--git-dir", scratch, "archive", "--format=tar", "HEAD", "ggml"],
    {
      cwd: root,
      maxBuffer: 1 << 30,
    },
  );
  if (archive.status !== 0) fail(`git archive of the bundle failed: ${archive.stderr}`);
  const untar = spawnSync("tar", ["-x", "--strip-components=1", "-C", partial], {
    input: archive.stdout,
  });
  if (untar.status !== 0) fail(`extracting ggml from the bundle failed: ${untar.stderr}`);
  for (const fix of GGML_FIXES) {
    const file = join(partial, fix.file);
    const text = readFileSync(file, "utf8");
    const at = text.indexOf(fix.find);
    if (at < 0 || text.indexOf(fix.find, at + 1) >= 0) {
      fail(
        `ggml fix for ${fix.file} (${fix.why}) does not apply to this ggml: see scripts/ggml-fixes.mjs (drop it if upstream fixed it).`,
      );
    }
    writeFileSync(file, text.slice(0, at) + fix.replace + text.slice(at + fix.find.length));
    console.log(`[ferry build] ggml fix applied to ${fix.file}: ${fix.why}`);
  }
  rmSync(scratch, { recursive: true, force: true });
  rmSync(dest, { recursive: true, force: true });
  renameSync(partial, dest);
  writeFileSync(stamp, `${digest}\n`);
  return dest;
}

function buildNative() {
  requireTool("cmake", ["--version"], "Install CMake ≥ 3.18 (Debian: apt-get install cmake).");
  const cxx = process.env.CXX ?? "c++";
  requireTool(cxx, ["--version"], "Install a C++17 compiler (Debian: apt-get install g++).");
  const parallel = String(Math.max(1, Number(process.env.FERRY_BUILD_JOBS ?? 2)));
  run("native addon + ctest suite → build/ (cmake-js)", bin("cmake-js"), [
    "compile",
    "--out",
    "build",
    "--config",
    process.env.FERRY_BUILD_TYPE ?? "Release",
    "--parallel",
    parallel,
    "--CDFERRY_BUILD_TESTS=ON",
    `--CDFERRY_GGML_DIR=${ggmlSources()}`,
    `--CDFERRY_CUDA=${process.env.FERRY_CUDA === "1" ? "ON" : "OFF"}`,
    `--CDFERRY_PORTABLE=${process.env.FERRY_PORTABLE === "1" ? "ON" : "OFF"}`,
  ]);
}

function buildTs() {
  run("TypeScript → dist/ (tsc)", bin("tsc"), ["-p", "tsconfig.build.json"]);
}

const stages = { proto: buildProto, native: buildNative, ts: buildTs };
if (only) {
  if (!stages[only]) fail(`unknown stage '${only}' (expected proto, native or ts)`);
  stages[only]();
} else {
  buildProto();
  buildNative();
  buildTs();
}

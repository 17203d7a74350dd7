import { readdirSync } from "node:fs";
import { join } from "node:path";
import { loadSync, type PackageDefinition } from "@grpc/proto-loader";
import { packageRoot } from "../packageInfo";

/** Where the project's .proto files live (shipped beside dist/ in the package and the image). */
export function protoRoot(): string {
  return join(packageRoot(), "proto");
}

/**
 * Every `proto/ferry/v1/*.proto` as @grpc/proto-loader reads it: what server reflection serves,
 * so stock tools (grpcurl, grpcui) can call the scheduler without the files.
 */
export function ferryPackageDefinition(): PackageDefinition {
  const dir = join(protoRoot(), "ferry", "v1");
  const files = readdirSync(dir)
    .filter((name) => name.endsWith(".proto"))
    .map((name) => join("ferry", "v1", name));
  return loadSync(files, {
    includeDirs: [protoRoot()],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
}

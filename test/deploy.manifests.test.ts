import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { Command } from "commander";
import { describe, expect, it } from "vitest";
import { parseAllDocuments } from "yaml";
import { buildProgram } from "../cli/ferry";
import {
  resolveClientConfig,
  resolveExecutorConfig,
  resolveServeConfig,
  type ClientFlags,
  type ExecutorFlags,
  type ServeFlags,
} from "../lib/config/config";
import { packageRoot } from "../lib/packageInfo";

const deployDir = join(packageRoot(), "deploy");

interface Container {
  name: string;
  image: string;
  command?: string[];
  args?: string[];
  env?: { name: string; value?: string; valueFrom?: unknown }[];
  resources?: { limits?: Record<string, unknown> };
  volumeMounts?: { name: string; mountPath: string }[];
  readinessProbe?: { exec?: { command: string[] } };
  livenessProbe?: { exec?: { command: string[] } };
}

type Manifest = {
  kind: string;
  metadata: { name: string };
  spec?: {
    template?: {
      spec: {
        containers: Container[];
        volumes?: {
          name: string;
          secret?: { secretName: string };
          persistentVolumeClaim?: { claimName: string };
        }[];
      };
    };
  };
};

function manifests(): Manifest[] {
  const dir = join(deployDir, "k8s");
  return readdirSync(dir)
    .filter((name) => name.endsWith(".yaml"))
    .flatMap((name) =>
      parseAllDocuments(readFileSync(join(dir, name), "utf8")).map((doc) => {
        expect(doc.errors, name).toEqual([]);
        return doc.toJS() as Manifest;
      }),
    );
}

/** The image's ENTRYPOINT and CMD (JSON form), from the Dockerfile. */
function dockerfile(): { entrypoint: string[]; cmd: string[] } {
  const text = readFileSync(join(deployDir, "Dockerfile"), "utf8");
  const json = (instruction: string) => {
    const line = text.split("\n").find((l) => l.startsWith(`${instruction} `));
    expect(line, instruction).toBeDefined();
    return JSON.parse(line!.slice(instruction.length + 1)) as string[];
  };
  return { entrypoint: json("ENTRYPOINT"), cmd: json("CMD") };
}

/**
 * Parses a `ferry …` command line with the real CLI, every action replaced by one that only
 * validates the flags into the command's typed config (nothing runs, no file is read).
 */
async function parseFerry(argv: string[]): Promise<{ command: string; config: unknown }> {
  const program = buildProgram();
  let parsed: { command: string; config: unknown } | undefined;
  const visit = (command: Command) => {
    command.exitOverride();
    command.configureOutput({ writeErr: () => {}, writeOut: () => {} });
    command.action(function (this: Command) {
      const flags = this.opts();
      const name = this.name();
      const config =
        name === "serve"
          ? resolveServeConfig(flags as ServeFlags)
          : name === "executor"
            ? resolveExecutorConfig(flags as ExecutorFlags)
            : "scheduler" in flags
              ? resolveClientConfig(flags as ClientFlags)
              : flags;
      parsed = { command: name, config };
    });
    for (const sub of command.commands) visit(sub);
  };
  for (const sub of program.commands) visit(sub);
  program.exitOverride();
  await program.parseAsync(argv, { from: "user" });
  expect(parsed, argv.join(" ")).toBeDefined();
  return parsed!;
}

/** Kubernetes' $(VAR) expansion from the container's env (fieldRefs get a sample value). */
function expand(args: string[], container: Container): string[] {
  const env = new Map(
    (container.env ?? []).map((e) => [e.name, e.value ?? `sample-${e.name.toLowerCase()}`]),
  );
  return args.map((arg) =>
    arg.replace(/\$\(([A-Z_][A-Z0-9_]*)\)/g, (_, name: string) => env.get(name) ?? `$(${name})`),
  );
}

describe("the deployment", () => {
  const all = manifests();
  const { entrypoint, cmd } = dockerfile();
  const byKind = (kind: string, name: string) =>
    all.find((m) => m.kind === kind && m.metadata.name === name);

  it("has a scheduler Deployment and Service, an executor DaemonSet on GPUs, and the model volume", () => {
    const scheduler = byKind("Deployment", "ferry-scheduler")!;
    const service = byKind("Service", "ferry-scheduler")!;
    const executor = byKind("DaemonSet", "ferry-executor")!;
    expect(scheduler && service && executor).toBeTruthy();
    const gpu = executor.spec!.template!.spec.containers[0].resources?.limits?.["nvidia.com/gpu"];
    expect(gpu).toBe(1);
    for (const workload of [scheduler, executor]) {
      const pod = workload.spec!.template!.spec;
      const mounts = pod.containers[0].volumeMounts ?? [];
      expect(mounts.find((m) => m.name === "models")?.mountPath).toBe("/models");
      // Token and TLS come from Secrets that secrets.example.yaml describes.
      const secrets = (pod.volumes ?? []).flatMap((v) => (v.secret ? [v.secret.secretName] : []));
      expect(secrets).toContain("ferry-token");
      for (const secret of secrets) expect(byKind("Secret", secret), secret).toBeDefined();
      const claims = (pod.volumes ?? []).flatMap((v) =>
        v.persistentVolumeClaim ? [v.persistentVolumeClaim.claimName] : [],
      );
      for (const claim of claims)
        expect(byKind("PersistentVolumeClaim", claim), claim).toBeDefined();
    }
    const probe = scheduler.spec!.template!.spec.containers[0].readinessProbe?.exec?.command;
    expect(probe?.slice(2, 3)).toEqual(["health"]);
  });

  it("runs every command line they contain through the CLI's parser", async () => {
    expect(entrypoint.slice(-1)[0]).toMatch(/dist\/cli\/ferry\.js$/);
    const lines: { where: string; argv: string[] }[] = [{ where: "Dockerfile CMD", argv: cmd }];
    for (const manifest of all) {
      for (const container of manifest.spec?.template?.spec.containers ?? []) {
        const where = `${manifest.kind}/${manifest.metadata.name}/${container.name}`;
        expect(container.command, `${where}: the image's entrypoint runs ferry`).toBeUndefined();
        lines.push({ where, argv: expand(container.args ?? [], container) });
        for (const probe of [container.readinessProbe, container.livenessProbe]) {
          const command = probe?.exec?.command;
          if (!command) continue;
          // A probe runs the entrypoint itself.
          expect(command.slice(0, entrypoint.length)).toEqual(entrypoint);
          lines.push({ where: `${where} probe`, argv: command.slice(entrypoint.length) });
        }
      }
    }
    const commands: string[] = [];
    for (const { where, argv } of lines) {
      const parsed = await parseFerry(argv).catch((error: Error) => {
        throw new Error(`${where}: ferry ${argv.join(" ")}: ${error.message}`);
      });
      commands.push(parsed.command);
      if (parsed.command === "executor") {
        expect((parsed.config as { id: string }).id).toBe("sample-node_name");
      }
    }
    expect(commands.sort()).toEqual(["executor", "health", "health", "serve", "serve"]);
  });

  it("catches a command line the CLI would refuse", async () => {
    await expect(parseFerry(["serve", "--no-such-flag"])).rejects.toThrow(/unknown option/);
    await expect(parseFerry(["serve", "--retention", "forever"])).rejects.toThrow(/--retention/);
    await expect(parseFerry(["executor", "--device", "tpu"])).rejects.toThrow(/--device/);
  });
});

import type { Command } from "commander";
import type { ClientFlags } from "../../lib/config/config";
import { formatBytes } from "../../lib/config/units";
import { action } from "../action";
import { addConnectionOptions, clientFromFlags } from "./connection";

/** Adds `models` (list, load, unload): the scheduler's model repository. */
export function register(program: Command): void {
  const models = program.command("models").description("the scheduler's model repository");
  addConnectionOptions(
    models
      .command("list", { isDefault: true })
      .description("every model in the repository (--model-dir)")
      .option("--json", "print JSON"),
  ).action(
    action("models list", async (flags: ClientFlags & { json?: boolean }) => {
      const client = clientFromFlags(flags);
      try {
        const list = await client.listModels();
        if (flags.json) {
          process.stdout.write(`${JSON.stringify(list, null, 2)}\n`);
          return;
        }
        for (const model of list) {
          process.stdout.write(
            `${model.name.padEnd(32)} ${(model.architecture || "?").padEnd(10)} ${model.format.padEnd(12)} ` +
              `${model.dtype.padEnd(6)} ${formatBytes(model.bytes).padStart(10)}` +
              `${model.error ? `  (${model.error})` : ""}\n`,
          );
        }
      } finally {
        client.close();
      }
    }),
  );
  addConnectionOptions(
    models
      .command("load <model>")
      .description("warm a model on an executor: host params cache (and --resident segments)")
      .option("--executor <id>", "the executor (default: the one placement would choose)")
      .option("--resident", "also leave the plan's resident segments on the device"),
  ).action(
    action(
      "models load",
      async (model: string, flags: ClientFlags & { executor?: string; resident?: boolean }) => {
        const client = clientFromFlags(flags);
        try {
          const loaded = await client.loadModel(model, {
            executorId: flags.executor,
            resident: flags.resident,
          });
          process.stdout.write(
            `${loaded.modelPath} warm on ${loaded.executorId}: ${formatBytes(loaded.hostCacheBytes)} in host memory, ` +
              `${formatBytes(loaded.residentBytes)} resident on the device\n`,
          );
        } finally {
          client.close();
        }
      },
    ),
  );
  addConnectionOptions(
    models
      .command("unload <model>")
      .description("evict a model from an executor, or from every executor that has it open")
      .option("--executor <id>", "only from this executor"),
  ).action(
    action("models unload", async (model: string, flags: ClientFlags & { executor?: string }) => {
      const client = clientFromFlags(flags);
      try {
        const from = await client.unloadModel(model, flags.executor ?? "");
        process.stdout.write(`evicted from ${from.length ? from.join(", ") : "no executor"}\n`);
      } finally {
        client.close();
      }
    }),
  );
}

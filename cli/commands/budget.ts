import type { Command } from "commander";
import type { ClientFlags } from "../../lib/config/config";
import { formatBytes, parseBytes } from "../../lib/config/units";
import { action } from "../action";
import { addConnectionOptions, clientFromFlags } from "./connection";

/**
 * Adds `budget <executor> <size>`: sets an executor's device memory budget (SetBudget). Idle
 * models' cached weights over it go at once; running jobs swap to plans that fit at their next
 * step boundary.
 */
export function register(program: Command): void {
  addConnectionOptions(
    program
      .command("budget <executor> <size>")
      .description(
        "set an executor's device memory budget (e.g. 768MiB); running jobs re-plan at their next step",
      )
      .option("--json", "print JSON"),
  ).action(
    action(
      "budget",
      async (executor: string, size: string, flags: ClientFlags & { json?: boolean }) => {
        const bytes = parseBytes(size);
        const client = clientFromFlags(flags);
        try {
          const response = await client.setBudget(executor, bytes);
          if (flags.json) {
            process.stdout.write(`${JSON.stringify(response, null, 2)}\n`);
            return;
          }
          const info = response.executor;
          process.stdout.write(
            `${executor}: budget ${formatBytes(info?.budgetBytes ?? bytes)}, ${formatBytes(info?.usedBytes ?? 0)} in use; ` +
              `re-planned ${response.replannedJobIds.length} running job(s)` +
              (response.unchangedJobIds.length > 0
                ? `; no plan fits for ${response.unchangedJobIds.join(", ")} (they keep theirs until they end)`
                : "") +
              "\n",
          );
        } finally {
          client.close();
        }
      },
    ),
  );
}

#!/usr/bin/env node
import { Command } from "commander";
import { ferryVersion } from "../lib/packageInfo";
import * as bench from "./commands/bench";
import * as budget from "./commands/budget";
import * as demo from "./commands/demo";
import * as executor from "./commands/executor";
import * as genModel from "./commands/genModel";
import * as health from "./commands/health";
import * as inspect from "./commands/inspect";
import * as jobs from "./commands/jobs";
import * as models from "./commands/models";
import * as plan from "./commands/plan";
import * as run from "./commands/run";
import * as serve from "./commands/serve";
import * as trace from "./commands/trace";

/** The `ferry` command line: one subcommand per file under cli/commands/. */
export function buildProgram(): Command {
  const program = new Command("ferry")
    .description("Run models that do not fit in GPU memory: plan, stream, trace.")
    .version(ferryVersion())
    .showHelpAfterError();
  for (const command of [
    demo,
    serve,
    executor,
    run,
    jobs,
    models,
    budget,
    plan,
    genModel,
    inspect,
    bench,
    trace,
    health,
  ])
    command.register(program);
  return program;
}

if (require.main === module) {
  buildProgram()
    .parseAsync(process.argv)
    .catch((error: unknown) => {
      process.stderr.write(`ferry: ${(error as Error).message ?? String(error)}\n`);
      process.exitCode = 1;
    });
}

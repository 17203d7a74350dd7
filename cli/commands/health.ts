import {
  loadPackageDefinition,
  Metadata,
  type ChannelCredentials,
  type Client,
  type ServiceError,
} from "@grpc/grpc-js";
import { loadSync } from "@grpc/proto-loader";
import type { Command } from "commander";
import { protoPath } from "grpc-health-check";
import { resolveClientConfig, type ClientFlags } from "../../lib/config/config";
import { channelCredentials } from "../../lib/wire/credentials";
import { action } from "../action";
import { addConnectionOptions } from "./connection";

interface HealthFlags extends ClientFlags {
  service: string;
  timeout: string;
}

type HealthClient = Client & {
  check(
    request: { service: string },
    metadata: Metadata,
    options: { deadline: number },
    callback: (error: ServiceError | null, response: { status: string }) => void,
  ): void;
};

/** The scheduler's grpc.health.v1 status of `service` ("" = the server as a whole). */
export async function checkHealth(
  address: string,
  creds: ChannelCredentials,
  service = "",
  timeoutMs = 5000,
): Promise<string> {
  const definition = loadSync(protoPath, { enums: String });
  const pkg = loadPackageDefinition(definition) as unknown as {
    grpc: { health: { v1: { Health: new (a: string, c: ChannelCredentials) => HealthClient } } };
  };
  const client = new pkg.grpc.health.v1.Health(address, creds);
  try {
    return await new Promise((resolve, reject) =>
      client.check(
        { service },
        new Metadata(),
        { deadline: Date.now() + timeoutMs },
        (error, response) =>
          error ? reject(new Error(error.details || error.message)) : resolve(response.status),
      ),
    );
  } finally {
    client.close();
  }
}

/** Adds `health`: exits 0 when the scheduler is SERVING (a probe for Kubernetes and scripts). */
export function register(program: Command): void {
  const command = program
    .command("health")
    .description("check the scheduler's gRPC health (exit 0 when SERVING), e.g. as a probe")
    .option("--service <name>", "the service to ask about; empty = the server", "")
    .option("--timeout <ms>", "give up after this long", "5000");
  addConnectionOptions(command).action(
    action("health", async (flags: HealthFlags) => {
      const config = resolveClientConfig(flags);
      const state = await checkHealth(
        config.scheduler,
        channelCredentials(config.tls),
        flags.service,
        Number(flags.timeout) || 5000,
      );
      process.stdout.write(`${state}\n`);
      if (state !== "SERVING") process.exitCode = 1;
    }),
  );
}

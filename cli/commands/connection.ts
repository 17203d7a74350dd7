import type { Command } from "commander";
import { ferryDefaults, resolveClientConfig, type ClientFlags } from "../../lib/config/config";
import { SchedulerClient } from "../../lib/client/schedulerClient";
import { loadToken } from "../../lib/wire/credentials";

/** The flags every command that dials the scheduler shares: address, token, TLS. */
export function addConnectionOptions(command: Command): Command {
  const defaults = ferryDefaults();
  return command
    .option("--scheduler <host:port>", "scheduler address (FERRY_SCHEDULER)", defaults.scheduler)
    .option(
      "--token-file <path>",
      "send this bearer token (FERRY_TOKEN holds one directly; FERRY_TOKEN_FILE names a file)",
      defaults.tokenFile,
    )
    .option("--tls-ca <pem>", "dial TLS, trusting this CA (FERRY_TLS_CA)", defaults.tlsCa)
    .option("--tls-cert <pem>", "client certificate for mTLS (FERRY_TLS_CERT)", defaults.tlsCert)
    .option("--tls-key <pem>", "its key (FERRY_TLS_KEY)", defaults.tlsKey);
}

/** A client of the scheduler from those flags. */
export function clientFromFlags(flags: ClientFlags): SchedulerClient {
  const config = resolveClientConfig(flags);
  return new SchedulerClient(config.scheduler, {
    token: loadToken(config.tokenFile),
    tls: config.tls,
  });
}

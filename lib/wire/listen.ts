import type { Server, ServerCredentials } from "@grpc/grpc-js";

/**
 * Binds a gRPC server to HOST:PORT (port 0: any free one) and resolves to the address it listens
 * on (an empty host is loopback). The error names the address, after `setting` when given (the
 * flag it came from).
 */
export async function bindServer(
  server: Server,
  address: string,
  credentials: ServerCredentials,
  setting = "",
): Promise<string> {
  const port = await new Promise<number>((resolvePort, reject) => {
    server.bindAsync(address, credentials, (error, bound) =>
      error
        ? reject(
            new Error(
              `${setting ? `${setting}: ` : ""}cannot listen on ${address}: ${error.message}`,
            ),
          )
        : resolvePort(bound),
    );
  });
  const host = address.slice(0, address.lastIndexOf(":")) || "127.0.0.1";
  return `${host}:${port}`;
}

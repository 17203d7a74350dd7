import { status } from "@grpc/grpc-js";
import { StatusError } from "./statusError";

/** Where a request that could not be decoded carries why (see {@link tolerantDecoding}). */
const DECODE_ERROR = "ferryDecodeError";

/**
 * The service definition with decoders that do not throw: a message that cannot be decoded
 * (a uint64 of 2^53 or more, which JavaScript numbers cannot hold exactly) reaches the handler
 * marked, and is refused there with INVALID_ARGUMENT instead of grpc-js's bare INTERNAL.
 */
export function tolerantDecoding<
  T extends Record<string, { requestDeserialize: (b: Buffer) => unknown }>,
>(definition: T): T {
  const out: Record<string, unknown> = {};
  for (const [name, method] of Object.entries(definition)) {
    out[name] = {
      ...method,
      requestDeserialize: (bytes: Buffer) => {
        try {
          return method.requestDeserialize(bytes);
        } catch (error) {
          return { [DECODE_ERROR]: (error as Error).message };
        }
      },
    };
  }
  return out as T;
}

/** Throws INVALID_ARGUMENT for a request {@link tolerantDecoding} could not decode. */
export function checkDecoded(request: unknown): void {
  const problem = (request as Record<string, unknown> | undefined)?.[DECODE_ERROR];
  if (typeof problem === "string") {
    throw new StatusError(
      status.INVALID_ARGUMENT,
      `the request could not be decoded: ${problem.slice(0, 120)} (integers must be below 2^53)`,
    );
  }
}

/**
 * Who may talk to the scheduler: TLS (server certificate; client certificates for executors when
 * a client CA is given) and a shared bearer token. One place for both sides, so the scheduler,
 * the executors and the clients agree.
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { readFileSync } from "node:fs";
import {
  credentials,
  experimental,
  InterceptingCall,
  Metadata,
  ServerCredentials,
  ServerInterceptingCall,
  ServerListenerBuilder,
  status,
  type ChannelCredentials,
  type Interceptor,
  type ServerInterceptor,
} from "@grpc/grpc-js";

/** The scheduler's TLS files (PEM). */
export interface ServerTlsFiles {
  certFile: string;
  keyFile: string;
  /**
   * CA that signs executors' client certificates. When set, clients are asked for a
   * certificate and an executor's Connect is refused without one signed by this CA; other calls
   * may come without one (they are authorised by the token).
   */
  clientCaFile?: string;
}

/** A client's (executor's, `ferry run`'s) TLS files (PEM). */
export interface ClientTlsFiles {
  /** CA that signed the scheduler's certificate; unset = the system's roots. */
  caFile?: string;
  /** Client certificate and key (mTLS; executors need them when the scheduler has a client CA). */
  certFile?: string;
  keyFile?: string;
}

/** Reads a file, naming the setting in the error. */
function readSetting(setting: string, path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (error) {
    throw new Error(
      `${setting} ${path}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`,
      { cause: error },
    );
  }
}

/**
 * The bearer token from `--token-file` (first line, trimmed) or `FERRY_TOKEN`; undefined when
 * neither is set. A file that is set but empty is an error, not "no token".
 */
export function loadToken(
  tokenFile: string | undefined,
  env: NodeJS.ProcessEnv = process.env,
): string | undefined {
  if (tokenFile) {
    const token = readSetting("--token-file", tokenFile).toString("utf8").split(/\r?\n/)[0].trim();
    if (!token) throw new Error(`--token-file ${tokenFile} is empty`);
    return token;
  }
  const token = env.FERRY_TOKEN?.trim();
  return token ? token : undefined;
}

/**
 * A CertificateProvider over files read once (restart to rotate). It answers a new listener on
 * the next microtask: grpc-js registers the server's watcher only after adding these listeners,
 * and an answer given before that would be lost.
 */
class StaticCertificates implements experimental.CertificateProvider {
  constructor(
    private readonly ca: Buffer,
    private readonly identity: { certificate: Buffer; privateKey: Buffer },
  ) {}
  addCaCertificateListener(listener: experimental.CaCertificateUpdateListener): void {
    queueMicrotask(() => listener({ caCertificate: this.ca }));
  }
  removeCaCertificateListener(): void {}
  addIdentityCertificateListener(listener: experimental.IdentityCertificateUpdateListener): void {
    queueMicrotask(() => listener(this.identity));
  }
  removeIdentityCertificateListener(): void {}
}

/** Server credentials: insecure without TLS files, else TLS (with optional client certificates). */
export function serverCredentials(tls: ServerTlsFiles | undefined): ServerCredentials {
  if (!tls) return ServerCredentials.createInsecure();
  const cert = readSetting("--tls-cert", tls.certFile);
  const key = readSetting("--tls-key", tls.keyFile);
  if (!tls.clientCaFile) {
    return ServerCredentials.createSsl(null, [{ cert_chain: cert, private_key: key }], false);
  }
  const provider = new StaticCertificates(readSetting("--tls-client-ca", tls.clientCaFile), {
    certificate: cert,
    privateKey: key,
  });
  // Client certificates are requested and verified against the CA, but not required of every
  // caller: the Connect handler requires one of executors. (The same provider gives both the
  // identity and the CA, so grpc-js's order of the two arguments does not matter.)
  return experimental.createCertificateProviderServerCredentials(provider, provider, false);
}

/** Channel credentials for a client of the scheduler. */
export function channelCredentials(tls: ClientTlsFiles | undefined): ChannelCredentials {
  if (!tls) return credentials.createInsecure();
  if ((tls.certFile === undefined) !== (tls.keyFile === undefined)) {
    throw new Error("--tls-cert and --tls-key go together");
  }
  return credentials.createSsl(
    tls.caFile ? readSetting("--tls-ca", tls.caFile) : null,
    tls.keyFile ? readSetting("--tls-key", tls.keyFile) : null,
    tls.certFile ? readSetting("--tls-cert", tls.certFile) : null,
  );
}

/** A client interceptor that sends `authorization: Bearer <token>` with every call. */
export function bearerInterceptor(token: string): Interceptor {
  const value = `Bearer ${token}`;
  return (options, nextCall) =>
    new InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        metadata.set("authorization", value);
        next(metadata, listener);
      },
    });
}

/** Calls that need no token: health checks (load balancers and Kubernetes probes send none). */
const OPEN_METHODS = /^\/grpc\.health\.v1\.Health\//;

/**
 * A server interceptor that refuses, with UNAUTHENTICATED, every call (but health checks)
 * without `authorization: Bearer <token>`. Tokens are compared in constant time.
 */
export function tokenInterceptor(token: string): ServerInterceptor {
  const expected = createHash("sha256").update(token).digest();
  const matches = (metadata: Metadata): boolean => {
    const header = metadata.get("authorization")[0];
    if (typeof header !== "string" || !header.startsWith("Bearer ")) return false;
    const given = createHash("sha256").update(header.slice("Bearer ".length).trim()).digest();
    return timingSafeEqual(given, expected);
  };
  return (method, call) => {
    if (OPEN_METHODS.test(method.path)) return new ServerInterceptingCall(call);
    return new ServerInterceptingCall(call, {
      start(next) {
        next(
          new ServerListenerBuilder()
            .withOnReceiveMetadata((metadata, mdNext) => {
              if (matches(metadata)) {
                mdNext(metadata);
              } else {
                call.sendStatus({
                  code: status.UNAUTHENTICATED,
                  details: metadata.get("authorization").length
                    ? "the bearer token is not the scheduler's"
                    : "this scheduler needs a token: send `authorization: Bearer <token>` (FERRY_TOKEN or --token-file)",
                  metadata: new Metadata(),
                });
              }
            })
            .build(),
        );
      },
    });
  };
}

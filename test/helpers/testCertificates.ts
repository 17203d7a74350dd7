/**
 * Throwaway TLS material for tests, made with the openssl command line: a CA in `dir`
 * (`ca.crt`, `ca.key`) and certificates it signs (`<name>.crt`, `<name>.key`).
 */
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";

function openssl(dir: string, ...args: string[]): void {
  execFileSync("openssl", args, { cwd: dir, stdio: "pipe" });
}

/** A self-signed CA, valid two days. */
export function makeTestCa(dir: string): void {
  openssl(
    dir,
    "req",
    "-x509",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-days",
    "2",
    "-subj",
    "/CN=ferry-test-ca",
    "-keyout",
    "ca.key",
    "-out",
    "ca.crt",
  );
}

/**
 * A certificate for `commonName` signed by the CA in `dir`; `extensions` (openssl extfile lines,
 * e.g. "subjectAltName=DNS:localhost") go into it.
 */
export function signTestCertificate(
  dir: string,
  name: string,
  commonName: string,
  extensions: string[] = [],
): void {
  openssl(
    dir,
    "req",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-subj",
    `/CN=${commonName}`,
    "-keyout",
    `${name}.key`,
    "-out",
    `${name}.csr`,
  );
  const extfile = extensions.length > 0 ? [`${name}.ext`] : [];
  if (extfile.length > 0) writeFileSync(join(dir, extfile[0]), `${extensions.join("\n")}\n`);
  openssl(
    dir,
    "x509",
    "-req",
    "-in",
    `${name}.csr`,
    "-CA",
    "ca.crt",
    "-CAkey",
    "ca.key",
    "-CAcreateserial",
    "-days",
    "2",
    "-out",
    `${name}.crt`,
    ...(extfile.length > 0 ? ["-extfile", extfile[0]] : []),
  );
}

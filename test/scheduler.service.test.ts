import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import {
  credentials,
  loadPackageDefinition,
  Metadata,
  status,
  type ChannelCredentials,
  type Client,
  type ServiceError,
} from "@grpc/grpc-js";
import { loadSync } from "@grpc/proto-loader";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { makeTestCa, signTestCertificate } from "./helpers/testCertificates";
import {
  ConnectRequest,
  JobState,
  SchedulerServiceClient,
  type ConnectResponse,
  JobSpec,
} from "../gen/ferry/v1/scheduler";
import { FerryClientError, SchedulerClient } from "../lib/client/schedulerClient";
import { genModel } from "../lib/model/genModel";
import { channelCredentials } from "../lib/wire/credentials";
import { startCluster } from "../services/cluster/localCluster";
import { startSchedulerServer, type SchedulerServer } from "../services/scheduler/server";
import { FakeExecutor } from "./helpers/fakeExecutor";

const codeOf = (error: unknown) => (error as FerryClientError).code;
const nodeModules = join(dirname(require.resolve("@grpc/grpc-js/package.json")), "..", "..");

type Unary = (
  request: object,
  metadata: Metadata,
  callback: (error: ServiceError | null, response: Record<string, unknown>) => void,
) => void;

/** A stock grpc.health.v1 client, from the proto the health package ships. */
function healthClient(address: string, creds: ChannelCredentials = credentials.createInsecure()) {
  const definition = loadSync(join(nodeModules, "grpc-health-check/proto/health/v1/health.proto"), {
    enums: String,
  });
  const pkg = loadPackageDefinition(definition) as unknown as {
    grpc: {
      health: { v1: { Health: new (address: string, creds: ChannelCredentials) => Client } };
    };
  };
  const client = new pkg.grpc.health.v1.Health(address, creds);
  const check = (service: string) =>
    new Promise<string>((resolve, reject) =>
      (client as unknown as { check: Unary }).check(
        { service },
        new Metadata(),
        (error, response) => (error ? reject(error) : resolve(String(response.status))),
      ),
    );
  return { check, close: () => client.close() };
}

const spec = (modelPath: string, overrides: Partial<JobSpec> = {}): JobSpec =>
  JobSpec.fromPartial({
    modelPath,
    steps: 2,
    batch: 1,
    tokens: 8,
    seed: 0,
    policy: "sdcpp",
    ...overrides,
  });

describe("service hygiene", () => {
  let dir: string;
  let modelPath: string;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-service-"));
    modelPath = join(dir, "tiny.safetensors");
    await genModel(modelPath, { blocks: 2, hidden: 32, heads: 2, channels: 4 });
  });

  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  describe("with a bearer token", () => {
    let server: SchedulerServer;
    const token = "s3cret-token";

    beforeAll(async () => {
      server = await startSchedulerServer({
        listen: "127.0.0.1:0",
        modelDirs: [dir],
        token,
        log: () => {},
      });
    });
    afterAll(async () => server?.close(100));

    it("refuses calls without the token, or with another, with UNAUTHENTICATED", async () => {
      for (const client of [
        new SchedulerClient(server.address),
        new SchedulerClient(server.address, { token: "wrong" }),
      ]) {
        const error = await client.listExecutors().catch((e: unknown) => e);
        expect(codeOf(error)).toBe("UNAUTHENTICATED");
        expect(codeOf(await client.submitJob(spec(modelPath)).catch((e: unknown) => e))).toBe(
          "UNAUTHENTICATED",
        );
        expect(codeOf(await client.watchJob("job-x").catch((e: unknown) => e))).toBe(
          "UNAUTHENTICATED",
        );
        client.close();
      }
      const good = new SchedulerClient(server.address, { token });
      expect((await good.listExecutors()).executors).toEqual([]);
      good.close();
    });

    it("refuses an executor without the token, and takes one with it", async () => {
      const rogue = new FakeExecutor(server.address, "rogue");
      const error = await rogue.connect().catch((e: unknown) => e);
      expect((error as ServiceError).code).toBe(status.UNAUTHENTICATED);
      rogue.close();
      const good = new FakeExecutor(server.address, "good", undefined, {}, token);
      await good.connect();
      const client = new SchedulerClient(server.address, { token });
      expect((await client.listExecutors()).executors.map((e) => e.executorId)).toEqual(["good"]);
      client.close();
      good.close();
    });

    it("answers health checks without a token (probes carry none)", async () => {
      const health = healthClient(server.address);
      expect(await health.check("")).toBe("SERVING");
      expect(await health.check("ferry.v1.SchedulerService")).toBe("SERVING");
      health.close();
    });
  });

  it("runs a job end to end with a token from FERRY_TOKEN in a real executor", async () => {
    const token = "cluster-token";
    const cluster = await startCluster(
      [{ id: "tok-gpu", vram: "1GiB", env: { FERRY_TOKEN: token } }],
      { modelDirs: [dir], token },
    );
    try {
      const result = await cluster.client.runJob(spec("tiny"));
      expect(result.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    } finally {
      await cluster.stop();
    }
  }, 60_000);

  it("serves reflection: stock tools can list the services and fetch the schema", async () => {
    const server = await startSchedulerServer({ listen: "127.0.0.1:0", log: () => {} });
    try {
      const definition = loadSync(
        join(nodeModules, "@grpc/reflection/build/proto/grpc/reflection/v1/reflection.proto"),
      );
      const pkg = loadPackageDefinition(definition) as unknown as {
        grpc: {
          reflection: {
            v1: { ServerReflection: new (a: string, c: ChannelCredentials) => Client };
          };
        };
      };
      const client = new pkg.grpc.reflection.v1.ServerReflection(
        server.address,
        credentials.createInsecure(),
      ) as unknown as {
        serverReflectionInfo(): NodeJS.ReadWriteStream & {
          write(request: object): void;
          end(): void;
        };
        close(): void;
      };
      const call = client.serverReflectionInfo();
      const responses: Record<string, unknown>[] = [];
      const done = new Promise<void>((resolve, reject) => {
        call.on("data", (response: Record<string, unknown>) => {
          responses.push(response);
          if (responses.length === 2) call.end();
        });
        call.on("end", () => resolve());
        call.on("error", reject);
      });
      call.write({ listServices: "*" });
      call.write({ fileContainingSymbol: "ferry.v1.SchedulerService" });
      await done;
      client.close();
      const services = (
        responses[0].listServicesResponse as { service: { name: string }[] }
      ).service.map((s) => s.name);
      expect(services).toContain("ferry.v1.SchedulerService");
      const files = (responses[1].fileDescriptorResponse as { fileDescriptorProto: Buffer[] })
        .fileDescriptorProto;
      expect(files.length).toBeGreaterThan(0);
      expect(Buffer.concat(files).toString("latin1")).toContain("SubmitJob");
    } finally {
      await server.close(100);
    }
  });

  it("turns health NOT_SERVING while it drains, and refuses new jobs then", async () => {
    const server = await startSchedulerServer({
      listen: "127.0.0.1:0",
      modelDirs: [dir],
      log: () => {},
    });
    const fake = new FakeExecutor(server.address, "drain-gpu");
    await fake.connect();
    const client = new SchedulerClient(server.address);
    const health = healthClient(server.address);
    const submitted = await client.submitJob(spec(modelPath));
    const run = await fake.nextRun();
    const closing = server.close(5000);
    await new Promise((done) => setTimeout(done, 100));
    expect(await health.check("")).toBe("NOT_SERVING");
    const refused = await client.submitJob(spec(modelPath)).catch((e: unknown) => e);
    expect(codeOf(refused)).toBe("UNAVAILABLE");
    // The running job finishes inside the grace period.
    fake.succeed(run.jobId);
    const result = await client.watchJob(submitted.jobId);
    expect(result.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    await closing;
    health.close();
    client.close();
    fake.close();
  });

  it("honours deadlines: a submit whose deadline has passed creates no job", async () => {
    const server = await startSchedulerServer({
      listen: "127.0.0.1:0",
      modelDirs: [dir],
      log: () => {},
    });
    const fake = new FakeExecutor(server.address, "deadline-gpu");
    await fake.connect();
    const hurried = new SchedulerClient(server.address, { deadlineMs: 0 });
    const error = await hurried.submitJob(spec(modelPath)).catch((e: unknown) => e);
    expect(codeOf(error)).toBe("DEADLINE_EXCEEDED");
    const client = new SchedulerClient(server.address);
    await new Promise((done) => setTimeout(done, 200));
    expect((await client.listJobs()).jobs).toEqual([]);
    for (const c of [hurried, client]) c.close();
    fake.close();
    await server.close(100);
  });

  describe("with TLS, and client certificates for executors", () => {
    let tls: string;
    let server: SchedulerServer;

    beforeAll(async () => {
      tls = await mkdtemp(join(tmpdir(), "ferry-tls-"));
      makeTestCa(tls);
      signTestCertificate(tls, "server", "localhost", [
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
      ]);
      signTestCertificate(tls, "executor", "executor-1");
      server = await startSchedulerServer({
        listen: "127.0.0.1:0",
        modelDirs: [dir],
        tls: {
          certFile: join(tls, "server.crt"),
          keyFile: join(tls, "server.key"),
          clientCaFile: join(tls, "ca.crt"),
        },
        log: () => {},
      });
    }, 60_000);

    afterAll(async () => {
      await server?.close(100);
      await rm(tls, { recursive: true, force: true });
    });

    const connect = (creds: ChannelCredentials) =>
      new Promise<string>((resolve, reject) => {
        const client = new SchedulerServiceClient(server.address, creds);
        const stream = client.connect();
        stream.on("data", (message: ConnectResponse) => {
          if (message.message?.$case === "registered") {
            resolve(message.message.value.executorId);
            stream.cancel();
            client.close();
          }
        });
        stream.on("error", (error: ServiceError) => {
          client.close();
          reject(error);
        });
        stream.write(
          ConnectRequest.fromPartial({
            message: {
              $case: "register",
              value: {
                executorId: "tls-gpu",
                device: { name: "fake", kind: "cpu", totalBytes: 1 << 30, freeBytes: 1 << 30 },
              },
            },
          }),
        );
      });

    it("lets an executor with a certificate signed by the client CA register, and no other", async () => {
      const withCert = channelCredentials({
        caFile: join(tls, "ca.crt"),
        certFile: join(tls, "executor.crt"),
        keyFile: join(tls, "executor.key"),
      });
      expect(await connect(withCert)).toBe("tls-gpu");
      const without = channelCredentials({ caFile: join(tls, "ca.crt") });
      const error = await connect(without).catch((e: unknown) => e);
      expect((error as ServiceError).code).toBe(status.UNAUTHENTICATED);
      expect((error as Error).message).toMatch(/client certificate/);
    });

    it("serves clients over TLS without a client certificate, and no plaintext", async () => {
      const client = new SchedulerClient(server.address, { tls: { caFile: join(tls, "ca.crt") } });
      expect(Array.isArray(await client.listModels())).toBe(true);
      client.close();
      const plain = new SchedulerClient(server.address, { deadlineMs: 3000 });
      const error = await plain.listModels().catch((e: unknown) => e);
      expect(["UNAVAILABLE", "DEADLINE_EXCEEDED"]).toContain(codeOf(error));
      plain.close();
    });
  });
});

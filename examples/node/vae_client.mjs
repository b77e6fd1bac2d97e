#!/usr/bin/env node
// A Node.js client of vae.v1.VaeService, built from proto/vae/v1/vae.proto at run time: no generated code,
// only @grpc/grpc-js and @grpc/proto-loader. It proves the contract from a second language.
//
//   npm ci
//   node vae_client.mjs --target localhost:50051 info
//   node vae_client.mjs --target localhost:50051 sample --num 4 --seed 7 [--offset 2] [--temperature 0.8]
//   node vae_client.mjs --target localhost:50051 score digits.npy [--importance 16] [--seed 0]
//   node vae_client.mjs --target localhost:50051 score --sampled 8 --seed 7
//
// --json prints the reply as JSON (uint64 fields as strings, as proto3's JSON mapping writes them); a failed
// call prints its gRPC status code name and message to stderr and exits 1 (2 for a bad command line).

import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const DEFAULT_PROTO = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "proto", "vae", "v1", "vae.proto");

const USAGE = `usage: node vae_client.mjs [options] <command> [arguments]

commands:
  info                        the model served: name, version, latent_dim, provider, every version
  sample --num N              N images drawn from the prior (--seed S, --offset K, --temperature T, --uint8)
  score FILE.npy              per-image scores of uint8 images [N,28,28] or [N,1,28,28] saved by numpy.save
  score --sampled N           per-image scores of the N images Sample(N, --seed) returns as uint8
                              (score: --importance K adds the importance-weighted bound; --seed seeds it)

options:
  --target HOST:PORT          server address (default: $VAE_TARGET or localhost:50051)
  --tls-ca FILE               connect with TLS, trusting this PEM CA (default: plaintext)
  --model-version V           a version number or a label such as "stable" (default: the server's route)
  --timeout SECONDS           deadline of each call (default 30)
  --proto FILE                the contract to load (default: ${DEFAULT_PROTO})
  --json                      print the reply as JSON`;

const OPTIONS = {
  target: { type: "string", default: process.env.VAE_TARGET ?? "localhost:50051" },
  "tls-ca": { type: "string" },
  "model-version": { type: "string" },
  timeout: { type: "string", default: "30" },
  proto: { type: "string", default: DEFAULT_PROTO },
  json: { type: "boolean", default: false },
  num: { type: "string", default: "1" },
  seed: { type: "string" },
  offset: { type: "string", default: "0" },
  temperature: { type: "string" },
  uint8: { type: "boolean", default: false },
  sampled: { type: "string" },
  importance: { type: "string", default: "0" },
  help: { type: "boolean", short: "h", default: false },
};

class UsageError extends Error {}

/** The VaeService stub for `options.target`: the .proto loaded now, uint64 as decimal strings, bytes as Buffers. */
function connect(options) {
  const definition = protoLoader.loadSync(options.proto, {
    keepCase: true, // field names as the .proto spells them: num_samples, negative_elbo
    longs: String, // uint64 (seeds, versions) exceed JavaScript's 2^53 safe integers
    enums: String,
    bytes: Buffer,
    defaults: true,
    oneofs: true,
  });
  const { VaeService } = grpc.loadPackageDefinition(definition).vae.v1;
  const credentials = options["tls-ca"]
    ? grpc.credentials.createSsl(readFileSync(options["tls-ca"]))
    : grpc.credentials.createInsecure();
  return new VaeService(options.target, credentials);
}

/** One unary call as a promise, with a deadline of `timeoutSeconds`. */
function call(client, method, request, timeoutSeconds) {
  const deadline = new Date(Date.now() + timeoutSeconds * 1000);
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (error, reply) => (error ? reject(error) : resolve(reply)));
  });
}

/** A Tensor's bytes as a typed array (little-endian whatever the host), with its shape and dtype. */
function fromTensor(tensor, field) {
  const shape = tensor.shape.map(Number);
  const count = shape.reduce((product, dim) => product * dim, 1);
  const bytes = tensor.data;
  if (tensor.dtype === "DTYPE_FLOAT32" && bytes.length === count * 4) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const values = Float32Array.from({ length: count }, (_, i) => view.getFloat32(4 * i, true));
    return { shape, dtype: "float32", values };
  }
  if (tensor.dtype === "DTYPE_UINT8" && bytes.length === count) {
    return { shape, dtype: "uint8", values: Uint8Array.from(bytes) };
  }
  throw new Error(`malformed reply: ${field} is ${tensor.dtype} of shape [${shape}] with ${bytes.length} bytes`);
}

/** A UINT8 Tensor of images: [N, 28, 28] arrays get the channel axis, [N, 1, 28, 28] go as they are. */
function uint8Images(shape, bytes) {
  const wireShape = shape.length === 3 ? [shape[0], 1, shape[1], shape[2]] : shape;
  return { shape: wireShape, dtype: "DTYPE_UINT8", data: Buffer.from(bytes) };
}

/** A uint8 array saved by numpy.save (format 1.0 to 3.0, C order): its shape and bytes. */
function readNpy(file) {
  const bytes = readFileSync(file);
  if (bytes.toString("latin1", 0, 6) !== "\x93NUMPY") throw new UsageError(`${file} is not a .npy file`);
  const headerStart = bytes[6] === 1 ? 10 : 12;
  const headerLength = bytes[6] === 1 ? bytes.readUInt16LE(8) : bytes.readUInt32LE(8);
  const header = bytes.toString("latin1", headerStart, headerStart + headerLength);
  const descr = /'descr':\s*'([^']*)'/.exec(header)?.[1];
  if (descr !== "|u1" || !/'fortran_order':\s*False/.test(header)) {
    throw new UsageError(`${file} holds ${descr}${/True/.test(header) ? " in Fortran order" : ""}: save uint8 images`);
  }
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header)[1].split(",").filter((dim) => dim.trim()).map(Number);
  return { shape, bytes: bytes.subarray(headerStart + headerLength) };
}

function versionSpec(value) {
  if (value === undefined) return null;
  return /^\d+$/.test(value) ? { number: value } : { label: value };
}

function integer(value, flag) {
  if (!/^\d+$/.test(value)) throw new UsageError(`--${flag} takes a whole number, got "${value}"`);
  return value; // as a decimal string: proto-loader takes uint64 (and uint32) that way
}

function sampleRequest(options, num, outputDtype) {
  const request = { num_samples: Number(integer(num, "num")), offset: integer(options.offset, "offset") };
  if (options.seed !== undefined) request.seed = integer(options.seed, "seed");
  if (options.temperature !== undefined) {
    request.temperature = Number(options.temperature);
    if (Number.isNaN(request.temperature)) {
      throw new UsageError(`--temperature takes a number, got "${options.temperature}"`);
    }
  }
  request.output_dtype = outputDtype;
  request.model_version = versionSpec(options["model-version"]);
  return request;
}

async function info(client, options, timeout) {
  const reply = await call(client, "GetModelInfo", { model_version: versionSpec(options["model-version"]) }, timeout);
  const { manifest_json: _, ...summary } = reply;
  if (options.json) return summary;
  const versions = reply.versions.map((v) => `${v.version} ${v.state}${v.labels.length ? ` [${v.labels}]` : ""}`);
  return [
    `${reply.name} version ${reply.version}: latent_dim ${reply.latent_dim}, images [${reply.image_shape}], ` +
      `provider ${reply.provider}`,
    `versions: ${versions.join(", ")}`,
  ].join("\n");
}

async function sample(client, options, timeout) {
  const outputDtype = options.uint8 ? "DTYPE_UINT8" : "DTYPE_FLOAT32";
  const reply = await call(client, "Sample", sampleRequest(options, options.num, outputDtype), timeout);
  const images = fromTensor(reply.images, "images");
  const latents = fromTensor(reply.latents, "latents");
  const { model_version, seed, offset } = reply;
  if (options.json) {
    const plain = ({ shape, dtype, values }) => ({ shape, dtype, values: Array.from(values) });
    return { model_version, seed, offset, images: plain(images), latents: plain(latents) };
  }
  const [count, dim] = latents.shape;
  const rows = Array.from({ length: count }, (_, row) => {
    const z = latents.values.subarray(row * dim, (row + 1) * dim);
    const head = Array.from(z.subarray(0, 3), (v) => v.toFixed(4));
    return `  row ${BigInt(offset) + BigInt(row)}: |z| ${Math.hypot(...z).toFixed(3)}, z[0..3] ${head}`;
  });
  return [
    `${count} images [${images.shape}] ${images.dtype}, seed ${seed}, offset ${offset}, model version ${model_version}`,
    ...rows,
    picture(images),
  ].join("\n");
}

/** The first image as text, darkest to brightest: what a sample looks like without an image viewer. */
function picture({ shape, dtype, values }) {
  const [height, width] = shape.slice(-2);
  const scale = dtype === "uint8" ? 255 : 1;
  const ramp = " .:-=+*#%@";
  const lines = [];
  for (let y = 0; y < height; y += 2) {
    let line = "";
    for (let x = 0; x < width; x++) line += ramp[Math.min(9, Math.floor((values[y * width + x] / scale) * 10))];
    lines.push(`  |${line}|`);
  }
  return lines.join("\n");
}

const SCORE_FIELDS = [
  "negative_elbo",
  "reconstruction",
  "kl",
  "complexity",
  "corrected",
  "iwae",
  "latent_norm",
  "plugin_negative_elbo",
];

async function score(client, options, positionals, timeout) {
  let images;
  if (options.sampled !== undefined) {
    const sampled = await call(client, "Sample", sampleRequest(options, options.sampled, "DTYPE_UINT8"), timeout);
    images = uint8Images(sampled.images.shape.map(Number), sampled.images.data);
  } else if (positionals.length === 1) {
    const { shape, bytes } = readNpy(positionals[0]);
    images = uint8Images(shape, bytes);
  } else {
    throw new UsageError("score takes one FILE.npy, or --sampled N");
  }
  const request = {
    images,
    importance_samples: Number(integer(options.importance, "importance")),
    model_version: versionSpec(options["model-version"]),
  };
  if (options.seed !== undefined) request.seed = integer(options.seed, "seed");
  const reply = await call(client, "Score", request, timeout);
  // `iwae` is proto3 `optional`: absent (null here) when importance_samples was 0.
  const scores = reply.scores.map((s) => Object.fromEntries(SCORE_FIELDS.map((f) => [f, s[f] ?? null])));
  if (options.json) return { model_version: reply.model_version, scores };
  const cell = (value) => (value === null ? "-" : value.toFixed(3)).padStart(15);
  return [
    `${scores.length} images, model version ${reply.model_version} (nats; higher: less like the training data)`,
    ["image".padStart(5), ...SCORE_FIELDS.map((f) => f.padStart(15))].join(""),
    ...scores.map((s, i) => [String(i).padStart(5), ...SCORE_FIELDS.map((f) => cell(s[f]))].join("")),
  ].join("\n");
}

async function main(argv) {
  const { values: options, positionals } = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true });
  const [command, ...rest] = positionals;
  if (options.help || command === undefined) {
    console.log(USAGE);
    return options.help ? 0 : 2;
  }
  const timeout = Number(options.timeout);
  if (!(timeout > 0)) throw new UsageError(`--timeout takes seconds above 0, got "${options.timeout}"`);
  const commands = {
    info: () => info(client, options, timeout),
    sample: () => sample(client, options, timeout),
    score: () => score(client, options, rest, timeout),
  };
  if (!(command in commands)) throw new UsageError(`unknown command "${command}": use info, sample or score`);
  const client = connect(options);
  try {
    const result = await commands[command]();
    console.log(options.json ? JSON.stringify(result) : result);
    return 0;
  } finally {
    client.close();
  }
}

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (error) {
  if (error.code !== undefined && grpc.status[error.code] !== undefined) {
    // A failed call: the status code's name (e.g. INVALID_ARGUMENT) and the server's message.
    console.error(`error: ${grpc.status[error.code]}: ${error.details}`);
    process.exitCode = 1;
  } else if (error instanceof UsageError || error.code?.startsWith?.("ERR_PARSE_ARGS")) {
    console.error(`error: ${error.message} (--help lists the commands and options)`);
    process.exitCode = 2;
  } else {
    console.error(`error: ${error.message}`);
    process.exitCode = 1;
  }
}

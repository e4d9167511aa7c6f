// A web backend and a recommendation reader in Node.js, written from docs/contracts.md alone (kafkajs and
// avsc from npm): publish the writer schemas, send catalogue upserts and events keyed by user id with the
// default partitioner, read the recommendations back and decode them with Recommendation.avsc loaded alone.
//
//   node conformance.mjs BOOTSTRAP SCHEMAS_DIR RUN_ID
//
// Prints one JSON line: what was sent, what came back per user, and any problem.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import avro from "avsc";
import { Kafka, logLevel } from "kafkajs";

const [bootstrap, schemasDir, runId] = process.argv.slice(2);

// CRC-64-AVRO of the Parsing Canonical Form, little-endian on the wire (docs/contracts.md).
const EMPTY = 0xc15d213aa4d7a795n;
const TABLE = Array.from({ length: 256 }, (_, i) => {
  let fp = BigInt(i);
  for (let j = 0; j < 8; j++) fp = (fp >> 1n) ^ (EMPTY & -(fp & 1n));
  return fp;
});
function fingerprint(type) {
  let fp = EMPTY;
  for (const byte of Buffer.from(JSON.stringify(type.schema()), "utf8")) {
    fp = (fp >> 8n) ^ TABLE[Number((fp ^ BigInt(byte)) & 0xffn)];
  }
  const out = Buffer.alloc(8);
  out.writeBigUInt64LE(fp);
  return out;
}

function load(name) {
  const json = readFileSync(join(schemasDir, `${name}.avsc`), "utf8");
  const type = avro.Type.forSchema(JSON.parse(json)); // one file, no registry of other types
  return { name, json, type, fingerprint: fingerprint(type) };
}

const schemas = Object.fromEntries(
  ["ClickEvent", "SearchEvent", "PurchaseEvent", "UserDeletion", "CatalogItem", "Recommendation"].map((n) => [
    n,
    load(n),
  ]),
);
const encode = (name, record) =>
  Buffer.concat([Buffer.from([0xc3, 0x01]), schemas[name].fingerprint, schemas[name].type.toBuffer(record)]);

const kafka = new Kafka({ clientId: `node-backend-${runId}`, brokers: [bootstrap], logLevel: logLevel.NOTHING });
// kafkajs's idempotent producer sends InitProducerId v0, which the embedded broker refuses (docs/contracts.md).
const producer = kafka.producer();
const consumer = kafka.consumer({
  groupId: `node-reader-${runId}`,
  maxWaitTimeInMs: 20, // the embedded broker's recommended wait (docs/contracts.md)
  sessionTimeout: 6000,
  heartbeatInterval: 1000,
});

const now = Date.now();
const timings = {};
const mark = (what) => (timings[what] = Date.now() - now);
const items = [
  { item_id: `node-${runId}-tent`, title: "Two-person Camping Tent", category: "outdoor/camping" },
  { item_id: `node-${runId}-lamp`, title: "Camping Lantern", category: "outdoor/camping" },
  { item_id: `node-${runId}-bag`, title: "Down Sleeping Bag", category: "outdoor/camping" },
].map((i) => ({ ...i, price: 49.5, in_stock: true, description: "for nights outdoors", updated_at: now }));
const users = Array.from({ length: 20 }, (_, n) => `node-${runId}-user-${n}`);
const lastEvent = {};
let problem = null;

try {
  await producer.connect();
  mark("producer_connected");
  await producer.send({
    topic: "streamrec.schemas",
    messages: Object.values(schemas).map((s) => ({ key: s.fingerprint, value: s.json })),
  });
  await producer.send({
    topic: "streamrec.catalog",
    messages: items.map((item) => ({ key: item.item_id, value: encode("CatalogItem", item) })),
  });
  await new Promise((resolve) => setTimeout(resolve, 2000)); // the catalogue reaches the worker first
  const events = [];
  for (const [n, user] of users.entries()) {
    const base = { user_id: user, timestamp: now + n, session_id: null, context: null };
    const search = { ...base, event_id: `${user}-s`, query: "camping tent", context: { device: "mobile", page: "search", referrer: null, locale: "en-GB" } };
    const click = { ...base, event_id: `${user}-c`, item_id: items[n % 3].item_id };
    events.push({ key: user, value: encode("SearchEvent", search) });
    events.push({ key: user, value: encode("ClickEvent", click) });
    if (n % 5 === 0) {
      const purchase = { ...base, event_id: `${user}-p`, item_id: items[n % 3].item_id, price: 49.5, quantity: 1, currency: "EUR" };
      events.push({ key: user, value: encode("PurchaseEvent", purchase) });
      lastEvent[user] = purchase.event_id;
    } else {
      lastEvent[user] = click.event_id;
    }
  }
  mark("catalogue_sent");
  await consumer.connect();
  // A new group from the beginning: whatever else the topic holds is skipped by user id.
  await consumer.subscribe({ topic: "streamrec.recommendations", fromBeginning: true });
  const received = {};
  const decodeErrors = [];
  const done = new Promise((resolve) => {
    consumer.run({
      eachMessage: async ({ message }) => {
        const value = message.value;
        const head = value.subarray(0, 10);
        if (head[0] !== 0xc3 || head[1] !== 0x01 || !head.subarray(2).equals(schemas.Recommendation.fingerprint)) {
          decodeErrors.push(head.toString("hex"));
          return;
        }
        const rec = schemas.Recommendation.type.fromBuffer(value.subarray(10));
        if (message.key.toString("utf8") !== rec.user_id) decodeErrors.push(`key ${message.key} for ${rec.user_id}`);
        if (!(rec.user_id in lastEvent)) return;
        received[rec.user_id] = received[rec.user_id] || [];
        received[rec.user_id].push({ cause: rec.cause_event_id, items: rec.items.map((i) => i.item_id), latency_ms: Date.now() - Number(rec.event_time) });
        if (users.every((u) => (received[u] || []).some((r) => r.cause === lastEvent[u]))) resolve();
      },
    });
  });
  consumer.on(consumer.events.GROUP_JOIN, () => mark("reader_joined"));
  await producer.send({ topic: "streamrec.events", messages: events });
  mark("events_sent");
  const timeout = new Promise((resolve) => setTimeout(() => resolve("timeout"), 60000));
  if ((await Promise.race([done, timeout])) === "timeout") problem = "timed out waiting for every user's recommendation";
  mark("answered");
  const catalogue = new Set(items.map((i) => i.item_id));
  console.log(
    JSON.stringify({
      problem,
      timings_ms: timings,
      decode_errors: decodeErrors,
      users: users.length,
      answered: users.filter((u) => (received[u] || []).some((r) => r.cause === lastEvent[u])).length,
      recommended: Object.values(received).flat().flatMap((r) => r.items),
      // per user, the items of the recommendation caused by their last event
      last: Object.fromEntries(users.map((u) => [u, ((received[u] || []).find((r) => r.cause === lastEvent[u]) || {}).items || []])),
      catalogue: [...catalogue],
      latencies_ms: Object.values(received).flat().map((r) => r.latency_ms),
      fingerprints: Object.fromEntries(Object.values(schemas).map((s) => [s.name, s.fingerprint.toString("hex")])),
    }),
  );
} catch (error) {
  console.log(JSON.stringify({ problem: String(error && error.stack ? error.stack : error) }));
} finally {
  // Leaving the group can wait out a rebalance on the embedded broker: give it three seconds.
  const leave = Promise.all([consumer.disconnect().catch(() => {}), producer.disconnect().catch(() => {})]);
  await Promise.race([leave, new Promise((resolve) => setTimeout(resolve, 3000))]);
  process.exit(0);
}

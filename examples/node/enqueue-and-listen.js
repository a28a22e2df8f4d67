// Enqueue one sync_subscriber job on imsys's sync stream and wait for its backend event,
// as a Node backend does it (ioredis, no imsys library). The contract is DESIGN.md's:
//
//   job:    XADD <prefix>:sync * type sync_subscriber payload '{"subscriber_id": N}'
//           job_id sync_subscriber:N enqueued_at <epoch ms>
//   events: <prefix>:backend-events, entries {type, payload (JSON), ts}, read with a
//           consumer group of the backend's own (never imsys's group "imsys").
//
// Usage: node enqueue-and-listen.js SUBSCRIBER_ID
// Environment: REDIS_URL (redis://127.0.0.1:6379/0), IMSYS_PREFIX (imsys, imsys's
// redis.prefix), GROUP (backend), TIMEOUT_MS (30000).
// Prints one JSON line per step; exits 0 once the subscriber's event was read, 1 if it
// did not come in time.
"use strict";

const Redis = require("ioredis");

const subscriberId = Number.parseInt(process.argv[2], 10);
if (!Number.isSafeInteger(subscriberId) || subscriberId < 1) {
  console.error("usage: node enqueue-and-listen.js SUBSCRIBER_ID");
  process.exit(2);
}
const prefix = process.env.IMSYS_PREFIX || "imsys";
const group = process.env.GROUP || "backend";
const timeoutMs = Number(process.env.TIMEOUT_MS || 30000);
const events = `${prefix}:backend-events`;
const redis = new Redis(process.env.REDIS_URL || "redis://127.0.0.1:6379/0");

function say(step, detail) {
  console.log(JSON.stringify({ step, ...detail }));
}

// Our own group, created once; "$" starts it at the stream's end, so the backend sees the
// events from now on. BUSYGROUP means it exists (a restart): we go on where it stopped.
async function ensureGroup() {
  try {
    await redis.xgroup("CREATE", events, group, "$", "MKSTREAM");
  } catch (err) {
    if (!String(err.message).startsWith("BUSYGROUP")) throw err;
  }
}

async function enqueue() {
  // job_id: while a job with this id waits or runs, imsys drops a second one, so a
  // retried XADD (a lost reply) does not sync twice. imsys's own producers use the same.
  const jobId = `sync_subscriber:${subscriberId}`;
  const entryId = await redis.xadd(
    `${prefix}:sync`, "*",
    "type", "sync_subscriber",
    "payload", JSON.stringify({ subscriber_id: subscriberId }),
    "job_id", jobId,
    "enqueued_at", String(Date.now()),
  );
  say("enqueued", { stream: `${prefix}:sync`, entry_id: entryId, job_id: jobId });
}

// Read new events for this consumer; acknowledge each once handled (here: printed).
async function waitForSubscriber() {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const reply = await redis.xreadgroup(
      "GROUP", group, "node-example", "COUNT", 100, "BLOCK", 1000, "STREAMS", events, ">",
    );
    for (const [, entries] of reply || []) {
      for (const [id, flat] of entries) {
        const fields = {};
        for (let i = 0; i < flat.length; i += 2) fields[flat[i]] = flat[i + 1];
        const payload = JSON.parse(fields.payload);
        await redis.xack(events, group, id);
        if (payload.subscriber_id !== subscriberId) continue;
        say("event", { id, type: fields.type, ts: Number(fields.ts), payload });
        if (fields.type === "subscriber_synced") return true;
      }
    }
  }
  return false;
}

async function main() {
  await ensureGroup();
  await enqueue();
  const synced = await waitForSubscriber();
  if (!synced) say("timeout", { waited_ms: timeoutMs });
  return synced ? 0 : 1;
}

main()
  .then((code) => { redis.disconnect(); process.exit(code); })
  .catch((err) => { console.error(err); redis.disconnect(); process.exit(1); });

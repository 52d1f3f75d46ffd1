// votebox touch kiosk: a device in a browser (docs/protocol.md, Votes, Acks, and The device's
// side of the bargain), keeping the device rules as devices/client.py does. It logs in with
// its device account over MQTT WebSockets, shows the retained polls/{poll}/config (and keeps
// it, so a kiosk reloaded offline still takes votes), and for each press stores the CBOR vote
// in IndexedDB before sending it, sends it again only when no ack named it for 30 s, in
// batches after an outage, pauses when rate limited, and reconnects with backoff and full
// jitter, also after a refused login. Text from the broker is only ever set with textContent.
"use strict";

// docs/protocol.md, The device's side of the bargain.
const RESEND_MS = 30000; // rule 4: a vote with no ack after this goes again
const BATCH_VOTES = 64; // rule 4: votes in one message at most
const BATCH_BYTES = 4096; // and bytes
const SEQ_WINDOW = 4096; // rule 5
const RATE_LIMITED = 33;
const STALE_EPOCH = 27;

// Rule 6: a random wait between 0 and a ceiling that doubles from 1 s up to 60 s after each
// failed attempt (full jitter), so that a fleet of tablets does not reconnect in lockstep.
function reconnectDelayMs(failures, random = Math.random) {
  const ceiling = Math.min(60000, 1000 * 2 ** Math.min(failures, 16));
  return Math.floor(random() * ceiling);
}

// Consecutive votes of one poll, at most BATCH_VOTES and BATCH_BYTES a message (rule 4).
function batchesOf(votes) {
  const out = [];
  let group = [];
  let size = 0;
  for (const vote of votes) {
    if (group.length && (vote.poll !== group[0].poll || group.length >= BATCH_VOTES
        || size + vote.payload.length > BATCH_BYTES)) {
      out.push(group);
      group = [];
      size = 0;
    }
    group.push(vote);
    size += vote.payload.length;
  }
  if (group.length) out.push(group);
  return out;
}

// The message for a group: the vote itself, or a batch, a CBOR array of the encoded votes.
function messageOf(group) {
  if (group.length === 1) return new Uint8Array(group[0].payload);
  const out = cborHead(4, group.length);
  for (const vote of group) out.push(...vote.payload);
  return new Uint8Array(out);
}

// ---- CBOR, the few items a vote and an ack use (RFC 8949; docs/protocol.md) ----------------

function cborHead(major, value) {
  // The shortest form of the argument, as devices/encoder.py writes it.
  if (value < 24) return [(major << 5) | value];
  if (value < 0x100) return [(major << 5) | 24, value];
  if (value < 0x10000) return [(major << 5) | 25, value >> 8, value & 0xff];
  if (value < 0x100000000) {
    return [(major << 5) | 26, (value >>> 24) & 0xff, (value >>> 16) & 0xff,
            (value >>> 8) & 0xff, value & 0xff];
  }
  const high = Math.floor(value / 0x100000000); // up to 2**53: exact in a double
  const low = value >>> 0; // value mod 2**32
  return [(major << 5) | 27, (high >>> 24) & 0xff, (high >>> 16) & 0xff, (high >>> 8) & 0xff,
    high & 0xff, (low >>> 24) & 0xff, (low >>> 16) & 0xff, (low >>> 8) & 0xff, low & 0xff];
}

// A vote: {0: choice, 1: seq, 2: ts, 4: epoch, 5: 1}, keys ascending, optional ones only when
// set; 5: 1 asks for a receipt (docs/protocol.md, Receipts).
function encodeVote(choice, seq, ts, epoch, receipt) {
  const fields = [[0, choice], [1, seq]];
  if (ts !== null && ts !== undefined) fields.push([2, ts]);
  if (epoch) fields.push([4, epoch]);
  if (receipt) fields.push([5, 1]);
  const out = cborHead(5, fields.length);
  for (const [key, value] of fields) {
    out.push(...cborHead(0, key));
    if (Array.isArray(value)) {
      out.push(...cborHead(4, value.length));
      for (const v of value) out.push(...cborHead(0, v));
    } else {
      out.push(...cborHead(0, value));
    }
  }
  return new Uint8Array(out);
}

// An ack: an array of [epoch, seq, code] arrays, each item a uint or null; [epoch, seq, code,
// shard, entry] for a vote accepted with its receipt.
function decodeAck(bytes) {
  let at = 0;
  function item() {
    const first = bytes[at++];
    const major = first >> 5;
    const info = first & 0x1f;
    if (first === 0xf6) return null;
    let value = info;
    if (info === 24) value = bytes[at++];
    else if (info === 25) { value = (bytes[at] << 8) | bytes[at + 1]; at += 2; }
    else if (info === 26) {
      value = ((bytes[at] << 24) >>> 0) + (bytes[at + 1] << 16) + (bytes[at + 2] << 8) + bytes[at + 3];
      at += 4;
    } else if (info === 27) {
      let v = 0;
      for (let i = 0; i < 8; i++) v = v * 256 + bytes[at + i];
      value = v;
      at += 8;
    } else if (info > 27) throw new Error("not an ack");
    if (major === 0) return value;
    if (major === 4) return Array.from({ length: value }, item);
    throw new Error("not an ack");
  }
  const entries = item();
  if (!Array.isArray(entries)) throw new Error("not an ack");
  return entries;
}

// ---- The outbox: IndexedDB, the browser's persistent store ------------------------------

function request(r) {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
  });
}

async function openStore(device) {
  const open = indexedDB.open(`votebox-kiosk-${device}`, 1);
  open.onupgradeneeded = () => {
    open.result.createObjectStore("meta");
    open.result.createObjectStore("votes", { keyPath: ["epoch", "seq"] });
  };
  const db = await request(open);
  const tx = db.transaction("meta", "readwrite");
  const meta = tx.objectStore("meta");
  let epoch = await request(meta.get("epoch"));
  if (epoch === undefined) {
    // A new store is a new epoch, higher than any before it: the Unix time (rule 2).
    epoch = Math.floor(Date.now() / 1000);
    meta.put(epoch, "epoch");
    meta.put(0, "last_seq");
  }
  await new Promise((resolve) => { tx.oncomplete = resolve; });
  return { db, epoch };
}

// Takes the next seq and stores the vote in one transaction, before it is sent (rule 1).
async function storeVote(store, poll, choice) {
  const tx = store.db.transaction(["meta", "votes"], "readwrite");
  const meta = tx.objectStore("meta");
  // The epoch from the store, in this transaction: one that moved (storeAgain) is seen here.
  const epoch = await request(meta.get("epoch"));
  const seq = (await request(meta.get("last_seq"))) + 1;
  meta.put(seq, "last_seq");
  const ts = Math.floor(Date.now() / 1000);
  const payload = encodeVote(choice, seq, ts, epoch, true);
  const vote = { epoch, seq, poll, choice, ts, payload: Array.from(payload) };
  tx.objectStore("votes").put(vote);
  await new Promise((resolve, reject) => { tx.oncomplete = resolve; tx.onerror = () => reject(tx.error); });
  return vote;
}

async function storedVotes(store) {
  const tx = store.db.transaction("votes", "readonly");
  return request(tx.objectStore("votes").getAll());
}

// The poll's last config, kept so that a kiosk reloaded while offline still shows its buttons.
async function keptConfig(store, poll) {
  const tx = store.db.transaction("meta", "readonly");
  return request(tx.objectStore("meta").get(`config:${poll}`));
}

async function keepConfig(store, poll, cfg) {
  const tx = store.db.transaction("meta", "readwrite");
  if (cfg === null) tx.objectStore("meta").delete(`config:${poll}`);
  else tx.objectStore("meta").put(cfg, `config:${poll}`);
  await new Promise((resolve) => { tx.oncomplete = resolve; });
}

// Votes answered stale_epoch were not counted: the processor knows a higher epoch of this
// kiosk (its clock was ahead when an earlier store was made, and rule 2 took the clock). They
// are kept, stored again with new seqs in the current epoch, in one transaction; when one of
// them is of the current epoch, in a new one first, higher by a step that doubles each time
// (1, 2, 4... s past it; a clock a year ahead is passed in 25 steps).
async function storeAgain(store, refused, higher) {
  const tx = store.db.transaction(["meta", "votes"], "readwrite");
  const meta = tx.objectStore("meta");
  const votes = tx.objectStore("votes");
  let epoch = await request(meta.get("epoch"));
  let seq = await request(meta.get("last_seq"));
  if (higher) {
    const steps = (await request(meta.get("epoch_steps"))) || 0;
    epoch = Math.max(epoch + 2 ** steps, Math.floor(Date.now() / 1000));
    seq = 0;
    meta.put(steps + 1, "epoch_steps");
    meta.put(epoch, "epoch");
  }
  for (const old of refused) {
    votes.delete([old.epoch, old.seq]);
    seq += 1;
    const payload = encodeVote(old.choice, seq, old.ts, epoch, true);
    votes.put({ ...old, epoch, seq, payload: Array.from(payload) });
  }
  meta.put(seq, "last_seq");
  await new Promise((resolve, reject) => { tx.oncomplete = resolve; tx.onerror = () => reject(tx.error); });
  store.epoch = epoch;
}

async function settleVote(store, epoch, seq) {
  const tx = store.db.transaction("votes", "readwrite");
  tx.objectStore("votes").delete([epoch, seq]);
  await new Promise((resolve) => { tx.oncomplete = resolve; });
}

// ---- The page -------------------------------------------------------------------------

// What the voter is told for each code (docs/protocol.md, Codes).
const ANSWERS = {
  0: "Thank you, your vote counts!",
  1: "Thank you, your vote counts!", // a repeat of a counted vote
  3: "Thank you! A later vote of yours counts.",
  4: "Thank you! You voted a moment ago; that vote counts.",
  30: "This poll has not opened yet.",
  31: "This poll is closed.",
  24: "This poll does not exist any more.",
};

async function main() {
  const params = new URLSearchParams(location.hash.slice(1));
  const device = params.get("device");
  const poll = params.get("poll");
  const password = params.get("password") || undefined;
  const question = document.getElementById("question");
  const options = document.getElementById("options");
  const answer = document.getElementById("answer");
  const receipt = document.getElementById("receipt");
  const pendingCount = document.getElementById("pending");
  const connection = document.getElementById("connection");
  if (!device || !poll) {
    question.textContent = "Open this page as kiosk.html#device=ID&password=PW&poll=POLL";
    return;
  }
  const config = await fetch("config.json").then((r) => r.json());
  const store = await openStore(device);
  // "epoch:seq" -> when it was last sent on this connection (cleared on a reconnect, so that
  // everything stored goes again); a vote goes again only when no ack named it for 30 s.
  const sentAt = new Map();
  const resendMs = Number(params.get("ack_timeout_s") || RESEND_MS / 1000) * 1000;
  let holdUntil = 0; // rate limited: nothing is sent before this (rule 3)
  let failures = 0; // connection attempts that failed since the last success (rule 6)
  let reconnectTimer = null;
  let client = null;
  // What the page sent, for the tests and for a curious operator: [epoch, seq, ms] per vote.
  const sentLog = [];
  window.voteboxKiosk.sent = sentLog;
  window.voteboxKiosk.attempts = [];
  window.voteboxKiosk.answers = []; // [code, ms] of each ack entry

  async function showPending() {
    pendingCount.textContent = String((await storedVotes(store)).length);
  }

  function setConnection(state, text) {
    connection.dataset.state = state;
    connection.textContent = text;
  }

  // Sends every stored vote not sent on this connection in the last 30 s (rules 3 and 4), in
  // batches, none 4096 or more above the oldest one still waiting in its epoch (rule 5).
  async function flush() {
    if (!client || !client.connected) return;
    const now = Date.now();
    if (now < holdUntil) return;
    const votes = await storedVotes(store);
    const oldest = new Map();
    for (const v of votes) oldest.set(v.epoch, Math.min(v.seq, oldest.get(v.epoch) ?? v.seq));
    const due = votes.filter((vote) => {
      const at = sentAt.get(`${vote.epoch}:${vote.seq}`);
      return vote.seq - oldest.get(vote.epoch) < SEQ_WINDOW && (at === undefined || now - at >= resendMs);
    });
    if (!client.connected) return; // it went while the store was read
    for (const group of batchesOf(due)) {
      client.publish(`votes/${group[0].poll}/${device}`, messageOf(group), { qos: 1 });
      for (const vote of group) {
        sentAt.set(`${vote.epoch}:${vote.seq}`, now);
        sentLog.push([vote.epoch, vote.seq, now]);
      }
    }
  }

  // Rule 6, also after a refused login (mqtt.js gives up then on its own): one attempt after
  // a random wait below a ceiling that doubles with each failure.
  function scheduleReconnect() {
    if (reconnectTimer !== null || client.connected) return;
    const delay = reconnectDelayMs(failures);
    failures += 1;
    reconnectTimer = setTimeout(() => {
      reconnectTimer = null;
      window.voteboxKiosk.attempts.push(Date.now());
      setConnection("reconnecting", "reconnecting…");
      client.reconnect();
    }, delay);
  }

  function drawPoll(cfg) {
    document.getElementById("title").textContent = cfg.title || cfg.poll || poll;
    question.textContent = cfg.title || poll;
    options.replaceChildren();
    options.dataset.state = cfg.state || "open";
    const labels = cfg.labels || [];
    const offset = cfg.scale ? cfg.scale[0] : 0; // a rating's vote carries the value itself
    const multiple = cfg.type === "multiple";
    const picked = new Set(); // a multiple-choice poll: options chosen, sent with "Vote"

    async function cast(choice) {
      await storeVote(store, poll, choice);
      receipt.dataset.code = "";
      receipt.textContent = "";
      if (client && client.connected) {
        answer.dataset.code = "";
        answer.textContent = "Sending…";
      } else {
        answer.dataset.code = "saved";
        answer.textContent = "Thank you! Your vote is saved and will be sent when the kiosk is back online.";
      }
      await showPending();
      await flush();
    }

    labels.forEach((label, index) => {
      const button = document.createElement("button");
      button.className = "choice";
      button.textContent = label;
      button.dataset.option = String(index);
      button.addEventListener("click", async () => {
        if (!multiple) {
          await cast(cfg.type === "rating" || cfg.type === "nps" ? index + offset : index);
          return;
        }
        if (picked.has(index)) picked.delete(index);
        else if (picked.size < (cfg.max_choices || 1)) picked.add(index);
        button.dataset.picked = String(picked.has(index));
      });
      options.appendChild(button);
    });
    if (multiple) {
      const submit = document.createElement("button");
      submit.className = "choice submit";
      submit.id = "submit";
      submit.textContent = `Vote (up to ${cfg.max_choices || 1})`;
      submit.addEventListener("click", async () => {
        if (picked.size === 0) return;
        const choice = [...picked].sort((a, b) => a - b);
        picked.clear();
        for (const b of options.querySelectorAll(".choice")) b.dataset.picked = "false";
        await cast(choice);
      });
      options.appendChild(submit);
    }
  }

  // The poll as last seen: a kiosk reloaded while offline still takes votes for it.
  const kept = await keptConfig(store, poll);
  if (kept) drawPoll(kept);

  window.voteboxKiosk.attempts.push(Date.now());
  client = mqtt.connect(config.ws_url, {
    protocolVersion: 4,
    clientId: device, // the broker checks it against the account (docs/protocol.md, Topics)
    username: device,
    password,
    reconnectPeriod: 0, // ours, with backoff and jitter (scheduleReconnect)
    connectTimeout: 10000,
    // A voter should see at once that the kiosk is cut off: a ping every 5 s, so a dead
    // network shows within about 10 s (mqtt.js waits 1.5 keepalives for the answer).
    keepalive: 5,
    clean: true,
  });
  client.on("connect", async () => {
    failures = 0;
    setConnection("connected", "connected");
    sentAt.clear(); // a new connection: everything stored goes again
    client.subscribe([`acks/${device}`, `polls/${poll}/config`], { qos: 1 });
    await flush();
  });
  client.on("close", () => {
    if (connection.dataset.state === "connected") setConnection("offline", "offline");
    scheduleReconnect();
  });
  client.on("error", (err) => setConnection("offline", `error: ${err.message}`));
  client.on("message", async (topic, payload) => {
    if (topic === `polls/${poll}/config`) {
      if (payload.length === 0) return; // deleted: the votes stored for it are answered anyway
      let cfg;
      try {
        cfg = JSON.parse(new TextDecoder().decode(payload));
      } catch (e) {
        return; // not a config
      }
      drawPoll(cfg);
      await keepConfig(store, poll, cfg);
      return;
    }
    if (topic !== `acks/${device}`) return;
    let entries;
    try {
      entries = decodeAck(payload);
    } catch (e) {
      return;
    }
    const stale = [];
    for (const [epoch, seq, code, shard, entry] of entries) {
      window.voteboxKiosk.answers.push([code, Date.now()]);
      if (epoch === null || seq === null) {
        if (code === RATE_LIMITED) {
          // Which votes were refused is unknown: pause 1-3 s, then send everything again.
          holdUntil = Date.now() + 1000 + Math.random() * 2000;
          sentAt.clear();
          setTimeout(flush, holdUntil - Date.now() + 10);
        }
        continue; // any other message-level refusal: sent again after 30 s
      }
      sentAt.delete(`${epoch}:${seq}`);
      if (code === STALE_EPOCH) {
        stale.push([epoch, seq]);
        continue;
      }
      await settleVote(store, epoch, seq); // any other code is final for its vote (rule 3)
      answer.dataset.code = String(code);
      answer.textContent = ANSWERS[code] || `Not counted (code ${code}).`;
      // The vote's place in the poll's chain: the voter can have it checked
      // (votebox audit POLL --receipt), under a head every dashboard saw published.
      const place = entry === undefined ? "" : `${poll}-${shard}-${entry}`;
      receipt.dataset.code = place;
      receipt.textContent = place ? `Receipt ${place}` : "";
    }
    if (stale.length) {
      const votes = await storedVotes(store);
      const refused = votes.filter((v) => v.choice !== undefined
        && stale.some(([e, s]) => v.epoch === e && v.seq === s));
      await storeAgain(store, refused, stale.some(([e]) => e === store.epoch));
      // Stored before votes kept their choice (2026-12-05): final, as any other answer.
      for (const [e, s] of stale) {
        if (!refused.some((v) => v.epoch === e && v.seq === s)) await settleVote(store, e, s);
      }
      await flush();
    }
    await showPending();
  });
  // The browser knows first when the network goes (the tablet's Wi-Fi, DevTools' offline
  // emulation): drop the connection at once rather than wait for the broker's keepalive; the
  // client reconnects by itself, and succeeds once the network is back.
  window.addEventListener("offline", () => {
    setConnection("offline", "offline");
    if (client.stream) client.stream.destroy();
  });
  window.addEventListener("online", () => {
    // The network is back: try now, not at the end of a long backoff.
    if (client.connected) return;
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    failures = 0;
    scheduleReconnect();
  });
  setInterval(flush, 5000);
  await showPending();
}

window.voteboxKiosk = { encodeVote, decodeAck, reconnectDelayMs, batchesOf, messageOf };
if (!window.VOTEBOX_KIOSK_NO_START) main();

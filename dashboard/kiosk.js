// votebox touch kiosk: a device in a browser (docs/protocol.md, Votes, Acks, and The device's
// side of the bargain). It logs in with its device account over MQTT WebSockets, shows the
// retained polls/{poll}/config, and for each press stores the CBOR vote in IndexedDB before
// sending it, sends it again until an ack names it, and replays what is stored after a
// network loss or a reload. Text from the broker is only ever set with textContent.
"use strict";

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

// A vote: {0: choice, 1: seq, 2: ts, 4: epoch}, keys ascending, optional ones only when set.
function encodeVote(choice, seq, ts, epoch) {
  const fields = [[0, choice], [1, seq]];
  if (ts !== null && ts !== undefined) fields.push([2, ts]);
  if (epoch) fields.push([4, epoch]);
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

// An ack: an array of [epoch, seq, code] arrays, each item a uint or null.
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
  const seq = (await request(meta.get("last_seq"))) + 1;
  meta.put(seq, "last_seq");
  const ts = Math.floor(Date.now() / 1000);
  const payload = encodeVote(choice, seq, ts, store.epoch);
  const vote = { epoch: store.epoch, seq, poll, payload: Array.from(payload), sentAt: 0 };
  tx.objectStore("votes").put(vote);
  await new Promise((resolve, reject) => { tx.oncomplete = resolve; tx.onerror = () => reject(tx.error); });
  return vote;
}

async function storedVotes(store) {
  const tx = store.db.transaction("votes", "readonly");
  return request(tx.objectStore("votes").getAll());
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
  const pendingCount = document.getElementById("pending");
  const connection = document.getElementById("connection");
  if (!device || !poll) {
    question.textContent = "Open this page as kiosk.html#device=ID&password=PW&poll=POLL";
    return;
  }
  const config = await fetch("config.json").then((r) => r.json());
  const store = await openStore(device);
  const inFlight = new Set(); // seqs sent on this connection and not answered
  let client = null;

  async function showPending() {
    pendingCount.textContent = String((await storedVotes(store)).length);
  }

  function setConnection(state, text) {
    connection.dataset.state = state;
    connection.textContent = text;
  }

  // Sends every stored vote not sent on this connection in the last 30 s (rules 3 and 4),
  // none 4096 or more above the oldest one still waiting in its epoch (rule 5).
  async function flush() {
    if (!client || !client.connected) return;
    const now = Date.now();
    const votes = await storedVotes(store);
    const oldest = new Map();
    for (const v of votes) oldest.set(v.epoch, Math.min(v.seq, oldest.get(v.epoch) ?? v.seq));
    for (const vote of votes) {
      if (vote.seq - oldest.get(vote.epoch) >= 4096) continue;
      const key = `${vote.epoch}:${vote.seq}`;
      if (inFlight.has(key) && now - vote.sentAt < 30000) continue;
      inFlight.add(key);
      vote.sentAt = now;
      client.publish(`votes/${vote.poll}/${device}`, new Uint8Array(vote.payload), { qos: 1 });
    }
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
      answer.dataset.code = "";
      answer.textContent = "Sending…";
      await storeVote(store, poll, choice);
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

  client = mqtt.connect(config.ws_url, {
    protocolVersion: 4,
    clientId: device, // the broker checks it against the account (docs/protocol.md, Topics)
    username: device,
    password,
    reconnectPeriod: 2000,
    connectTimeout: 10000,
    // A voter should see at once that the kiosk is cut off: a ping every 5 s, so a dead
    // network shows within about 10 s (mqtt.js waits 1.5 keepalives for the answer).
    keepalive: 5,
    clean: true,
  });
  client.on("connect", async () => {
    setConnection("connected", "connected");
    inFlight.clear(); // a new connection: everything stored goes again
    client.subscribe([`acks/${device}`, `polls/${poll}/config`], { qos: 1 });
    await flush();
  });
  client.on("reconnect", () => setConnection("reconnecting", "reconnecting…"));
  client.on("offline", () => setConnection("offline", "offline"));
  client.on("close", () => {
    if (connection.dataset.state === "connected") setConnection("offline", "offline");
  });
  client.on("error", (err) => setConnection("offline", `error: ${err.message}`));
  client.on("message", async (topic, payload) => {
    if (topic === `polls/${poll}/config`) {
      if (payload.length === 0) return;
      try {
        drawPoll(JSON.parse(new TextDecoder().decode(payload)));
      } catch (e) { /* not a config */ }
      return;
    }
    if (topic !== `acks/${device}`) return;
    let entries;
    try {
      entries = decodeAck(payload);
    } catch (e) {
      return;
    }
    for (const [epoch, seq, code] of entries) {
      if (epoch === null || seq === null) continue; // a message-level refusal: send again later
      inFlight.delete(`${epoch}:${seq}`);
      await settleVote(store, epoch, seq); // any code is final for its vote (rule 3)
      answer.dataset.code = String(code);
      answer.textContent = ANSWERS[code] || `Not counted (code ${code}).`;
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
    if (!client.connected) client.reconnect();
  });
  setInterval(flush, 5000);
  await showPending();
}

window.voteboxKiosk = { encodeVote, decodeAck };
if (!window.VOTEBOX_KIOSK_NO_START) main();

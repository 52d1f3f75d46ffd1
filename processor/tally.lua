-- votebox tally: de-duplicate and count one batch of votes for ONE poll, atomically.
--
-- Rule: phase 1 only reads and decides; phase 2 only writes. A Lua error can therefore happen
-- only before the first write, and Redis never keeps half a batch.
--
-- KEYS[1] votebox:{poll}:poll     hash  n_options, state, ...
-- KEYS[2] votebox:{poll}:tally    hash  c:<option> counts, total, version, updated_ms
-- KEYS[3] votebox:{poll}:fates    hash  accepted, duplicate and rejection counts by reason code
-- KEYS[4] votebox:{poll}:devices  hash  device -> "epoch:max_seq"
-- KEYS[5] votebox:{poll}:points   stream of accepted votes waiting for InfluxDB
-- ARGV[1] now_ms    ARGV[2] window bits W    ARGV[3] window key prefix votebox:{poll}:win:
-- ARGV[4] points queue bound (0: InfluxDB is off, queue nothing)   ARGV[5] clock skew, s
-- ARGV[6..] one per vote, tab-separated: device, epoch, seq, choice ("3", or "1,4"), device
--          ts in s or "". One packed argument instead of five: packing arguments was 16% of
--          the processor's CPU (docs/benchmarks.md).
--
-- The de-duplication window of a device is a ring of W bits (key prefix .. device): bit
-- seq % W is set when seq was counted. It is exact for seqs above max_seq - W; older ones are
-- SEQ_TOO_OLD (never counted twice). Memory per device and poll: W/8 bytes.
--
-- Returns {version, code_1, ..., code_n}: version of the tally after the batch, then a Fate
-- (0 accepted, 1 duplicate) or Reason (16 up) per vote; processor/reasons.py names them.

local ACCEPTED, DUPLICATE = 0, 1
local UNKNOWN_POLL, UNKNOWN_OPTION, SEQ_TOO_OLD, STALE_EPOCH, TOO_MANY_CHOICES = 24, 25, 26, 27, 28
local NAMES = {[0] = 'accepted', [1] = 'duplicate', [24] = 'unknown_poll',
  [25] = 'unknown_option', [26] = 'seq_too_old', [27] = 'stale_epoch', [28] = 'too_many_choices'}

local now_ms = ARGV[1]
local W = tonumber(ARGV[2])
local win_prefix = ARGV[3]
local queue_max = tonumber(ARGV[4])
local skew_s = tonumber(ARGV[5])
local FIRST = 6
local n_votes = #ARGV - FIRST + 1

local poll_fields = redis.call('HMGET', KEYS[1], 'n_options', 'created_ms')
local n_options = tonumber(poll_fields[1] or '')
local created_s = math.floor(tonumber(poll_fields[2] or '0') / 1000)
local now_s = math.floor(tonumber(now_ms) / 1000)
-- codes[1] is the version, filled in last; unpack() of a long list would overflow Lua's stack.
local codes = {0}
local fates = {}

local function note(code)
  codes[#codes + 1] = code
  fates[code] = (fates[code] or 0) + 1
end

if not n_options then
  for _ = 1, n_votes do note(UNKNOWN_POLL) end
  for code, n in pairs(fates) do redis.call('HINCRBY', KEYS[3], NAMES[code], n) end
  codes[1] = tonumber(redis.call('HGET', KEYS[2], 'version') or '0')
  return codes
end

-- Phase 1: decide every vote against the stored state plus what this batch already decided.
-- device -> {e, m0, m, reset, seen = {seq = true}, bits = {seq ...}}. Seqs go back to Redis as
-- the strings they came in (es, ms): Lua prints numbers above 1e14 in exponent form.
local devs = {}
local counted = {}    -- option -> votes to add
local points = {}     -- {device, epoch, seq, option, ts_s, ts_source} per counted vote
local n_counted = 0

for i = 0, n_votes - 1 do
  local device, epoch_s, seq_s, choice_s, ts_arg =
    string.match(ARGV[FIRST + i], '^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)$')
  local epoch, seq = tonumber(epoch_s), tonumber(seq_s)
  local choice = tonumber(choice_s)

  local d = devs[device]
  if not d then
    local stored = redis.call('HGET', KEYS[4], device)
    local es, ms = '-1', '-1'
    if stored then
      local sep = string.find(stored, ':', 1, true)
      es, ms = string.sub(stored, 1, sep - 1), string.sub(stored, sep + 1)
    end
    d = {e = tonumber(es), es = es, m0 = tonumber(ms), m = tonumber(ms), ms = ms,
         reset = false, seen = {}, bits = {}}
    devs[device] = d
  end

  if not choice then
    note(TOO_MANY_CHOICES)
  elseif choice >= n_options then
    note(UNKNOWN_OPTION)
  elseif d.e >= 0 and epoch < d.e then
    note(STALE_EPOCH)
  else
    if epoch > d.e then
      -- A new epoch: the device lost its seq store; its old window means nothing now.
      d.reset = d.e >= 0 or d.m0 >= 0
      d.e, d.es, d.m0, d.m, d.ms, d.seen, d.bits = epoch, epoch_s, -1, -1, '-1', {}, {}
    end
    if d.m >= 0 and seq <= d.m - W then
      note(SEQ_TOO_OLD)
    elseif d.seen[seq] then
      note(DUPLICATE)
    elseif seq <= d.m0 and redis.call('GETBIT', win_prefix .. device, seq % W) == 1 then
      -- seq <= m0 and inside the window: the stored bit is still valid, since advances made
      -- by this batch clear only positions of seqs at or below d.m - W.
      note(DUPLICATE)
    else
      note(ACCEPTED)
      d.seen[seq] = true
      d.bits[#d.bits + 1] = seq
      -- docs/analytics.md, Timestamps: the device's clock when plausible, else ours.
      local ts, src = tonumber(ts_arg), 'device'
      if not ts or ts < created_s - skew_s or ts > now_s + skew_s then ts, src = now_s, 'server' end
      points[#points + 1] = {device, epoch_s, seq_s, choice, ts, src}
      if seq > d.m then d.m, d.ms = seq, seq_s end
      counted[choice] = (counted[choice] or 0) + 1
      n_counted = n_counted + 1
    end
  end
end

-- Phase 2: write. Clear the ring positions of seqs (m0, m] that the window advanced over,
-- then set the bits of the counted seqs.
local function clear_bits(key, lo, hi)
  while lo <= hi and lo % 8 ~= 0 do redis.call('SETBIT', key, lo, 0); lo = lo + 1 end
  while hi >= lo and (hi + 1) % 8 ~= 0 do redis.call('SETBIT', key, hi, 0); hi = hi - 1 end
  if hi >= lo then redis.call('SETRANGE', key, lo / 8, string.rep('\0', (hi - lo + 1) / 8)) end
end

for device, d in pairs(devs) do
  local key = win_prefix .. device
  if d.reset then redis.call('DEL', key) end
  if d.m > d.m0 then
    local from = d.m0 + 1
    if d.m - from + 1 >= W then
      redis.call('DEL', key)
    elseif d.m0 >= 0 then
      local lo, hi = from % W, d.m % W
      if lo <= hi then
        clear_bits(key, lo, hi)
      else
        clear_bits(key, lo, W - 1)
        clear_bits(key, 0, hi)
      end
    end
  end
  for _, seq in ipairs(d.bits) do redis.call('SETBIT', key, seq % W, 1) end
  if #d.bits > 0 or d.reset then
    redis.call('HSET', KEYS[4], device, d.es .. ':' .. d.ms)
  end
end

-- The points for InfluxDB, in the same atomic step as the count: a committed vote is always
-- either queued here or counted as point_dropped when the queue is at its bound.
if queue_max > 0 and #points > 0 then
  local room = math.max(0, queue_max - redis.call('XLEN', KEYS[5]))
  for j, p in ipairs(points) do
    if j > room then
      redis.call('HINCRBY', KEYS[3], 'point_dropped', #points - room)
      break
    end
    redis.call('XADD', KEYS[5], '*', 'd', p[1], 'e', p[2], 's', p[3], 'o', p[4], 't', p[5],
      'src', p[6])
  end
end

for code, n in pairs(fates) do redis.call('HINCRBY', KEYS[3], NAMES[code], n) end

if n_counted > 0 then
  for option, n in pairs(counted) do redis.call('HINCRBY', KEYS[2], 'c:' .. option, n) end
  redis.call('HINCRBY', KEYS[2], 'total', n_counted)
  redis.call('HSET', KEYS[2], 'updated_ms', now_ms)
  codes[1] = redis.call('HINCRBY', KEYS[2], 'version', 1)
else
  codes[1] = tonumber(redis.call('HGET', KEYS[2], 'version') or '0')
end
return codes

-- votebox tally: de-duplicate and count one batch of votes for ONE poll, atomically.
--
-- Rule: phase 1 only reads and decides; phase 2 only writes. A Lua error can therefore happen
-- only before the first write, and Redis never keeps half a batch.
--
-- KEYS[1] votebox:{poll}:poll     hash  n_options, state, ...
-- KEYS[2] votebox:{poll}:tally    hash  c:<option> counts, total, version, updated_ms,
--                                      queued_points, chain_length, chain_head (the chain)
-- KEYS[3] votebox:{poll}:fates    hash  accepted, duplicate and rejection counts by reason code
-- KEYS[4] votebox:{poll}:devices  hash  device -> "epoch:max_seq:run_start" (see the window)
-- KEYS[5] votebox:{poll}:points   stream of accepted votes waiting for InfluxDB, an entry
--                                      per batch
-- KEYS[6] votebox:{poll}:voters  hash  voter (hex) -> "ts\tseq\tdevice\toptions\tepoch\tsite"
--                                      of the vote that counts
-- KEYS[7] votebox:{poll}:presses hash  device -> time (s) of its last counted press (cooldown)
-- KEYS[8] votebox:{poll}:suppressed  stream of presses inside the cooldown (capped)
-- KEYS[9] votebox:{poll}:minutes  hash  minute (Unix time / 60) -> votes accepted in it
-- KEYS[10] votebox:{poll}:commit:<token>  optional: this batch's answer, kept ARGV[6] ms, so a
--         retry after a lost reply gets the same answer instead of "duplicate" of itself
-- ARGV[1] now_ms    ARGV[2] window bits W    ARGV[3] window key prefix votebox:{poll}:win:
-- ARGV[4] points queue bound (0: InfluxDB is off, queue nothing)   ARGV[5] clock skew, s
-- ARGV[6] how long the answer is kept under KEYS[10], ms
-- ARGV[7] the poll's shards as the caller believes, ARGV[8] which of them these keys are
--         (keys.py, shard_of): a caller that guessed wrong is told {-1, shards} (0: this shard
--         has no definition) and nothing is written, so it routes the votes again; a call
--         for a poll that does not exist is told {-2}, and nothing is written either
-- ARGV[9..] one per vote, tab-separated: device, epoch, seq, choice ("3", or "1,4": values as
--          the device sent them), device ts in s or "", voter in hex or "", the device's
--          site (keys.DEVICES_SITE) or "", stored with its points. One packed
--          argument instead of six: packing arguments was 16% of the processor's CPU
--          (docs/benchmarks.md).
--
-- The rules, in order (docs/protocol.md, Polls): the choice must fit the poll's type; then
-- epoch and de-duplication; then the poll's window (not open yet, or closed unless the device
-- cast it while open and it arrives within the grace period); then a voter for a
-- one-vote-per-voter poll; from here the seq is spent. Then the cooldown (suppressed), then the
-- voter's latest vote (by time, then seq, then device id) wins: an older one is superseded, a
-- newer one moves the voter's count.
--
-- The de-duplication window of a device is its run plus a ring of W bits (key prefix ..
-- device). The run [run_start, max_seq] holds seqs all counted: a device that sends its seqs
-- in order only moves max_seq, and writes no bit. Below the run, bit seq % W is set when seq
-- was counted: the ring is exact for seqs in (max_seq - W, run_start), and its positions of
-- the run's seqs mean nothing. A vote above max_seq + 1 (a gap) ends the run: its seqs are
-- written to the ring as set and the gap's as clear, and a new run starts at the vote. Seqs at
-- or below max_seq - W are SEQ_TOO_OLD (never counted twice). Memory per device and poll: W/8
-- bytes at most. State that earlier versions stored as "epoch:max_seq" is a run of none.
--
-- The chain (docs/security.md, The chain): the votes this call accepts are entries of the
-- shard's append-only log, numbered from 1 in the order they were accepted. Each call that
-- accepts any is one link: chain_head = SHA-1(chain_head .. "\n" .. its entries, one per line),
-- from a head of forty zeros (processor/audit.py rebuilds it, `entry_text` there is the entry).
-- It is written with the counts, so it is exactly as atomic and as replicated (WAIT) as they
-- are; an answer given again from KEYS[10] adds no link. The batch's points entry says where
-- its link starts, how many entries it has and the head it made, and its first point of each
-- entry is marked: the drainer gives every point its entry's number, and the points of the
-- link's last entry its head (influx/line_protocol.py), so the log can be rebuilt from
-- InfluxDB alone, and a change in it found at its link. Nothing here formats a number per
-- vote: that was most of the chain's cost.
--
-- Returns {version, code_1, ..., code_n, chain_length}: version of this shard's tally after
-- the batch, then a Fate (0 accepted, 1 duplicate, 3 superseded, 4 suppressed) or Reason (16
-- up) per vote (processor/reasons.py names them), then the chain's length before the batch:
-- the k-th accepted vote is entry chain_length + k (a device's receipt).

local ACCEPTED, DUPLICATE, SUPERSEDED, SUPPRESSED = 0, 1, 3, 4
local UNKNOWN_POLL, UNKNOWN_OPTION, SEQ_TOO_OLD, STALE_EPOCH, TOO_MANY_CHOICES = 24, 25, 26, 27, 28
local POLL_NOT_OPEN, POLL_CLOSED, MISSING_VOTER = 30, 31, 32
local NAMES = {[0] = 'accepted', [1] = 'duplicate', [3] = 'superseded', [4] = 'suppressed',
  [24] = 'unknown_poll', [25] = 'unknown_option', [26] = 'seq_too_old', [27] = 'stale_epoch',
  [28] = 'too_many_choices', [30] = 'poll_not_open', [31] = 'poll_closed',
  [32] = 'missing_voter'}
local SUPPRESSED_MAXLEN = 100000

-- One poll (shard): KEYS and ARGV as described above, given by the caller or, for a call
-- that carries several polls, by the loop at the end of this file.
local function tally_poll(KEYS, ARGV)
local now_ms = ARGV[1]
local W = tonumber(ARGV[2])
local win_prefix = ARGV[3]
local queue_max = tonumber(ARGV[4])
local skew_s = tonumber(ARGV[5])
local answer_ms = ARGV[6]
local assumed_shards = tonumber(ARGV[7])
local shard = tonumber(ARGV[8])
local FIRST = 9
local n_votes = #ARGV - FIRST + 1
local answer_key = KEYS[10]

if answer_key then
  local answered = redis.call('GET', answer_key)
  if answered then return cjson.decode(answered) end
end

-- Remembers the answer (see KEYS[10]) and returns it.
local function answer(codes)
  if answer_key then redis.call('SET', answer_key, cjson.encode(codes), 'PX', answer_ms) end
  return codes
end

local def = redis.call('HMGET', KEYS[1], 'n_options', 'created_ms', 'type', 'max_choices',
  'scale_min', 'opens_ms', 'closes_ms', 'grace_s', 'one_per_voter', 'cooldown_s', 'shards')
local n_options = tonumber(def[1] or '')
local shards = tonumber(def[11] or '1') or 1
if (not n_options and shard > 0) or (n_options and shards ~= assumed_shards) then
  return {-1, n_options and shards or 0}
end
local created_s = math.floor(tonumber(def[2] or '0') / 1000)
local multiple = def[3] == 'multiple'
local max_choices = tonumber(def[4] or '1') or 1
local scale_min = tonumber(def[5] or '0') or 0
local opens_ms = tonumber(def[6] or '0') or 0
local closes_ms = tonumber(def[7] or '0') or 0
local grace_ms = (tonumber(def[8] or '0') or 0) * 1000
local per_voter = def[9] == '1'
local cooldown_s = tonumber(def[10] or '0') or 0
local now = tonumber(now_ms)
local now_s = math.floor(now / 1000)
local now_s_s = string.format('%.0f', now_s)
-- codes[1] is the version, filled in last; unpack() of a long list would overflow Lua's stack.
local codes = {0}
local fates = {}

local function note(code)
  codes[#codes + 1] = code
  fates[code] = (fates[code] or 0) + 1
end

-- No such poll: write nothing, not even the answer, so a made-up poll id makes no key (docs/
-- security.md); the caller counts its votes as unattributed unknown_poll.
if not n_options then return {-2} end

-- The option indexes of a choice, or nil and the reason it does not fit the poll.
local function options_of(choice_s)
  local opts = {}
  for part in string.gmatch(choice_s, '[^,]+') do
    local index = tonumber(part) - scale_min
    if index < 0 or index >= n_options then return nil, UNKNOWN_OPTION end
    opts[#opts + 1] = index
  end
  if #opts > (multiple and max_choices or 1) then return nil, TOO_MANY_CHOICES end
  -- Lowest first: a choice's options are a set, and its chain entry names them in one order.
  if #opts > 1 then table.sort(opts) end
  return opts
end

-- Whether the poll's window takes a vote arriving now, cast at device time dev_ts (s, or nil
-- when the device gave none or its clock is not plausible).
local function window_refuses(dev_ts)
  if opens_ms > 0 and now < opens_ms then return POLL_NOT_OPEN end
  if closes_ms > 0 and now >= closes_ms then
    -- docs/protocol.md, Windows: an offline kiosk's vote, cast while the poll was open.
    local cast_ms = dev_ts and dev_ts * 1000
    if cast_ms and cast_ms < closes_ms and cast_ms >= opens_ms and now <= closes_ms + grace_ms
    then
      return nil
    end
    return POLL_CLOSED
  end
  return nil
end

-- Is vote a (ts, seq, device) later than vote b?
local function later(ts_a, seq_a, dev_a, ts_b, seq_b, dev_b)
  if ts_a ~= ts_b then return ts_a > ts_b end
  if seq_a ~= seq_b then return seq_a > seq_b end
  return dev_a > dev_b
end

-- Phase 1: decide every vote against the stored state plus what this batch already decided.
-- A device's de-duplication state (the window, above), as stored and as decided so far:
--   epoch, epoch_s          its epoch, as a number and as the text it came in
--   stored_max, stored_run  max_seq and run_start as stored (-1 and 0 for a device without)
--   max, max_s, run         the same as decided so far in this batch
--   reset                   a new epoch replaced a stored state: its ring is cleared in phase 2
--   seen                    seq -> true for every seq this batch spent
-- Seqs go back to Redis as the strings they came in (epoch_s, max_s) or formatted with %.0f:
-- Lua prints numbers above 1e14 in exponent form.
local devs = {}
local counted = {}    -- option -> votes to add (negative when a voter's vote moved away)
-- {device, epoch, seq, option, ts_s, ts_source, withdrawn ('1' or ''), site} per counted
-- option, and per option a voter's changed vote no longer counts for.
local points = {}
local suppressed = {} -- {device, epoch, seq, choice, ts_s}
local presses = {}    -- device -> last counted press (s), loaded or decided
local voters = {}     -- voter -> {ts, seq, device, seq_s, opts_s, epoch_s, site}
local voters_changed = {}
local presses_changed = {}
-- The chain entries of the votes this batch accepts, in order (a point's entry is its
-- number here until phase 2 knows the chain's length).
local entries = {}
local n_counted, changed = 0, false

-- The batch's votes, and every device's stored "epoch:max_seq:run_start" in one HMGET per
-- CHUNK devices (unpack() has a stack limit), not one HGET per device: per-call overhead was
-- most of the script's cost per distinct device.
local CHUNK = 1000
local parsed = {}
local order = {}
local function read_state()
  for i = 0, n_votes - 1 do
    local device, epoch_s, seq_s, choice_s, ts_arg, voter, site = string.match(ARGV[FIRST + i],
      '^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t?([^\t]*)$')
    parsed[i + 1] = {device, epoch_s, seq_s, choice_s, ts_arg, voter, site}
    if not devs[device] then
      devs[device] = true
      order[#order + 1] = device
    end
  end
  for from = 1, #order, CHUNK do
    local to = math.min(from + CHUNK - 1, #order)
    local stored_all = redis.call('HMGET', KEYS[4], unpack(order, from, to))
    for j = from, to do
      local stored = stored_all[j - from + 1]
      local epoch_s, max_s, run_s = '-1', '-1', nil
      if stored then
        epoch_s, max_s, run_s = string.match(stored, '^([^:]*):([^:]*):?([^:]*)$')
      end
      local max = tonumber(max_s)
      -- A state stored as "epoch:max_seq" (before runs): a run of none, just above max_seq.
      local run = tonumber(run_s) or max + 1
      devs[order[j]] = {epoch = tonumber(epoch_s), epoch_s = epoch_s, stored_max = max,
                        stored_run = run, max = max, max_s = max_s, run = run,
                        reset = false, seen = {}}
    end
  end
end

-- Whether de-duplication refuses seq of a device in its known epoch: SEQ_TOO_OLD below the
-- window, DUPLICATE for a seq this batch spent, in the stored run, or set in the ring; nil
-- for a new one.
local function repeat_of(device, d, seq)
  if d.max >= 0 and seq <= d.max - W then return SEQ_TOO_OLD end
  if d.seen[seq] or (seq >= d.stored_run and seq <= d.stored_max) then return DUPLICATE end
  -- Below the stored run and inside the window: the stored bit is valid (this batch writes
  -- none before phase 2, and what it counted is in seen).
  if seq < d.stored_run and redis.call('GETBIT', win_prefix .. device, seq % W) == 1 then
    return DUPLICATE
  end
  return nil
end

-- Spends seq: from here a re-send of this vote is a duplicate, whatever its fate. A new epoch
-- (the device lost its seq store) first replaces the device's state: its old window means
-- nothing now. A gap ends the run; a late seq just below the run joins it.
local function spend(d, fresh, epoch, epoch_s, seq, seq_s)
  if fresh then
    d.reset = d.reset or d.epoch >= 0 or d.stored_max >= 0
    d.epoch, d.epoch_s, d.stored_max, d.stored_run = epoch, epoch_s, -1, 0
    d.max, d.max_s, d.run, d.seen = -1, '-1', 0, {}
  end
  d.seen[seq] = true
  if seq > d.max + 1 then
    d.run = seq  -- phase 2 writes the old run and the gap to the ring
  elseif seq == d.run - 1 then
    d.run = seq
    if seq == d.stored_max + 1 then d.run = d.stored_run end  -- joins the stored run (a swap)
  end
  if seq > d.max then d.max, d.max_s = seq, seq_s end
end

-- The device's last counted press (s), for the cooldown: loaded once, then as decided.
local function last_press(device)
  local last = presses[device]
  if last == nil then
    last = tonumber(redis.call('HGET', KEYS[7], device) or '') or false
    presses[device] = last
  end
  return last
end

-- The vote that counts for a voter (false for none): loaded once, then as decided.
local function voter_vote(voter)
  local prior = voters[voter]
  if prior == nil then
    local stored = redis.call('HGET', KEYS[6], voter)
    prior = false
    if stored then
      -- The site came sixth from 2026-12-03: older records have five fields.
      local pts, pseq, pdev, popts, pepoch, psite = string.match(stored,
        '^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t?([^\t]*)$')
      prior = {ts = tonumber(pts), seq = tonumber(pseq), device = pdev, seq_s = pseq,
               opts_s = popts, epoch_s = pepoch, site = psite}
    end
    voters[voter] = prior
  end
  return prior
end

-- A spent vote: suppressed inside the device's cooldown, superseded by a later vote of its
-- voter, or counted (moving its voter's earlier vote, with a point of value -1 per option it
-- no longer counts for: docs/analytics.md, Changed votes).
local function count(device, epoch_s, seq, seq_s, choice_s, opts, ts, ts_s, src, voter, site)
  local last = nil
  if cooldown_s > 0 then last = last_press(device) end
  if last and math.abs(ts - last) < cooldown_s then
    note(SUPPRESSED)
    suppressed[#suppressed + 1] = {device, epoch_s, seq_s, choice_s, ts}
    return
  end
  local prior = per_voter and voter_vote(voter) or nil
  if prior and not later(ts, seq, device, prior.ts, prior.seq, prior.device) then
    note(SUPERSEDED)
    return
  end
  note(ACCEPTED)
  changed = true
  if cooldown_s > 0 then
    presses[device] = last and math.max(last, ts) or ts
    presses_changed[device] = true
  end
  local entry = #entries + 1
  local mark = '+'  -- on the entry's first point
  local replaced = ''
  if prior then
    local prior_opts = {}
    for part in string.gmatch(prior.opts_s, '[^,]+') do
      local o = tonumber(part)
      prior_opts[#prior_opts + 1] = o
      counted[o] = (counted[o] or 0) - 1
      points[#points + 1] = {prior.device, prior.epoch_s, prior.seq_s, o, ts_s, src, '1',
                             prior.site, mark}
      mark = ''
    end
    table.sort(prior_opts)  -- stored unsorted before the chain
    replaced = prior.device .. '/' .. prior.epoch_s .. '/' .. prior.seq_s .. '/'
      .. table.concat(prior_opts, ',')
  else
    n_counted = n_counted + 1
  end
  local opts_s = table.concat(opts, ',')
  entries[entry] = device .. '\t' .. epoch_s .. '\t' .. seq_s .. '\t' .. opts_s .. '\t' .. ts_s
    .. '\t' .. src .. '\t' .. replaced
  if per_voter then
    voters[voter] = {ts = ts, seq = seq, device = device, seq_s = seq_s, opts_s = opts_s,
                     epoch_s = epoch_s, site = site}
    voters_changed[voter] = true
  end
  for _, o in ipairs(opts) do
    counted[o] = (counted[o] or 0) + 1
    points[#points + 1] = {device, epoch_s, seq_s, o, ts_s, src, '', site, mark}
    mark = ''
  end
end

read_state()
for i = 1, n_votes do
  local device, epoch_s, seq_s, choice_s, ts_arg, voter, site = unpack(parsed[i])
  local epoch, seq = tonumber(epoch_s), tonumber(seq_s)
  local d = devs[device]

  -- docs/analytics.md, Timestamps: the device's clock when plausible, else ours.
  local dev_ts = tonumber(ts_arg)
  if dev_ts and (dev_ts < created_s - skew_s or dev_ts > now_s + skew_s) then dev_ts = nil end
  local ts, src = dev_ts or now_s, dev_ts and 'device' or 'server'
  -- As text too: the device's as it came (the processor sends it in decimal), or ours.
  local ts_s = dev_ts and ts_arg or now_s_s

  -- The rules in their order (above); a refused vote leaves its seq unspent, and a new epoch
  -- is adopted only by a vote that spends its seq.
  local opts, refusal = options_of(choice_s)
  if opts and d.epoch >= 0 and epoch < d.epoch then refusal = STALE_EPOCH end
  local fresh = epoch > d.epoch
  if not refusal and not fresh then refusal = repeat_of(device, d, seq) end
  if not refusal then refusal = window_refuses(dev_ts) end
  if not refusal and per_voter and voter == '' then refusal = MISSING_VOTER end
  if refusal then
    note(refusal)
  else
    spend(d, fresh, epoch, epoch_s, seq, seq_s)
    count(device, epoch_s, seq, seq_s, choice_s, opts, ts, ts_s, src, voter, site)
  end
end

-- The tally's numbers this batch changes, read once here (phase 1 only reads) and written
-- back below with one HSET, not an HINCRBY each: in a batch spread over many polls a poll's
-- share is a vote or two, and each call of its own was most of its cost. A field that is not
-- a number stops the batch here, before any write.
local tally_fields = {'chain_head', 'version', 'queued_points', 'total', 'chain_length'}
for option in pairs(counted) do tally_fields[#tally_fields + 1] = 'c:' .. option end
local stored_tally = redis.call('HMGET', KEYS[2], unpack(tally_fields))
local chain_head = stored_tally[1] or string.rep('0', 40)
local tally = {}
for j = 2, #tally_fields do
  local field = tally_fields[j]
  local value = stored_tally[j]
  tally[field] = tonumber(value or '0')
  if not tally[field] then error('tally field ' .. field .. ' is not a number: ' .. value) end
end
local tally_changes = {}
local chain_length = tally.chain_length
-- One link: the entries above, hashed once per call, not once per vote.
local new_head = chain_head
if #entries > 0 then new_head = redis.sha1hex(chain_head .. '\n' .. table.concat(entries, '\n')) end

-- Phase 2: write. The ring must be exact for seqs in (m - W, r) once more: below the stored
-- run it was, but for the seqs this batch counted there; the stored run's seqs and those
-- above it that now lie below the run (a gap) are written whole.
local function fill_positions(key, lo, hi, bit)
  while lo <= hi and lo % 8 ~= 0 do redis.call('SETBIT', key, lo, bit); lo = lo + 1 end
  while hi >= lo and (hi + 1) % 8 ~= 0 do redis.call('SETBIT', key, hi, bit); hi = hi - 1 end
  if hi >= lo then
    redis.call('SETRANGE', key, lo / 8, string.rep(bit == 1 and '\255' or '\0', (hi - lo + 1) / 8))
  end
end

-- Sets (bit 1) or clears (0) the ring positions of seqs lo..hi, fewer than W of them.
local function fill_seqs(key, lo, hi, bit)
  if lo > hi then return end
  local a, b = lo % W, hi % W
  if a <= b then
    fill_positions(key, a, b, bit)
  else
    fill_positions(key, a, W - 1, bit)
    fill_positions(key, 0, b, bit)
  end
end

-- The ring of one device, exact again for seqs in (max - W, run).
local function write_ring(device, d)
  local key = nil  -- the ring's key, built only for a device whose ring is written (few are)
  local low = d.max - W + 1  -- the lowest seq the window still holds
  -- A new epoch, or a window moved past all it held: every position clear, and only the
  -- counted seqs below the run need setting. A device with no state has no ring yet.
  local clear = d.stored_max < 0
  if d.reset or (not clear and low > d.stored_max) then
    key = win_prefix .. device
    redis.call('DEL', key)
    clear = true
  end
  if not clear and d.run > d.stored_run then
    -- The stored run, now below the run, is all set; the seqs between it and the run are
    -- set where this batch counted them (below), clear otherwise.
    key = key or win_prefix .. device
    fill_seqs(key, math.max(d.stored_run, low), math.min(d.stored_max, d.run - 1), 1)
    fill_seqs(key, math.max(d.stored_max + 1, low), d.run - 1, 0)
  end
  for seq in pairs(d.seen) do
    if seq < d.run and seq >= low then
      key = key or win_prefix .. device
      redis.call('SETBIT', key, seq % W, 1)
    end
  end
end

local stored_devs = {}
for _, device in ipairs(order) do
  local d = devs[device]
  write_ring(device, d)
  if d.max ~= d.stored_max or d.run ~= d.stored_run or d.reset then
    stored_devs[#stored_devs + 1] = device
    stored_devs[#stored_devs + 1] = d.epoch_s .. ':' .. d.max_s .. ':' .. string.format('%.0f', d.run)
  end
end
for from = 1, #stored_devs, 2 * CHUNK do
  redis.call('HSET', KEYS[4], unpack(stored_devs, from, math.min(from + 2 * CHUNK - 1,
    #stored_devs)))
end

-- The points for InfluxDB, in the same atomic step as the count: a committed vote is always
-- either queued here or counted as point_dropped when the queue is at its bound. One stream
-- entry per batch, its points one per line (influx/line_protocol.py, points_of_entry): an entry per point
-- was a third of this script's time, and as much again for the drainer to read and delete.
-- The tally's queued_points (keys.QUEUED_POINTS) counts the points queued (the drainer takes
-- them off).
if queue_max > 0 and #points > 0 then
  local queued = tally.queued_points
  local n = math.min(#points, math.max(0, queue_max - queued))
  if n < #points then redis.call('HINCRBY', KEYS[3], 'point_dropped', #points - n) end
  if n > 0 then
    local lines = {}
    for j = 1, n do lines[j] = table.concat(points[j], '\t') end
    redis.call('XADD', KEYS[5], '*', 'n', n, 'p', table.concat(lines, '\n'),
      'c', string.format('%.0f', chain_length), 'm', #entries, 'h', new_head)
    tally_changes[#tally_changes + 1] = 'queued_points'
    tally_changes[#tally_changes + 1] = string.format('%.0f', queued + n)
  end
end

for _, p in ipairs(suppressed) do
  redis.call('XADD', KEYS[8], 'MAXLEN', '~', SUPPRESSED_MAXLEN, '*', 'd', p[1], 'e', p[2],
    's', p[3], 'c', p[4], 't', p[5], 'reason', 'cooldown')
end
for device in pairs(presses_changed) do redis.call('HSET', KEYS[7], device, presses[device]) end
for voter in pairs(voters_changed) do
  local v = voters[voter]
  redis.call('HSET', KEYS[6], voter, v.ts .. '\t' .. v.seq_s .. '\t' .. v.device .. '\t'
    .. v.opts_s .. '\t' .. v.epoch_s .. '\t' .. v.site)
end

for code, n in pairs(fates) do redis.call('HINCRBY', KEYS[3], NAMES[code], n) end
-- Votes per minute, for the retained series (poll_store.read_series trims the old minutes).
if fates[ACCEPTED] then
  redis.call('HINCRBY', KEYS[9], math.floor(now / 60000), fates[ACCEPTED])
end

local function change(field, value)
  tally_changes[#tally_changes + 1] = field
  tally_changes[#tally_changes + 1] = string.format('%.0f', value)
end
codes[1] = tally.version
if changed then
  for option, n in pairs(counted) do
    if n ~= 0 then change('c:' .. option, tally['c:' .. option] + n) end
  end
  if n_counted > 0 then change('total', tally.total + n_counted) end
  tally_changes[#tally_changes + 1] = 'updated_ms'
  tally_changes[#tally_changes + 1] = now_ms
  codes[1] = tally.version + 1
  change('version', codes[1])
  change('chain_length', chain_length + #entries)
  tally_changes[#tally_changes + 1] = 'chain_head'
  tally_changes[#tally_changes + 1] = new_head
end
codes[#codes + 1] = chain_length
if #tally_changes > 0 then redis.call('HSET', KEYS[2], unpack(tally_changes)) end
return answer(codes)
end

-- One call for a whole batch on a single Redis node (tally.py, Tally._batch_call): saves a
-- script call per poll. ARGV[1] '*', ARGV[2..6] as ARGV[1], [2], [4], [5], [6] above,
-- ARGV[7] the batch's answer key or '' (a retry gets the first answer), ARGV[8] how many key
-- suffixes follow: the suffixes of KEYS[1..9] above and of the window prefix, in that order
-- (keys.py owns them); then, per poll: its key prefix (votebox:{tag}:), its shards, which
-- shard, its votes n, then n votes. The keys are those of KEYS[1..9] above, named by
-- prefix: this path is never taken on a Redis Cluster, where each poll's keys must be given.
-- Each poll runs under pcall: its error comes before its first write (phase 1 only reads), so
-- it costs only that poll's votes, as a call of its own would. Returns one answer per poll,
-- {-3, error} for a poll that failed.
if ARGV[1] ~= '*' then return tally_poll(KEYS, ARGV) end
local batch_key = ARGV[7]
if batch_key ~= '' then
  local answered = redis.call('GET', batch_key)
  if answered then return cjson.decode(answered) end
end
local n_suffixes = tonumber(ARGV[8])
local out = {}
local i = 9 + n_suffixes
while i <= #ARGV do
  local prefix, n = ARGV[i], tonumber(ARGV[i + 3])
  local keys = {}
  for j = 1, n_suffixes - 1 do keys[j] = prefix .. ARGV[8 + j] end
  local args = {ARGV[2], ARGV[3], prefix .. ARGV[8 + n_suffixes], ARGV[4], ARGV[5], ARGV[6],
                ARGV[i + 1], ARGV[i + 2]}
  for j = 1, n do args[8 + j] = ARGV[i + 3 + j] end
  local ok, reply = pcall(tally_poll, keys, args)
  if not ok then
    reply = {-3, type(reply) == 'table' and (reply.err or 'error') or tostring(reply)}
  end
  out[#out + 1] = reply
  i = i + 4 + n
end
if batch_key ~= '' then redis.call('SET', batch_key, cjson.encode(out), 'PX', ARGV[6]) end
return out

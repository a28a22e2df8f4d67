"""The engine's Lua scripts: each moves a job between places in one atomic step.

A job is never in two places and never in none: acknowledged-and-deleted together with
its history record, moved to the delayed store together with its XACK, dead-lettered
together with its XACK.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from imsys.streams.jobids import MARK_LIVE_LUA

# Lua's unpack() has a stack limit near 8,000 values: commands take ids in chunks.
_CHUNK = """
local function chunked(cmd, key, extra, list)
  for i = 1, #list, 500 do
    local last = math.min(i + 499, #list)
    if extra then
      redis.call(cmd, key, extra, unpack(list, i, last))
    else
      redis.call(cmd, key, unpack(list, i, last))
    end
  end
end
"""

# Still ours? A job taken over by another process (we stalled past claim_idle) must not
# be retried or dead-lettered twice.
_OWNED = """
local function owned(stream, group, consumer, id)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  return p[1] ~= nil and p[1][2] == consumer
end
"""

# The history stream keeps the last ``maxlen`` outcomes, none older than ``minid``. A batch
# adds all its entries, then trims once: exact, and far cheaper than trimming per entry.
_HISTORY = """
local function history_add(key, stream, jtype, jid, outcome, ms)
  redis.call('XADD', key, '*',
    'stream', stream, 'type', jtype, 'job_id', jid, 'outcome', outcome, 'ms', ms)
end
local function history_trim(key, maxlen, minid)
  redis.call('XTRIM', key, 'MAXLEN', maxlen)
  redis.call('XTRIM', key, 'MINID', minid)
end
local function history(key, maxlen, minid, stream, jtype, jid, outcome, ms)
  if tonumber(maxlen) > 0 then
    history_add(key, stream, jtype, jid, outcome, ms)
    history_trim(key, maxlen, minid)
  end
end
"""

# The lowest id the stream must keep for ``group``: its oldest pending entry, or else its
# last-delivered id. False while another group reads the stream too (its entries are not
# ours to judge), or when the group has read nothing.
_TRIM_FLOOR = """
local function id_lt(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  if ams ~= bms then return ams < bms end
  return tonumber(aseq) < tonumber(bseq)
end
local function trim_floor(key, group)
  if redis.call('EXISTS', key) == 0 then return false end
  local groups = redis.call('XINFO', 'GROUPS', key)
  if #groups ~= 1 then return false end
  local info = groups[1]
  local name, delivered
  for i = 1, #info, 2 do
    if info[i] == 'name' then name = info[i + 1] end
    if info[i] == 'last-delivered-id' then delivered = info[i + 1] end
  end
  if name ~= group or not delivered or delivered == '0-0' then return false end
  local first = redis.call('XPENDING', key, group, '-', '+', 1)
  if #first > 0 and id_lt(first[1][1], delivered) then return first[1][1] end
  return delivered
end
"""

# KEYS: stream, stats, history, this minute's throughput counter
# ARGV: group, hist_max, hist_minid, stream_name, dedupe_prefix, batch, consumer,
#       throughput_ttl_s
# batch: JSON [ids, [[job_id, id], ...], [[type, job_id, ms], ...], verify] (one argument
# rather than five per job: packing hundreds of arguments cost the client more than the
# script). ``verify``: ids whose claim may have been taken while this process stalled;
# those another consumer owns now are left alone (theirs to settle) and returned.
ACK = (
    _CHUNK
    + _HISTORY
    + _TRIM_FLOOR
    + _OWNED
    + """
local group, hmax, hmin, sname, dprefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local batch = cjson.decode(ARGV[6])
local ids, marks, recent, verify = batch[1], batch[2], batch[3], batch[4]
local taken = {}
if #verify > 0 then
  local skip = {}
  for _, id in ipairs(verify) do
    if not owned(KEYS[1], group, ARGV[7], id) then
      skip[id] = true
      taken[#taken + 1] = id
    end
  end
  if #taken > 0 then
    local kept = {}
    for _, id in ipairs(ids) do
      if not skip[id] then kept[#kept + 1] = id end
    end
    ids = kept
    local km = {}
    for _, m in ipairs(marks) do
      if not skip[m[2]] then km[#km + 1] = m end
    end
    marks = km
  end
end
local n = #ids
if n > 0 then
  chunked('XACK', KEYS[1], group, ids)
  -- Every entry below the floor has been read and acknowledged: one XTRIM takes them
  -- all, whole nodes at a time. Only entries above the floor (finished after a job older
  -- than them that still runs) are deleted one by one, which costs a scan each.
  local floor = trim_floor(KEYS[1], group)
  if floor then redis.call('XTRIM', KEYS[1], 'MINID', floor) end
  local rest = {}
  for _, id in ipairs(ids) do
    if not floor or not id_lt(id, floor) then rest[#rest + 1] = id end
  end
  chunked('XDEL', KEYS[1], nil, rest)
  redis.call('HINCRBY', KEYS[2], 'processed', n)
  redis.call('INCRBY', KEYS[4], n)
  redis.call('EXPIRE', KEYS[4], ARGV[8])
end
for _, m in ipairs(marks) do
  local key = dprefix .. m[1]
  if redis.call('GET', key) == m[2] then redis.call('DEL', key) end
end
if #recent > 0 and tonumber(hmax) > 0 then
  for _, h in ipairs(recent) do
    history_add(KEYS[3], sname, h[1], h[2], 'done', h[3])
  end
  history_trim(KEYS[3], hmax, hmin)
end
return taken
"""
)

# KEYS: stream, delayed, stats, history
# ARGV: group, consumer, id, due_ms, member, dedupe_key|'', counter, hist_max, hist_minid,
#       stream_name, type, job_id, ms, outcome
RETRY = (
    _OWNED
    + _HISTORY
    + """
local group, consumer, id = ARGV[1], ARGV[2], ARGV[3]
if not owned(KEYS[1], group, consumer, id) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
redis.call('XACK', KEYS[1], group, id)
redis.call('XDEL', KEYS[1], id)
if ARGV[6] ~= '' then
  local v = redis.call('GET', ARGV[6])
  if v == false or v == id then redis.call('SET', ARGV[6], 'delayed:' .. ARGV[4]) end
end
redis.call('HINCRBY', KEYS[3], ARGV[7], 1)
history(KEYS[4], ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[14], ARGV[13])
return 1
"""
)

# KEYS: stream, dead, stats, history
# ARGV: group, consumer, id, dead_minid, dedupe_key|'', hist_max, hist_minid, stream_name,
#       type, job_id, ms, check_owner(1|0), field/value pairs...
DEAD = (
    _OWNED
    + _HISTORY
    + """
local group, consumer, id = ARGV[1], ARGV[2], ARGV[3]
if ARGV[12] == '1' and not owned(KEYS[1], group, consumer, id) then return 0 end
local fields = {}
for i = 13, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MINID', ARGV[4], '*', unpack(fields))
redis.call('XACK', KEYS[1], group, id)
redis.call('XDEL', KEYS[1], id)
if ARGV[5] ~= '' and redis.call('GET', ARGV[5]) == id then redis.call('DEL', ARGV[5]) end
redis.call('HINCRBY', KEYS[3], 'dead', 1)
history(KEYS[4], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], 'dead', ARGV[11])
return 1
"""
)

# KEYS: delayed, stream
# ARGV: now_ms, limit, dedupe_prefix
# A member is JSON {"f": [field, value, ...], "j": job_id or "", "u": unique}.
PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, m in ipairs(due) do
  local job = cjson.decode(m)
  local id = redis.call('XADD', KEYS[2], '*', unpack(job.f))
  if job.j ~= nil and job.j ~= '' then redis.call('SET', ARGV[3] .. job.j, id) end
  redis.call('ZREM', KEYS[1], m)
end
return #due
"""

# The job_id marks these scripts keep are described in jobids.py.
_MARK_LIVE = MARK_LIVE_LUA

# KEYS: stream, delayed, stats
# ARGV: dedupe_key|'', now_ms, stale_ms, due_ms|'', member|'', group, field/value pairs...
# Returns the new entry id, 'delayed', or 'dup:waiting' / 'dup:running' when a live job
# has the same job_id (a producer whose change may have come too late for a running job
# can then try again once it finished).
ENQUEUE = (
    _MARK_LIVE
    + """
local key, now, stale = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if key ~= '' then
  local v = redis.call('GET', key)
  if v and mark_live(KEYS[1], v, now, stale) then
    redis.call('HINCRBY', KEYS[3], 'deduplicated', 1)
    if string.sub(v, 1, 8) ~= 'delayed:' then
      local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[6], v, v, 1)
      if ok and p[1] ~= nil then return 'dup:running' end
    end
    return 'dup:waiting'
  end
end
if ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
  if key ~= '' then redis.call('SET', key, 'delayed:' .. ARGV[4]) end
  return 'delayed'
end
local fields = {}
for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
if key ~= '' then redis.call('SET', key, id) end
return id
"""
)

# ENQUEUE for many immediate jobs of one type, each with a job_id, in one call: the same
# decision per job (dropped while one like it waits or runs), one parse and one round
# trip for the lot. KEYS: stream, delayed, stats
# ARGV: group, dedupe_prefix, now_ms, stale_ms, type, (job_id, payload)...
# Returns, per job in order, the new entry id or 'dup:waiting' / 'dup:running'.
ENQUEUE_UNIQUE_MANY = (
    _MARK_LIVE
    + """
local group, dprefix, kind = ARGV[1], ARGV[2], ARGV[5]
local now, stale = tonumber(ARGV[3]), tonumber(ARGV[4])
local out, dups = {}, 0
for i = 6, #ARGV, 2 do
  local jid, payload = ARGV[i], ARGV[i + 1]
  local key = dprefix .. jid
  local v = redis.call('GET', key)
  if v and mark_live(KEYS[1], v, now, stale) then
    dups = dups + 1
    local res = 'dup:waiting'
    if string.sub(v, 1, 8) ~= 'delayed:' then
      local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], group, v, v, 1)
      if ok and p[1] ~= nil then res = 'dup:running' end
    end
    out[#out + 1] = res
  else
    local id = redis.call('XADD', KEYS[1], '*', 'type', kind, 'payload', payload,
      'attempt', '1', 'enqueued_at', ARGV[3], 'job_id', jid)
    redis.call('SET', key, id)
    out[#out + 1] = id
  end
end
if dups > 0 then redis.call('HINCRBY', KEYS[3], 'deduplicated', dups) end
return out
"""
)

# A consumer read entries carrying a job_id (maybe from a producer that did not go
# through ENQUEUE): keep the first, drop duplicates of a job that is waiting or running.
# KEYS: stream, stats
# ARGV: group, dedupe_prefix, now_ms, stale_ms, (id, job_id)...
# Returns the ids dropped as duplicates (already acknowledged and deleted).
CLAIM_JOB_IDS = (
    _MARK_LIVE
    + """
local group, dprefix, now, stale = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local dups = {}
for i = 5, #ARGV, 2 do
  local id, key = ARGV[i], dprefix .. ARGV[i + 1]
  local v = redis.call('GET', key)
  if v == false or v == id or not mark_live(KEYS[1], v, now, stale) then
    redis.call('SET', key, id)
  else
    redis.call('XACK', KEYS[1], group, id)
    redis.call('XDEL', KEYS[1], id)
    dups[#dups + 1] = id
  end
end
if #dups > 0 then redis.call('HINCRBY', KEYS[2], 'deduplicated', #dups) end
return dups
"""
)

# Crash recovery: claim idle entries, follow the cursor, and say how often each was
# delivered (the only count that survives a SIGKILL) so poison messages can be capped.
# KEYS: stream
# ARGV: group, consumer, min_idle_ms, cursor, count
# Returns {next_cursor, {{id, fields, deliveries}, ...}, deleted_count}
RECOVER = """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local out = {}
for _, e in ipairs(r[2]) do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
  local n = 1
  if p[1] ~= nil then n = p[1][4] end
  out[#out + 1] = {e[1], e[2], n}
end
local deleted = r[3] or {}
for _, id in ipairs(deleted) do redis.call('XACK', KEYS[1], ARGV[1], id) end
return {r[1], out, #deleted}
"""

# Heartbeat: reset the idle time of the entries this consumer is still running, so a
# long job is never claimed away while it runs. JUSTID leaves the delivery count alone.
# KEYS: stream; ARGV: group, consumer, ids...
# Returns the ids that are no longer ours (claimed by another process, or gone).
HEARTBEAT = (
    _OWNED
    + """
local lost = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  if owned(KEYS[1], ARGV[1], ARGV[2], id) then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
  else
    lost[#lost + 1] = id
  end
end
return lost
"""
)

# Dead letter back onto its stream as a fresh first attempt.
# KEYS: dead; ARGV: dead_id, prefix, now_ms
# Returns the new entry id, or false when the dead letter does not exist.
REPLAY = """
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return false end
local f = e[1][2]
local src = {}
for i = 1, #f, 2 do src[f[i]] = f[i + 1] end
if not src['stream'] then return redis.error_reply('dead letter has no stream field') end
local out = {}
for _, k in ipairs({'type', 'payload', 'job_id'}) do
  if src[k] then out[#out + 1] = k; out[#out + 1] = src[k] end
end
out[#out + 1] = 'attempt'; out[#out + 1] = '1'
out[#out + 1] = 'enqueued_at'; out[#out + 1] = ARGV[3]
out[#out + 1] = 'replayed_from'; out[#out + 1] = ARGV[1]
local id = redis.call('XADD', ARGV[2] .. ':' .. src['stream'], '*', unpack(out))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
"""

# Bulk enqueue: one round trip and one command parse for a whole chunk of jobs.
# KEYS: stream; ARGV: type, enqueued_at, payloads...
BULK_ENQUEUE = """
for i = 3, #ARGV do
  redis.call('XADD', KEYS[1], '*', 'type', ARGV[1], 'payload', ARGV[i],
    'attempt', '1', 'enqueued_at', ARGV[2])
end
return #ARGV - 2
"""

# Hand entries read ahead but never started back to the group (at shutdown): a fresh copy
# at the stream's end, the original acknowledged, the job_id mark moved along.
# KEYS: stream; ARGV: group, dedupe_prefix, then per entry: id, job_id|'', nfields, fields...
RELEASE = """
local i = 3
local n = 0
while i <= #ARGV do
  local id, jid, nf = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local fields = {}
  for k = 1, nf do fields[k] = ARGV[i + 2 + k] end
  local new = redis.call('XADD', KEYS[1], '*', unpack(fields))
  redis.call('XACK', KEYS[1], ARGV[1], id)
  redis.call('XDEL', KEYS[1], id)
  if jid ~= '' and redis.call('GET', ARGV[2] .. jid) == id then
    redis.call('SET', ARGV[2] .. jid, new)
  end
  n = n + 1
  i = i + 3 + nf
end
return n
"""

# A shared send rate (GCRA): reserve the next slot of a steady rate, or say how long
# until one would be free when that is too far off.
# KEYS: tat key; ARGV: now_ms, interval_ms, max_wait_ms
# Returns the wait in ms (>= 0, slot reserved) or minus the wait (nothing reserved).
RATE = """
local now, step, maxw = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - now
if wait > maxw then return -wait end
redis.call('SET', KEYS[1], tat + step, 'PX', math.ceil(tat + step - now) + 1000)
return wait
"""

# Per-key concurrency slot with a lease (a dead holder's slot frees itself).
# KEYS: limit zset; ARGV: now_ms, lease_ms, limit, token
ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[4]) then return 1 end
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


class Scripts:
    """The registered scripts; redis-py reloads them after a Redis restart (NOSCRIPT)."""

    def __init__(self, redis: Redis) -> None:
        self.ack: AsyncScript = redis.register_script(ACK)
        self.retry: AsyncScript = redis.register_script(RETRY)
        self.dead: AsyncScript = redis.register_script(DEAD)
        self.promote: AsyncScript = redis.register_script(PROMOTE)
        self.enqueue: AsyncScript = redis.register_script(ENQUEUE)
        self.enqueue_unique_many: AsyncScript = redis.register_script(ENQUEUE_UNIQUE_MANY)
        self.claim_job_ids: AsyncScript = redis.register_script(CLAIM_JOB_IDS)
        self.recover: AsyncScript = redis.register_script(RECOVER)
        self.heartbeat: AsyncScript = redis.register_script(HEARTBEAT)
        self.replay: AsyncScript = redis.register_script(REPLAY)
        self.acquire: AsyncScript = redis.register_script(ACQUIRE)
        self.bulk_enqueue: AsyncScript = redis.register_script(BULK_ENQUEUE)
        self.release: AsyncScript = redis.register_script(RELEASE)
        self.rate: AsyncScript = redis.register_script(RATE)


def as_str_list(value: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in value or []]

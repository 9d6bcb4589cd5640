"""The two Lua scripts the Redis backend runs: one before the upstream call, one after.

Each runs for a batch: the requests that asked in the same event-loop turn (before), the
outcomes of the last couple of milliseconds (after). Each is one atomic round trip on
Redis's own clock (`TIME`), so instances whose clocks disagree still share one bucket.
The bucket math is `proxy/ratelimit.py`'s, in Lua.

Keys (P = the configured prefix):
    P:rl:<key_id>:r / :t     request / token bucket: hash {l: level, s: stamp ms}
    P:h:<id>                 a cooldown: value = reason, PTTL = what is left
    P:c:<alias>/<hash>       a cached answer body, with its TTL
    P:ci:<alias>             the alias's cache index (sorted set by time) to bound entries
    P:u:k:<key_id> / P:u:a:<alias>   usage hashes; P:uk / P:ua the sets of their names
"""

from __future__ import annotations

_BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function refill(key, limit)
  local v = redis.call('HMGET', key, 'l', 's')
  local level = tonumber(v[1])
  if level == nil then return limit end
  level = level + (now - tonumber(v[2])) * limit / 60000
  if level > limit then level = limit end
  return level
end
local function save(key, level)
  redis.call('HSET', key, 'l', tostring(level), 's', now)
  redis.call('PEXPIRE', key, 121000)
end
"""

# ARGV: prefix, n, then n requests: key_id, rpm, tpm, cache_key ('' for none), k, k health ids.
# Returns one reply per request: admitted, wait ms, rpm level*1000, tpm level*1000,
# cached body or '', then id, reason, ms left for each id cooling down.
BEFORE = (
    _BUCKET
    + """
local p = ARGV[1]
local out = {}
local i = 3
for r = 1, tonumber(ARGV[2]) do
  local key_id, rpm, tpm = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local cache_key, ids = ARGV[i + 3], tonumber(ARGV[i + 4])
  i = i + 5
  local rkey, tkey = p .. ':rl:' .. key_id .. ':r', p .. ':rl:' .. key_id .. ':t'
  local wait, rl, tl = 0, 0, 0
  if rpm > 0 then
    rl = refill(rkey, rpm)
    if rl < 1 then wait = (1 - rl) * 60000 / rpm end
  end
  if tpm > 0 then
    tl = refill(tkey, tpm)
    if tl < 1 then wait = math.max(wait, (1 - tl) * 60000 / tpm) end
  end
  local admitted = 0
  if wait == 0 then
    admitted = 1
    if rpm > 0 then rl = rl - 1 end
  end
  if rpm > 0 then save(rkey, rl) end
  if tpm > 0 then save(tkey, tl) end
  local cached = ''
  if admitted == 1 and cache_key ~= '' then
    cached = redis.call('GET', p .. ':c:' .. cache_key) or ''
  end
  local res = {admitted, math.ceil(wait), math.floor(rl * 1000), math.floor(tl * 1000), cached}
  for k = i, i + ids - 1 do
    local key = p .. ':h:' .. ARGV[k]
    local reason = redis.call('GET', key)
    if reason then
      local left = redis.call('PTTL', key)
      if left > 0 then
        res[#res + 1] = ARGV[k]
        res[#res + 1] = reason
        res[#res + 1] = left
      end
    end
  end
  i = i + ids
  out[r] = res
end
return out
"""
)

# ARGV: prefix, then four sections, each its count and then its items (`batch.py`):
#   usage    kind ('k' key | 'a' alias), name, requests, cached, prompt, completion, cost
#   charges  key_id, tpm, tokens
#   events   id, reason, ms (0: clear)
#   cache    key, ttl ms, max entries, body
AFTER = (
    _BUCKET
    + """
local p = ARGV[1]
local i = 3
for _ = 1, tonumber(ARGV[2]) do
  local kind, name = ARGV[i], ARGV[i + 1]
  local key = p .. ':u:' .. kind .. ':' .. name
  redis.call('SADD', p .. ':u' .. kind, name)
  redis.call('HINCRBY', key, 'requests', ARGV[i + 2])
  if ARGV[i + 3] ~= '0' then redis.call('HINCRBY', key, 'cached', ARGV[i + 3]) end
  if ARGV[i + 4] ~= '0' then redis.call('HINCRBY', key, 'prompt_tokens', ARGV[i + 4]) end
  if ARGV[i + 5] ~= '0' then redis.call('HINCRBY', key, 'completion_tokens', ARGV[i + 5]) end
  if ARGV[i + 6] ~= '0' then redis.call('HINCRBYFLOAT', key, 'cost_usd', ARGV[i + 6]) end
  i = i + 7
end
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local tkey, tpm = p .. ':rl:' .. ARGV[i] .. ':t', tonumber(ARGV[i + 1])
  save(tkey, math.max(-tpm, refill(tkey, tpm) - tonumber(ARGV[i + 2])))
  i = i + 3
end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local k, ms = p .. ':h:' .. ARGV[i], tonumber(ARGV[i + 2])
  if ms <= 0 then
    redis.call('DEL', k)
  elseif redis.call('PTTL', k) < ms then
    redis.call('SET', k, ARGV[i + 1], 'PX', ms)
  end
  i = i + 3
end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local key, ttl, max = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local index = p .. ':ci:' .. string.match(key, '^(.*)/[^/]*$')
  redis.call('SET', p .. ':c:' .. key, ARGV[i + 3], 'PX', ttl)
  redis.call('ZADD', index, now, key)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now - ttl)
  local extra = redis.call('ZCARD', index) - max
  if extra > 0 then
    local old = redis.call('ZPOPMIN', index, extra)
    for j = 1, #old, 2 do redis.call('DEL', p .. ':c:' .. old[j]) end
  end
  redis.call('PEXPIRE', index, ttl)
  i = i + 4
end
return 1
"""
)

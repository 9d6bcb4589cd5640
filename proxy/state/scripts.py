"""The two Lua scripts the Redis backend runs: one before the upstream call, one after.

Each is one atomic round trip on Redis's own clock (`TIME`), so instances whose clocks
disagree still share one bucket. The bucket math is `proxy/ratelimit.py`'s, in Lua.

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

# ARGV: prefix, key_id, rpm, tpm, cache_key ('' for none), health ids...
# Returns: admitted, wait ms, rpm level*1000, tpm level*1000, cached body or '',
#          then id, reason, ms left for each cooling id.
BEFORE = (
    _BUCKET
    + """
local p, key_id = ARGV[1], ARGV[2]
local rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])
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
if admitted == 1 and ARGV[5] ~= '' then
  cached = redis.call('GET', p .. ':c:' .. ARGV[5]) or ''
end
local out = {admitted, math.ceil(wait), math.floor(rl * 1000), math.floor(tl * 1000), cached}
for i = 6, #ARGV do
  local k = p .. ':h:' .. ARGV[i]
  local reason = redis.call('GET', k)
  if reason then
    local left = redis.call('PTTL', k)
    if left > 0 then
      out[#out + 1] = ARGV[i]
      out[#out + 1] = reason
      out[#out + 1] = left
    end
  end
end
return out
"""
)

# ARGV: prefix, key_id, alias, tpm, prompt, completion, cost, cached (0/1), count_key (0/1),
#       n events, (id, reason, ms) * n, then optionally: cache key, ttl ms, max entries, body
AFTER = (
    _BUCKET
    + """
local p, key_id, alias = ARGV[1], ARGV[2], ARGV[3]
local tpm, prompt, completion = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local cached = ARGV[8] == '1'
if tpm > 0 and not cached and prompt + completion > 0 then
  local tkey = p .. ':rl:' .. key_id .. ':t'
  save(tkey, math.max(-tpm, refill(tkey, tpm) - prompt - completion))
end
local function add(key)
  redis.call('HINCRBY', key, 'requests', 1)
  if cached then
    redis.call('HINCRBY', key, 'cached', 1)
  else
    redis.call('HINCRBY', key, 'prompt_tokens', prompt)
    redis.call('HINCRBY', key, 'completion_tokens', completion)
    redis.call('HINCRBYFLOAT', key, 'cost_usd', ARGV[7])
  end
end
if ARGV[9] == '1' then
  redis.call('SADD', p .. ':uk', key_id)
  add(p .. ':u:k:' .. key_id)
end
if alias ~= '' then
  redis.call('SADD', p .. ':ua', alias)
  add(p .. ':u:a:' .. alias)
end
local n = tonumber(ARGV[10])
for i = 0, n - 1 do
  local id, reason, ms = ARGV[11 + i * 3], ARGV[12 + i * 3], tonumber(ARGV[13 + i * 3])
  local k = p .. ':h:' .. id
  if ms <= 0 then
    redis.call('DEL', k)
  elseif redis.call('PTTL', k) < ms then
    redis.call('SET', k, reason, 'PX', ms)
  end
end
local c = 11 + n * 3
if ARGV[c] then
  local key, ttl, max = ARGV[c], tonumber(ARGV[c + 1]), tonumber(ARGV[c + 2])
  local index = p .. ':ci:' .. string.match(key, '^(.*)/[^/]*$')
  redis.call('SET', p .. ':c:' .. key, ARGV[c + 3], 'PX', ttl)
  redis.call('ZADD', index, now, key)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now - ttl)
  local extra = redis.call('ZCARD', index) - max
  if extra > 0 then
    local old = redis.call('ZPOPMIN', index, extra)
    for i = 1, #old, 2 do redis.call('DEL', p .. ':c:' .. old[i]) end
  end
  redis.call('PEXPIRE', index, ttl)
end
return 1
"""
)

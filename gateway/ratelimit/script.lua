-- Every rate limit of one request, atomically and all or nothing: a port of evaluate() in
-- gateway/ratelimit/algorithms.py (same operations in the same order; the tests compare the two).
--
-- KEYS[i] (i <= n): limit i's storage key (GCRA: its TAT; quota: the count of one window). Further KEYS:
--   override hashes, referenced by index. All keys share one hash slot in a cluster.
-- ARGV[1]: now in seconds, or "" for this server's TIME (tests pass a time); ARGV[2]: n; then 4 per limit:
--   its policy's static spec "<algorithm> <limit> <rate> <period> <shadow 1|0> <policy>" (one string, packed
--   once per policy by the gateway, not per request), window_end, cost, index in KEYS of the override hash
--   ("0" = none).
-- Returns 6 per limit: allowed (1|0), remaining, effective limit, then reset_after, retry_after and the
-- emission interval (0 for quota) as "%.17g" strings: a Lua number in a reply is truncated to an integer,
-- and tostring() keeps only 14 digits, which is 0.1 ms at epoch scale.
local RETRY_SLACK = 1e-6
local REMAINING_EPS = 1e-9
local QUOTA_GRACE = 10.0
local SPEC = '^(%a+) (%S+) (%S+) (%S+) ([01]) (.*)$'

local function fmt(x)
  return string.format('%.17g', x)
end

-- An override value, or nil when absent or unusable (then the configured value stands).
local function parse_override(raw, is_limit)
  local v = tonumber(raw)
  if v == nil or v ~= v or v == math.huge or v == -math.huge then
    return nil
  end
  if is_limit then
    if v >= 0 then return math.floor(v) end
  elseif v > 0 then
    return v
  end
  return nil
end

local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end

local n = tonumber(ARGV[2])
local pending = {}
local writes = {}
local out = {}
local blocked = false
for i = 1, n do
  local b = 2 + (i - 1) * 4
  local algorithm, limit, rate, period, shadow, policy = string.match(ARGV[b + 1], SPEC)
  limit, rate, period, shadow = tonumber(limit), tonumber(rate), tonumber(period), shadow == '1'
  local window_end, cost, override = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  if override > 0 then
    local values = redis.call('HMGET', KEYS[override], policy .. ':limit', policy .. ':rate')
    local new_limit, new_rate = parse_override(values[1], true), parse_override(values[2], false)
    if new_limit ~= nil then limit = new_limit end
    if new_rate ~= nil and algorithm == 'gcra' then rate = new_rate end
  end

  local key = KEYS[i]
  local state = pending[key]
  if state == nil then
    state = tonumber(redis.call('GET', key))
  end

  local allowed, remaining, reset_after, retry_after, interval, new_state
  if algorithm == 'gcra' then
    interval = period / rate
    local backlog = 0.0
    if state ~= nil then backlog = math.max(state - now, 0.0) end
    local new_backlog = backlog + cost * interval
    local burst = limit * interval
    if new_backlog > burst then
      allowed, remaining, reset_after, retry_after = 0, 0, backlog, new_backlog - burst + RETRY_SLACK
    else
      remaining = math.max(math.floor((burst - new_backlog) / interval + REMAINING_EPS), 0)
      allowed, reset_after, retry_after = 1, new_backlog, 0.0
      new_state = now + new_backlog
    end
  else
    interval = 0
    local used = state or 0
    reset_after = math.max(window_end - now, 0.0)
    if used + cost > limit then
      allowed, remaining, retry_after = 0, 0, reset_after + RETRY_SLACK
    else
      allowed, remaining, retry_after = 1, limit - used - cost, 0.0
      new_state = used + cost
    end
  end

  local o = (i - 1) * 6
  out[o + 1], out[o + 2], out[o + 3] = allowed, remaining, limit
  out[o + 4], out[o + 5], out[o + 6] = fmt(reset_after), fmt(retry_after), fmt(interval)
  if allowed == 0 and not shadow then
    blocked = true
  end
  if new_state ~= nil then
    pending[key] = new_state
    writes[#writes + 1] = {algorithm, key, new_state, cost, window_end}
  end
end

if not blocked then
  for _, w in ipairs(writes) do
    if w[1] == 'gcra' then
      -- The key may vanish once the bucket is full again: an absent TAT means exactly that.
      redis.call('SET', w[2], fmt(w[3]), 'PX', string.format('%d', math.ceil((w[3] - now) * 1000)))
    else
      redis.call('INCRBY', w[2], w[4])
      local expire_at = math.ceil((math.max(w[5], now) + QUOTA_GRACE) * 1000)
      redis.call('PEXPIREAT', w[2], string.format('%d', expire_at))
    end
  end
end
return out

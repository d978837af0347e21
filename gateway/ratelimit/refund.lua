-- Gives back what script.lua consumed, for a request that another hash slot rejected (Redis Cluster only).
-- KEYS: storage keys, one per consumed limit. ARGV[1]: now in seconds, or "" for this server's TIME;
-- then 2 per key: algorithm ("gcra"|"quota"), amount (gcra: cost * emission interval seconds; quota: cost).
local function fmt(x)
  return string.format('%.17g', x)
end

local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end

for i, key in ipairs(KEYS) do
  local algorithm, amount = ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  local state = tonumber(redis.call('GET', key))
  if state ~= nil then
    if algorithm == 'gcra' then
      local tat = state - amount
      if tat > now then
        redis.call('SET', key, fmt(tat), 'PX', string.format('%d', math.ceil((tat - now) * 1000)))
      else
        redis.call('DEL', key)
      end
    elseif state > amount then
      redis.call('DECRBY', key, amount)  -- keeps the window's expiry
    else
      redis.call('SET', key, '0', 'KEEPTTL')
    end
  end
end
return #KEYS

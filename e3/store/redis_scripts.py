"""The Lua scripts of the Redis store (e3.store.redis_store), which Redis runs atomically.

Each script takes the key prefix as ARGV[1] and builds the keys it touches
from it (see the key layout in redis_store's docstring). Floats cross into
Redis as repr() text and are never re-encoded inside Lua.
"""

# The scripts spell task statuses as TaskStatus's values: pending, leased, done, failed.

# The shared middle of PLAN_STEP and EXTEND_STEP (ARGV: prefix, step, field
# count F, F field names, then F values per task): every id is checked before
# anything is written, so a rejected call leaves no trace; then each task is
# stored, appended to the step's task list (step progress counts it) and to
# the queue's back.
_QUEUE_TASKS = """
local nfields = tonumber(ARGV[3])
local first = 4 + nfields
for base = first, #ARGV, nfields do
  if redis.call('EXISTS', prefix .. 'task:' .. ARGV[base]) == 1 then return {'exists', ARGV[base]} end
end
for base = first, #ARGV, nfields do
  local kv = {}
  for f = 0, nfields - 1 do
    kv[#kv + 1] = ARGV[4 + f]
    kv[#kv + 1] = ARGV[base + f]
  end
  redis.call('HSET', prefix .. 'task:' .. ARGV[base], unpack(kv))
  redis.call('RPUSH', prefix .. 'step:' .. step .. ':tasks', ARGV[base])
  redis.call('RPUSH', prefix .. 'queue', ARGV[base])
end
"""

# A step's tasks, queued once: a step already planned answers 'planned'.
PLAN_STEP = """
local prefix, step = ARGV[1], ARGV[2]
if redis.call('SISMEMBER', prefix .. 'steps', step) == 1 then return {'planned'} end
""" + _QUEUE_TASKS + """
redis.call('SADD', prefix .. 'steps', step)
return {'ok'}
"""

# A later round's tasks added to a planned step: an unplanned step answers 'unplanned'.
EXTEND_STEP = """
local prefix, step = ARGV[1], ARGV[2]
if redis.call('SISMEMBER', prefix .. 'steps', step) == 0 then return {'unplanned'} end
""" + _QUEUE_TASKS + """
return {'ok'}
"""

# ARGV: prefix, step, keep, then pairs of question id and "rollouts:successes".
# The history hash holds per question "<last step>|r:s,r:s,..." (oldest
# first, at most `keep`); a step already recorded is skipped, so a retried
# report appends nothing twice.
RECORD_GROUPS = """
local prefix, step, keep = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local key = prefix .. 'history'
for i = 4, #ARGV, 2 do
  local old = redis.call('HGET', key, ARGV[i])
  local last, list = -1, ''
  if old then
    local bar = string.find(old, '|', 1, true)
    last, list = tonumber(string.sub(old, 1, bar - 1)), string.sub(old, bar + 1)
  end
  if step > last then
    local items = {}
    for item in string.gmatch(list, '[^,]+') do items[#items + 1] = item end
    items[#items + 1] = ARGV[i + 1]
    while #items > keep do table.remove(items, 1) end
    redis.call('HSET', key, ARGV[i], step .. '|' .. table.concat(items, ','))
  end
end
return 1
"""

# ARGV: prefix, replica id, lease expiry, max tasks, lease id base.
LEASE = """
local prefix, replica, expires = ARGV[1], ARGV[2], ARGV[3]
local wanted = tonumber(ARGV[4])
local out = {}
while #out < wanted do
  local id = redis.call('LPOP', prefix .. 'queue')
  if not id then break end
  local key = prefix .. 'task:' .. id
  -- complete and drop_step take tasks out of the queue; this is a guard only.
  if redis.call('HGET', key, 'status') == 'pending' then
    redis.call('HSET', key, 'status', 'leased', 'lease_id', ARGV[5] .. '.' .. (#out + 1),
               'leased_by', replica, 'lease_expires_at', expires)
    redis.call('HINCRBY', key, 'times_leased', 1)
    redis.call('ZADD', prefix .. 'leases', expires, id)
    out[#out + 1] = redis.call('HGETALL', key)
  end
end
return out
"""

# Lua shared by EXPIRE and RELEASE: clear the leases of the tasks in `ids`
# and put them back on the queue. Pushing from the last to the first leaves
# them at the queue's front in their original order.
REQUEUE_IDS = """
for i = #ids, 1, -1 do
  redis.call('ZREM', prefix .. 'leases', ids[i])
  redis.call('HSET', prefix .. 'task:' .. ids[i], 'status', 'pending', 'lease_id', '', 'leased_by', '',
             'lease_expires_at', '0.0')
  redis.call('LPUSH', prefix .. 'queue', ids[i])
end
"""

# ARGV: prefix, now, max expiries (0: no limit). Every expired lease, in expiry order; a task
# whose lease ran out max-expiries times is failed (reason lease_expired) instead of queued again.
EXPIRE = """
local prefix, limit = ARGV[1], tonumber(ARGV[3])
local expired = redis.call('ZRANGEBYSCORE', prefix .. 'leases', '-inf', ARGV[2])
local ids = {}
for _, id in ipairs(expired) do
  local key = prefix .. 'task:' .. id
  local n = redis.call('HINCRBY', key, 'expiries', 1)
  if limit > 0 and n >= limit then
    local step, question, by, failures = unpack(redis.call('HMGET', key, 'step', 'question_id', 'leased_by', 'failures'))
    redis.call('ZREM', prefix .. 'leases', id)
    redis.call('HSET', key, 'status', 'failed')
    redis.call('HSET', prefix .. 'step:' .. step .. ':failed', id, cjson.encode({
      task_id = id, question_id = question, reason = 'lease_expired', replica_id = by,
      detail = 'its lease expired ' .. n .. ' times; last held by ' .. by, failures = tonumber(failures or '0')}))
  else
    ids[#ids + 1] = id
  end
end
""" + REQUEUE_IDS + """
if #expired > 0 then redis.call('HINCRBY', prefix .. 'counters', 'lease_expiries', #expired) end
return expired
"""

# ARGV: prefix, replica id. Every lease the replica holds.
RELEASE = """
local prefix, replica = ARGV[1], ARGV[2]
local ids = {}
for _, id in ipairs(redis.call('ZRANGE', prefix .. 'leases', 0, -1)) do
  if redis.call('HGET', prefix .. 'task:' .. id, 'leased_by') == replica then ids[#ids + 1] = id end
end
""" + REQUEUE_IDS + """
return ids
"""

# ARGV: prefix, replica id, new expiry, then task id and lease id of each lease.
RENEW = """
local prefix, replica, expires = ARGV[1], ARGV[2], ARGV[3]
local renewed = {}
for i = 4, #ARGV, 2 do
  local id, lease = ARGV[i], ARGV[i + 1]
  local key = prefix .. 'task:' .. id
  local status, held, by = unpack(redis.call('HMGET', key, 'status', 'lease_id', 'leased_by'))
  if status == 'leased' and held == lease and by == replica then
    redis.call('HSET', key, 'lease_expires_at', expires)
    redis.call('ZADD', prefix .. 'leases', expires, id)
    renewed[#renewed + 1] = id
  end
end
return renewed
"""

# Finished tasks of a step (groups plus failures), for the scripts below.
FINISHED = """
local function finished(step)
  return redis.call('HLEN', prefix .. 'step:' .. step .. ':groups') + redis.call('HLEN', prefix .. 'step:' .. step .. ':failed')
end
"""

# ARGV: prefix, task id, lease id, replica id, reason, detail, max failures.
FAIL = """
local prefix, id, lease, replica = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
""" + FINISHED + """
local key = prefix .. 'task:' .. id
local status, held, by, step, question, failures = unpack(redis.call(
  'HMGET', key, 'status', 'lease_id', 'leased_by', 'step', 'question_id', 'failures'))
if not status then return {'unknown', 0, 0, 0} end
-- A task written before tasks could fail has no failures field.
failures = tonumber(failures or '0')
local planned = redis.call('LLEN', prefix .. 'step:' .. step .. ':tasks')
if status == 'done' or status == 'failed' then return {'finished', failures, finished(step), planned} end
if status ~= 'leased' or held ~= lease or by ~= replica then return {'stale', failures, finished(step), planned} end
failures = failures + 1
redis.call('ZREM', prefix .. 'leases', id)
if failures < tonumber(ARGV[7]) then
  redis.call('HSET', key, 'failures', failures, 'status', 'pending', 'lease_id', '', 'leased_by', '',
             'lease_expires_at', '0.0')
  redis.call('LPUSH', prefix .. 'queue', id)
  return {'requeued', failures, finished(step), planned}
end
redis.call('HSET', key, 'failures', failures, 'status', 'failed')
redis.call('HSET', prefix .. 'step:' .. step .. ':failed', id, cjson.encode({
  task_id = id, question_id = question, reason = ARGV[5], detail = ARGV[6], replica_id = replica, failures = failures}))
return {'failed', failures, finished(step), planned}
"""

# ARGV: prefix, task id, group bytes, reward count, reward sum, replica id and lease id ('' '' = unchecked).
COMPLETE = """
local prefix, id = ARGV[1], ARGV[2]
""" + FINISHED + """
local key = prefix .. 'task:' .. id
local status, step, question = unpack(redis.call('HMGET', key, 'status', 'step', 'question_id'))
if not status then return {'unknown', 0, 0} end
local groups = prefix .. 'step:' .. step .. ':groups'
local planned = redis.call('LLEN', prefix .. 'step:' .. step .. ':tasks')
if status == 'done' or status == 'failed' then
  redis.call('HINCRBY', prefix .. 'counters', 'duplicates', 1)
  return {'duplicate', finished(step), planned}
end
if ARGV[6] ~= '' then
  local held, by = unpack(redis.call('HMGET', key, 'lease_id', 'leased_by'))
  if status ~= 'leased' or by ~= ARGV[6] or held ~= ARGV[7] then return {'stale', finished(step), planned} end
end
-- A task whose lease ran out sits in the queue again; take it out.
if status == 'pending' then redis.call('LREM', prefix .. 'queue', 1, id) end
redis.call('ZREM', prefix .. 'leases', id)
redis.call('HSET', key, 'status', 'done')
redis.call('HSET', groups, id, ARGV[3])
if tonumber(ARGV[4]) > 0 then
  redis.call('HINCRBY', prefix .. 'stats:attempts', question, ARGV[4])
  redis.call('HINCRBYFLOAT', prefix .. 'stats:rewards', question, ARGV[5])
end
return {'accepted', finished(step), planned}
"""

# ARGV: prefix, step.
DROP_STEP = """
local prefix, step = ARGV[1], ARGV[2]
local tasks = prefix .. 'step:' .. step .. ':tasks'
for _, id in ipairs(redis.call('LRANGE', tasks, 0, -1)) do
  local status = redis.call('HGET', prefix .. 'task:' .. id, 'status')
  if status == 'pending' then redis.call('LREM', prefix .. 'queue', 1, id) end
  if status == 'leased' then redis.call('ZREM', prefix .. 'leases', id) end
  redis.call('DEL', prefix .. 'task:' .. id)
end
redis.call('DEL', tasks, prefix .. 'step:' .. step .. ':groups', prefix .. 'step:' .. step .. ':failed')
redis.call('SREM', prefix .. 'steps', step)
return 1
"""

# --- fencing (e3.store.redis_store: leadership) ---------------------------

# Prepended to every state-changing script. The caller passes its fencing
# token as ARGV[2] ('' for a handle that never acquired leadership); the
# guard takes it out of ARGV, so each script reads its own arguments as
# documented. Checking the token inside the script makes check and write one
# atomic step: a scheduler that lost the run cannot slip a write in after
# its successor's INCR.
FENCE_GUARD = """
local fence_token = table.remove(ARGV, 2)
if fence_token ~= '' then
  local current = redis.call('GET', ARGV[1] .. 'fence')
  if current ~= fence_token then return redis.error_reply('E3FENCED ' .. tostring(current)) end
end
"""

# ARGV: prefix, holder, ttl ms. The leader key holds "<token> <holder>" and
# expires unless renewed; the fence counter only ever goes up.
ACQUIRE_LEADER = """
local prefix, holder = ARGV[1], ARGV[2]
local current = redis.call('GET', prefix .. 'leader')
if current then
  local who = string.match(current, '^%d+ (.*)$')
  if who ~= holder then return {'held', who or current, redis.call('PTTL', prefix .. 'leader')} end
end
local token = redis.call('INCR', prefix .. 'fence')
redis.call('SET', prefix .. 'leader', token .. ' ' .. holder, 'PX', ARGV[3])
return {'acquired', tostring(token), tonumber(ARGV[3])}
"""

# ARGV: prefix, token, holder, ttl ms. Renewal is allowed as long as nobody
# took a newer token, even if the key itself ran out meanwhile (a paused
# process whose lease expired but which no successor replaced is still the
# only scheduler).
RENEW_LEADER = """
local prefix, token = ARGV[1], ARGV[2]
local current = redis.call('GET', prefix .. 'fence')
if current ~= token then return {'fenced', tostring(current)} end
redis.call('SET', prefix .. 'leader', token .. ' ' .. ARGV[3], 'PX', ARGV[4])
return {'ok', token}
"""

# ARGV: prefix, token.
RELEASE_LEADER = """
local prefix, token = ARGV[1], ARGV[2]
local current = redis.call('GET', prefix .. 'leader')
if current and string.match(current, '^(%d+) ') == token then redis.call('DEL', prefix .. 'leader') end
return 1
"""

# ARGV: prefix, expected revision ('' = do not check), new revision, document.
SAVE_STATE = """
local prefix = ARGV[1]
if ARGV[2] ~= '' then
  local found = redis.call('GET', prefix .. 'state:revision') or '0'
  if found ~= ARGV[2] then return {'conflict', found} end
end
redis.call('SET', prefix .. 'state', ARGV[4])
redis.call('SET', prefix .. 'state:revision', ARGV[3])
return {'ok'}
"""

"""Every Lua script stylebot runs in Redis, each with its KEYS and ARGV slots named.

A `Script` lists its slots by name, with what each holds, above its body. `Script.source` binds each slot to a Lua
local of its name at the top of the script (`local jobs = KEYS[1]  -- the jobs stream`), so the body never counts
positions, and the function `Script.register` returns takes the slots as keyword arguments of the same names, so
the Python side does not either. A script that takes a group of slots per person, write or image has them after
the named ones (`more_keys`, `more_args`), from `first_more_key` / `first_more_arg` on.

Key names come from `storage.keys.Keys` alone: passed in as keys, or, for a key a script finds from an id it reads
in Redis, as a template (the `Keys` method called with `ANY_ID` for the id), which `key_for` and `id_in` fill in and
read back.
"""

from __future__ import annotations

import json

ANY_ID = "{id}"  # the id in a key template: `keys.photo(ANY_ID)`

_TEMPLATES = f"local any_id = {json.dumps(ANY_ID)}" + """
local function key_for(template, id)  -- the key that a template names for `id` (its first id, when it has two)
  local at = string.find(template, any_id, 1, true)
  return string.sub(template, 1, at - 1) .. id .. string.sub(template, at + #any_id)
end
local function id_in(template, key)  -- the id in `key` if the template names it, else nil
  local at = string.find(template, any_id, 1, true)
  local before, after = string.sub(template, 1, at - 1), string.sub(template, at + #any_id)
  if #key > #before + #after and string.sub(key, 1, #before) == before
      and string.sub(key, #key - #after + 1) == after then
    return string.sub(key, #before + 1, #key - #after)
  end
end
"""


class Script:
    """A Lua script whose KEYS and ARGV slots have names (name -> what it holds, in slot order)."""

    def __init__(self, keys: dict[str, str], args: dict[str, str], body: str, *, more_keys: str = "",
                 more_args: str = "", templates: bool = False):
        names = [*keys, *args]
        if len(set(names)) != len(names) or not all(n.isidentifier() for n in names):
            raise ValueError(f"a script's slots need distinct names that are Lua identifiers: {names}")
        self.keys, self.args = tuple(keys), tuple(args)
        lines = [f"local {name} = KEYS[{i}]  -- {about}" for i, (name, about) in enumerate(keys.items(), 1)]
        lines += [f"local {name} = ARGV[{i}]  -- {about}" for i, (name, about) in enumerate(args.items(), 1)]
        lines += [f"-- KEYS from {len(keys) + 1} on: {more_keys}"] if more_keys else []
        lines += [f"-- ARGV from {len(args) + 1} on: {more_args}"] if more_args else []
        lines.append(f"local first_more_key, first_more_arg = {len(keys) + 1}, {len(args) + 1}")
        self.source = "\n".join(lines) + "\n" + (_TEMPLATES if templates else "") + body.lstrip("\n")

    def register(self, client):
        """This script on `client` (sent once, then run by its hash), as an async function of its slots by name
        (plus the lists `more_keys` and `more_args`) that returns the script's reply."""
        script = client.register_script(self.source)

        async def run(*, more_keys=(), more_args=(), **slots):
            if set(slots) != {*self.keys, *self.args}:
                raise TypeError(f"slots given {sorted(slots)}, expected {sorted({*self.keys, *self.args})}")
            return await script(keys=[slots[n] for n in self.keys] + list(more_keys),
                                args=[slots[n] for n in self.args] + list(more_args))
        return run


# Admission in one step: the queue bound and the user's own limit are checked, the other people of a morph still
# share and have a face, a rerun's result is still from the user's current epoch, and only then is the job queued
# (its body, photo and origin with it). Refusals: busy, limit, gone, unshared / noface (with the person's id).
ADMIT = Script(
    keys={
        "jobs": "the jobs stream",
        "user_jobs": "the user's unfinished jobs (job id -> entry id)",
        "epoch": "the user's epoch token",
        "photo_key": "the job's input photo",
        "origin_key": "where the job's answer goes",
        "index": "the user's index",
        "job_data": "the job's body",
    },
    more_keys="per other person: their shared flag, face latent, epoch token, index",
    args={
        "max_queue": "jobs the stream may hold",
        "max_per_user": "unfinished jobs a user may have",
        "new_epoch": "a new epoch token, for whoever has none",
        "ttl": "TTL of the job's keys (s)",
        "job": "the job (JSON)",
        "job_id": "the job's id",
        "photo": "the photo ('' = none)",
        "origin": "where the answer goes (JSON)",
        "expiry": "when the job's keys expire (their score in an index)",
        "index_ttl": "TTL of an index (s)",
        "user_id": "the user's id",
        "expected_epoch": "the epoch token the user must still have ('' = any)",
        "reply": "the results stream of the user's adapter",
    },
    more_args="the other people's ids",
    body="""
if redis.call('XLEN', jobs) >= tonumber(max_queue) then return {'busy'} end
if redis.call('HLEN', user_jobs) >= tonumber(max_per_user) then return {'limit'} end
if expected_epoch ~= '' and redis.call('GET', epoch) ~= expected_epoch then return {'gone'} end
local body = {'job', job, 'user', user_id, 'reply', reply}
local indexes = {index}
for i = first_more_arg, #ARGV do
  local k = first_more_key + (i - first_more_arg) * 4
  if redis.call('EXISTS', KEYS[k]) == 0 then return {'unshared', ARGV[i]} end
  if redis.call('EXISTS', KEYS[k + 1]) == 0 then return {'noface', ARGV[i]} end
  redis.call('SET', KEYS[k + 2], new_epoch, 'NX', 'EX', index_ttl)
  table.insert(body, 'epoch:' .. ARGV[i])
  table.insert(body, redis.call('GET', KEYS[k + 2]))
  table.insert(indexes, KEYS[k + 3])
end
redis.call('SET', epoch, new_epoch, 'NX')
redis.call('EXPIRE', epoch, index_ttl)
table.insert(body, 'epoch:' .. user_id)
table.insert(body, redis.call('GET', epoch))
local entry = redis.call('XADD', jobs, '*', 'id', job_id)
table.insert(body, 'entry')
table.insert(body, entry)
redis.call('HSET', job_data, unpack(body))
redis.call('EXPIRE', job_data, ttl)
redis.call('HSET', user_jobs, job_id, entry)
redis.call('EXPIRE', user_jobs, ttl)
if photo ~= '' then redis.call('SET', photo_key, photo, 'EX', ttl) end
redis.call('SET', origin_key, origin, 'EX', ttl)
redis.call('ZADD', index, expiry, origin_key)
for _, each in ipairs(indexes) do
  redis.call('ZADD', each, expiry, job_data)
  if redis.call('TTL', each) < tonumber(index_ttl) then redis.call('EXPIRE', each, index_ttl) end
end
return {'ok', redis.call('XLEN', jobs)}
""")

# Store a job's result once, guarded by its users' epochs, and acknowledge the job: one atomic script, so that a job
# run twice after a crash is stored and posted once, a job whose user said /forget meanwhile stores nothing, and a
# morph whose other person stopped sharing (or said /forget) is answered with `refusal` and stores nothing either.
# Every write and the result's body are listed in the user's index and, for a morph, the other person's too (their
# face is in it), and the result's entry in both outboxes: whichever of them says /forget, it goes. A first answer
# (`final` '0': an encoder's face, before the optimisation refines it) is stored and posted the same way, once (its
# own `done` key and body), but leaves the job running. Returns 1 when stored, 0 when stored before, -1 when nothing
# was (the user said /forget, or `post` is '0').
FINISH = Script(
    keys={
        "done": "set once the job's result (or, for a first answer, that answer) is stored",
        "results": "the results stream of the job's adapter",
        "jobs": "the jobs stream",
        "photo": "the job's input photo",
        "user_jobs": "the user's unfinished jobs",
        "index": "the user's index",
        "outbox": "the user's unposted results",
        "job_data": "the job's body",
        "result_data": "the answer's body (its event and payload)",
        "epoch": "the user's epoch token",
        "trial": "what the job's runs showed (its engines' deaths and raises)",
    },
    more_keys="per other person: their epoch token, shared flag, index, outbox; then each write's key",
    args={
        "ttl": "TTL of the result (s)",
        "event": "the result event (JSON)",
        "group": "the engines' consumer group",
        "entry": "the job's entry id on the jobs stream",
        "job_id": "the job's id",
        "payload": "the result's image or GIF ('' = none)",
        "refusal": "the answer instead, when another person no longer shares (a result event, JSON)",
        "oldest": "the oldest entry id the results stream keeps",
        "now": "the time now (s)",
        "guarded": "'1': nothing is stored unless the user's epoch token is `epoch_token`",
        "epoch_token": "the user's epoch token when the job was queued",
        "n_others": "how many other people",
        "n_writes": "how many writes",
        "index_ttl": "TTL of an index (s)",
        "post": "'1', or '0': acknowledge the job, store and answer nothing",
        "ref": "what the results stream entry names: the job's id, or for a first answer its own id",
        "final": "'1': the job's answer (the job is acknowledged); '0': a first answer (the job goes on running)",
    },
    more_args="the other people's epoch tokens; then per write: TTL, #fields (0: a string value follows), the field and "
              "value it is written only if (absent key, or that field holding that value; '' '' = always), fields",
    body="""
local function ack()
  redis.call('XACK', jobs, group, entry)
  redis.call('XDEL', jobs, entry)
  redis.call('DEL', photo, job_data, trial)
  redis.call('HDEL', user_jobs, job_id)
end
if redis.call('EXISTS', done) == 1 then
  if final == '1' then ack() end
  return 0
end
if guarded == '1' and (redis.call('GET', epoch) or '') ~= epoch_token then ack() return -1 end
if post == '0' then ack() return -1 end
local answer, image, allowed = event, payload, true
local indexes, outboxes = {index}, {outbox}
local k, a = first_more_key, first_more_arg
for i = 1, tonumber(n_others) do
  if (redis.call('GET', KEYS[k]) or '') ~= ARGV[a] or redis.call('EXISTS', KEYS[k + 1]) == 0 then
    answer, image, allowed = refusal, '', false
  end
  table.insert(indexes, KEYS[k + 2])
  table.insert(outboxes, KEYS[k + 3])
  k, a = k + 4, a + 1
end
local t, life = tonumber(now), tonumber(ttl)
local stored = {}
for i = 1, tonumber(n_writes) do
  local wttl, n, if_field, if_value = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3]
  a = a + 4
  local wanted = if_field == '' or redis.call('EXISTS', KEYS[k]) == 0 or redis.call('HGET', KEYS[k], if_field) == if_value
  if allowed and wanted then
    redis.call('DEL', KEYS[k])
    if n == 0 then
      redis.call('SET', KEYS[k], ARGV[a], 'EX', wttl)
    else
      redis.call('HSET', KEYS[k], unpack(ARGV, a, a + 2 * n - 1))
      redis.call('EXPIRE', KEYS[k], wttl)
    end
    table.insert(stored, {KEYS[k], t + wttl})
  end
  a = a + math.max(1, 2 * n)
  k = k + 1
end
table.insert(stored, {result_data, t + life})
redis.call('DEL', result_data)
redis.call('HSET', result_data, 'event', answer)
if image ~= '' then redis.call('HSET', result_data, 'payload', image) end
redis.call('EXPIRE', result_data, life)
for _, each in ipairs(indexes) do
  for _, w in ipairs(stored) do redis.call('ZADD', each, w[2], w[1]) end
  redis.call('ZREMRANGEBYSCORE', each, '-inf', t)
  if redis.call('TTL', each) < tonumber(index_ttl) then redis.call('EXPIRE', each, index_ttl) end
end
redis.call('SET', done, '1', 'EX', life)
local id = redis.call('XADD', results, '*', 'ref', ref)
redis.call('XTRIM', results, 'MINID', '~', oldest)
for _, each in ipairs(outboxes) do
  redis.call('SADD', each, id)
  if redis.call('TTL', each) < life then redis.call('EXPIRE', each, life) end
end
if final == '1' then ack() end
return 1
""")

# A job claimed again: what its last run left. A run still marked `running` ended with its engine's death (an engine
# that answers a job, stops or lets it go clears the mark): if the job ran alone, the death was its own fault; if it
# ran beside others, it is a suspect once more (the engine runs suspects apart from other jobs, see `engine.loop`).
# A job that was held but not running carries no mark and is judged nothing. Returns {faults, suspect}.
JUDGE = Script(
    keys={"trial": "the job's trial hash (`Keys.trial`)"},
    args={"ttl": "seconds the hash is kept after a change"},
    body="""
local running = redis.call('HGET', trial, 'running')
if running == 'alone' then
  redis.call('HINCRBY', trial, 'faults', 1)
elseif running == 'shared' then
  redis.call('HINCRBY', trial, 'suspect', 1)
end
if running then
  redis.call('HDEL', trial, 'running')
  redis.call('EXPIRE', trial, ttl)
end
return {tonumber(redis.call('HGET', trial, 'faults') or '0'), tonumber(redis.call('HGET', trial, 'suspect') or '0')}
""")

# /forget in one step: the user's queued and running jobs leave the jobs stream (no engine answers them), their
# photos go, their unposted results leave the adapter's stream, every key in their index and every fixed one goes,
# and their @name is freed if it is still theirs. A morph someone else queued with this user's face is taken off the
# queue too and its asker answered with `stopped` (the job's body names the asker and their results stream).
# Returns {how many keys and entries went, how many of the user's own jobs (queued or running) were stopped}.
FORGET = Script(
    keys={
        "jobs": "the jobs stream",
        "results": "the results stream of the user's adapter",
        "user_jobs": "the user's unfinished jobs",
        "index": "the user's index",
        "outbox": "the user's unposted results",
        "name_key": "the user's name key (the name index entry of their @name)",
    },
    more_keys="the user's keys with fixed names (`Keys.fixed`), all deleted",
    args={
        "engines_group": "the engines' consumer group",
        "adapters_group": "the adapters' consumer group",
        "user_id": "the user's id",
        "ttl": "TTL of an answer (s)",
        "stopped": "the answer to the asker of a morph this stops (a result event, JSON; its ids filled in here)",
        "photo_template": "`Keys.photo`",
        "job_data_template": "`Keys.job_data`",
        "user_jobs_template": "`Keys.user_jobs`",
        "result_data_template": "`Keys.result_data`",
        "outbox_template": "`Keys.outbox`",
        "done_template": "`Keys.done`",
    },
    templates=True,
    body="""
local n, mine_stopped = 0, 0
local mine = redis.call('HGETALL', user_jobs)
for i = 1, #mine, 2 do
  redis.call('XACK', jobs, engines_group, mine[i + 1])
  local gone = redis.call('XDEL', jobs, mine[i + 1])
  mine_stopped = mine_stopped + gone
  n = n + gone + redis.call('DEL', key_for(photo_template, mine[i]))
end
for _, id in ipairs(redis.call('SMEMBERS', outbox)) do
  redis.call('XACK', results, adapters_group, id)
  n = n + redis.call('XDEL', results, id)
end
for _, key in ipairs(redis.call('ZRANGE', index, 0, -1)) do
  local job_id = id_in(job_data_template, key)
  if job_id then
    local asker, entry, reply = unpack(redis.call('HMGET', key, 'user', 'entry', 'reply'))
    if asker and asker ~= user_id and redis.call('XDEL', jobs, entry) == 1 then  -- a morph still queued
      redis.call('XACK', jobs, engines_group, entry)
      redis.call('HDEL', key_for(user_jobs_template, asker), job_id)
      local data = key_for(result_data_template, job_id)
      local event = cjson.decode(stopped)
      event.job_id, event.user_id = job_id, asker
      redis.call('HSET', data, 'event', cjson.encode(event))
      redis.call('EXPIRE', data, ttl)
      local id = redis.call('XADD', reply, '*', 'ref', job_id)
      redis.call('SADD', key_for(outbox_template, asker), id)
      redis.call('SET', key_for(done_template, job_id), '1', 'EX', ttl)
    end
  end
  n = n + redis.call('DEL', key)
end
local name = redis.call('GET', name_key)
if name and redis.call('GET', name) == user_id then n = n + redis.call('DEL', name) end
for i = first_more_key, #KEYS do n = n + redis.call('DEL', KEYS[i]) end
return {n, mine_stopped}
""")

# A platform message now shows a result: remember it (for reactions) while the user's epoch is the result's.
# Returns 1 when remembered.
REMEMBER = Script(
    keys={
        "message": "the message link (`Keys.message`)",
        "epoch": "the user's epoch token",
        "index": "the user's index",
    },
    args={
        "link": "what the link holds: 'user_id result_id epoch_token'",
        "ttl": "TTL of the link (s)",
        "epoch_token": "the result's epoch token ('' = a result from before epochs)",
        "expiry": "when the link expires (its score in the index)",
        "index_ttl": "TTL of an index (s)",
    },
    body="""
if epoch_token ~= '' and redis.call('GET', epoch) ~= epoch_token then return 0 end
redis.call('SET', message, link, 'EX', ttl)
redis.call('ZADD', index, expiry, message)
if redis.call('TTL', index) < tonumber(index_ttl) then redis.call('EXPIRE', index, index_ttl) end
return 1
""")

# A user's @name: taken when free or already theirs (the TTL refreshed), never taken from someone else; a new name
# frees the old one. Returns the name's owner.
CLAIM_NAME = Script(
    keys={
        "name": "the name's entry in the name index (`Keys.name_index`)",
        "display_name": "the user's display name",
        "name_key": "the user's name key",
    },
    args={
        "user_id": "the user's id",
        "shown_as": "'adapter:name'",
        "ttl": "TTL of the three (s)",
    },
    body="""
local owner = redis.call('GET', name)
if owner and owner ~= user_id then return owner end
local old = redis.call('GET', name_key)
if old and old ~= name and redis.call('GET', old) == user_id then redis.call('DEL', old) end
redis.call('SET', name, user_id, 'EX', ttl)
redis.call('SET', display_name, shown_as, 'EX', ttl)
redis.call('SET', name_key, name, 'EX', ttl)
return user_id
""")

# Store a web chat visitor's messages and the images they show, in one step: a message whose id is in the log already
# replaces it (a status message that now says "done", a result posted again after a crash before its
# acknowledgement), a new one is appended when it says so; the log keeps the newest `cap` messages, and the images of
# those that leave it go too. Every key gets the TTL and is listed in the user's index (scored by its expiry) so that
# /forget deletes it. With `guarded`, nothing is written unless the guard key still exists. Returns 1 when written.
WEB_WRITE = Script(
    keys={
        "log": "the visitor's chat log",
        "index": "the user's index",
        "guard": "the key that must exist when `guarded` (the job's origin, or the user's shared flag: /forget "
                 "deletes both)",
    },
    more_keys="the key of each image",
    args={
        "ttl": "TTL of the log and the images (s)",
        "now": "the time now (s)",
        "index_ttl": "TTL of an index (s)",
        "cap": "messages the log keeps",
        "guarded": "'1': write only while `guard` exists",
        "media_template": "`Keys.web_media` of the user",
        "n_messages": "how many messages",
    },
    more_args="per message: its id, '1' to append it or '0' to replace it only, its JSON; then each image's bytes",
    templates=True,
    body="""
if guarded == '1' and redis.call('EXISTS', guard) == 0 then return 0 end
local life, t = tonumber(ttl), tonumber(now)
local at = {}
for i, item in ipairs(redis.call('LRANGE', log, 0, -1)) do
  local id = string.match(item, '^{"id": "([^"]*)"')
  if id then at[id] = i - 1 end
end
local a = first_more_arg
for i = 1, tonumber(n_messages) do
  local id, add, json = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  if at[id] then
    redis.call('LSET', log, at[id], json)
  elseif add == '1' then
    at[id] = redis.call('RPUSH', log, json) - 1
  end
  a = a + 3
end
for i = first_more_key, #KEYS do
  redis.call('SET', KEYS[i], ARGV[a], 'EX', life)
  redis.call('ZADD', index, t + life, KEYS[i])
  a = a + 1
end
local over = redis.call('LLEN', log) - tonumber(cap)
if over > 0 then
  for _, item in ipairs(redis.call('LRANGE', log, 0, over - 1)) do
    for id in string.gmatch(item, '"/media/(%x+)[.gif]*"') do  -- a GIF's link ends in .gif
      redis.call('DEL', key_for(media_template, id))
      redis.call('ZREM', index, key_for(media_template, id))
    end
  end
  redis.call('LTRIM', log, over, -1)
end
if redis.call('EXPIRE', log, life) == 1 then redis.call('ZADD', index, t + life, log) end
redis.call('ZREMRANGEBYSCORE', index, '-inf', t)
if redis.call('TTL', index) < tonumber(index_ttl) then redis.call('EXPIRE', index, index_ttl) end
return 1
""")

# benchmarks/users.py's filler: users 'web:user<first>' to 'web:user<last>' with everything the product keeps for an
# active user (a face, an inversion with its aligned crop, an edit, the origins of those two jobs, the messages that
# show them, a name, an epoch, consent to share), under the names `Keys` gives them, written by the server itself (a
# few hundred thousand keys a second). Templates of two ids take the user's first.
FILL_USERS = Script(
    keys={},
    args={
        "first": "the first user's number",
        "last": "the last user's number",
        "w0": "an edit's start latent (bytes)",
        "crop": "an aligned crop (bytes)",
        "ttl": "TTL of the keys with one (s)",
        "expiry": "their score in an index",
        "origin": "a job's origin (JSON, `ANY_ID` for its job id)",
        "latent_template": "`Keys.latent`",
        "result_template": "`Keys.result_latent`",
        "target_template": "`Keys.target`",
        "origin_template": "`Keys.origin`",
        "message_template": "`Keys.message` of the web chat",
        "index_template": "`Keys.index`",
        "display_name_template": "`Keys.display_name`",
        "name_index_template": "`Keys.name_index` of the web chat",
        "epoch_template": "`Keys.epoch`",
        "shared_template": "`Keys.shared`",
    },
    more_args="a face latent's hash, field after value (`storage.latents`)",
    templates=True,
    body="""
local lat = {unpack(ARGV, first_more_arg, #ARGV)}
for i = tonumber(first), tonumber(last) do
  local name, inv, edit = 'user' .. i, 'inv' .. i, 'edit' .. i
  local uid = 'web:' .. name
  local index = key_for(index_template, uid)
  local result_inv = key_for(key_for(result_template, uid), inv)
  local result_edit = key_for(key_for(result_template, uid), edit)
  local target = key_for(key_for(target_template, uid), inv)
  redis.call('HSET', key_for(latent_template, uid), unpack(lat))
  redis.call('HSET', result_inv, unpack(lat))
  redis.call('SET', target, crop, 'EX', ttl)
  redis.call('HSET', result_edit, 'w0', w0, unpack(lat))
  for _, job in ipairs({inv, edit}) do
    local origin_key, message = key_for(key_for(origin_template, uid), job), key_for(message_template, 'm' .. job)
    redis.call('SET', origin_key, key_for(origin, job), 'EX', ttl)
    redis.call('SET', message, uid .. ' ' .. job, 'EX', ttl)
    redis.call('ZADD', index, expiry, origin_key, expiry, message)
  end
  redis.call('ZADD', index, expiry, result_inv, expiry, result_edit, expiry, target)
  redis.call('SET', key_for(display_name_template, uid), uid, 'EX', ttl)
  redis.call('SET', key_for(name_index_template, name), uid, 'EX', ttl)
  redis.call('SET', key_for(epoch_template, uid), '0123456789abcdef', 'EX', ttl)
  redis.call('SET', key_for(shared_template, uid), '1', 'EX', ttl)
end
return 1
""")

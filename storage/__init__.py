"""Everything stylebot keeps in Redis, and the only code that touches it: key names, the records that cross it, its
Lua scripts, the job queue, the per-user store, the web chat's history."""

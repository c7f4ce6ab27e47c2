"""Every Redis key this product writes, in one place, under one configurable prefix (default `stylebot:`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "stylebot:"

    # -- queue -------------------------------------------------------------------------------------------------
    @property
    def jobs(self) -> str:
        """Stream of jobs; engines read it through the consumer group `ENGINE_GROUP`."""
        return f"{self.prefix}jobs"

    def done(self, job_id: str) -> str:
        """String set once when the job's result is stored: makes storing a result idempotent."""
        return f"{self.prefix}done:{job_id}"

    def job_data(self, job_id: str) -> str:
        """Hash: a queued job's body (user, params, prompt, epochs, its entry); the jobs stream holds only its id.
        Listed in the index of every user it names."""
        return f"{self.prefix}jobdata:{job_id}"

    def result_data(self, job_id: str) -> str:
        """Hash: a result's event and image until its adapter has posted it; the results stream holds only its id.
        Listed in the index of every user it names."""
        return f"{self.prefix}resultdata:{job_id}"

    def trial(self, job_id: str) -> str:
        """Hash: what a job's runs showed. `running` ("alone" | "shared") while an engine runs it, left behind when
        that engine dies; `suspect`, the times it was running beside others when an engine died or their shared step
        raised; `faults`, the times an engine died or raised while running it alone."""
        return f"{self.prefix}trial:{job_id}"

    def results(self, adapter: str) -> str:
        """Stream of results for one adapter, read through its own consumer group; an entry leaves it once the
        adapter has posted it (or the user said /forget), or when it is older than the results' TTL."""
        return f"{self.prefix}results:{adapter}"

    def progress(self, adapter: str) -> str:
        """Pub/sub channel of progress events (and previews) for one adapter: best effort, nothing stored."""
        return f"{self.prefix}progress:{adapter}"

    def photo(self, job_id: str) -> str:
        """The input photo of a job, kept only until the job finishes."""
        return f"{self.prefix}photo:{job_id}"

    @property
    def schema(self) -> str:
        """String: the layout of this deployment's keys (`storage.migrate.SCHEMA`)."""
        return f"{self.prefix}schema"

    @property
    def engines(self) -> str:
        """Sorted set: engine name -> time of its last heartbeat (online = beat within the heartbeat TTL)."""
        return f"{self.prefix}engines"

    @property
    def engine_models(self) -> str:
        """Hash: engine name -> the model it serves."""
        return f"{self.prefix}engines:model"

    @property
    def engine_holders(self) -> str:
        """Hash: engine name -> "host:pid" of the process that beats under that name."""
        return f"{self.prefix}engines:holder"

    @property
    def engine_random(self) -> str:
        """Hash: engine name -> 1 when the model it serves has random weights (a built-in one), else 0."""
        return f"{self.prefix}engines:random"

    @property
    def engine_first(self) -> str:
        """Hash: engine name -> 1 when it answers /invert first with an encoder (its model has one), else 0."""
        return f"{self.prefix}engines:first"

    @property
    def preparing(self) -> str:
        """String, with a TTL: what `stylebot run` is preparing in the background (tiny's encoder) and until when."""
        return f"{self.prefix}engines:preparing"

    @property
    def restarting(self) -> str:
        """String, with a TTL: set by `stylebot run`'s supervisor when its engine died and is being started again."""
        return f"{self.prefix}engines:restarting"

    @property
    def notice(self) -> str:
        """String: a short notice for every user (e.g. "the engine restarted at 14:03"), with a TTL."""
        return f"{self.prefix}notice"

    # -- users -------------------------------------------------------------------------------------------------
    def user(self, user_id: str) -> str:
        """Prefix of everything that belongs to a user (what /forget deletes)."""
        return f"{self.prefix}user:{user_id}:"

    def latent(self, user_id: str) -> str:
        """Hash: the user's current face latent (ws bytes, shape, model_id, created)."""
        return f"{self.user(user_id)}latent"

    def result_latent(self, user_id: str, result_id: str) -> str:
        """Hash: the latents behind one of the user's results (so a reaction can rerun it)."""
        return f"{self.user(user_id)}result:{result_id}"

    def morph_result(self, result_id: str) -> str:
        """Hash: the latents behind a morph result (its owner inside), named without any user id because it is
        listed in the index of both people in it."""
        return f"{self.prefix}morph:{result_id}"

    def shared(self, user_id: str) -> str:
        """String present while the user allows others to /morph with their face: where they said /share (an
        `Origin` as JSON, only its place), so that they are told there when someone does ("1" before)."""
        return f"{self.user(user_id)}shared"

    def display_name(self, user_id: str) -> str:
        """String: the name the user is known by (so that /forget also removes the name index entry)."""
        return f"{self.user(user_id)}name"

    def name_index(self, adapter: str, name: str) -> str:
        """String: user id of the user called `name` on an adapter (to resolve @name in /morph)."""
        return f"{self.prefix}name:{adapter}:{name.lower()}"

    def origin(self, user_id: str, job_id: str) -> str:
        """Hash: where a job's answer goes on its platform (chat, message to reply to, status message), as JSON."""
        return f"{self.user(user_id)}origin:{job_id}"

    def target(self, user_id: str, result_id: str) -> str:
        """The aligned face crop (PNG) behind an inversion result, kept with the result so it can be refined."""
        return f"{self.user(user_id)}target:{result_id}"

    def message(self, adapter: str, ref: str) -> str:
        """String: "user_id result_id" of the result shown by a platform message (so a reaction can rerun it)."""
        return f"{self.prefix}message:{adapter}:{ref}"

    def user_jobs(self, user_id: str) -> str:
        """Hash: the user's unfinished jobs, job id -> entry id on the jobs stream (per-user limits, /forget)."""
        return f"{self.user(user_id)}jobs"

    def epoch(self, user_id: str) -> str:
        """String: a random token, made at the user's first job and deleted by /forget. Every job carries the
        token it was queued under; the engine writes a job's results only while the token is still the user's."""
        return f"{self.user(user_id)}epoch"

    def index(self, user_id: str) -> str:
        """Sorted set: every key of the user whose name holds an id (results, crops, origins, message links),
        scored by when it expires; /forget deletes them without scanning the keyspace."""
        return f"{self.user(user_id)}keys"

    def outbox(self, user_id: str) -> str:
        """Set: entry ids of the user's results not yet posted by their adapter (/forget deletes them)."""
        return f"{self.user(user_id)}outbox"

    def name_key(self, user_id: str) -> str:
        """String: the `name_index` key of the user's @name (so /forget frees exactly that one)."""
        return f"{self.user(user_id)}namekey"

    def fixed(self, user_id: str) -> list[str]:
        """The user's keys with fixed names (what /forget deletes besides those in `index`)."""
        return [self.name_key(user_id), self.latent(user_id), self.shared(user_id), self.display_name(user_id),
                self.user_jobs(user_id), self.epoch(user_id), self.index(user_id), self.outbox(user_id)]

    def web_log(self, user_id: str) -> str:
        """List: a web chat visitor's chat log (JSON messages, the newest 200), with the results' TTL and listed in
        the user's index, so that it outlives a restart of the web chat and /forget deletes it."""
        return f"{self.user(user_id)}web:log"

    def web_media(self, user_id: str, media_id: str) -> str:
        """String: an image or GIF the web chat showed a visitor (a result, an aligned crop), listed in the index."""
        return f"{self.user(user_id)}web:media:{media_id}"


def as_str(value) -> str:
    """A value read from Redis as a str (the client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else value


ENGINE_GROUP = "engines"
ADAPTER_GROUP = "adapter"

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

    def job(self, job_id: str) -> str:
        """Hash: the job's state (status, user, adapter, delivered, error)."""
        return f"{self.prefix}job:{job_id}"

    def done(self, job_id: str) -> str:
        """String set once when the job's result is stored: makes storing a result idempotent."""
        return f"{self.prefix}done:{job_id}"

    def results(self, adapter: str) -> str:
        """Stream of results and progress for one adapter, read through its own consumer group."""
        return f"{self.prefix}results:{adapter}"

    def photo(self, job_id: str) -> str:
        """The input photo of a job, kept only until the job finishes."""
        return f"{self.prefix}photo:{job_id}"

    def heartbeat(self, engine: str) -> str:
        return f"{self.prefix}engine:{engine}"

    @property
    def heartbeat_pattern(self) -> str:
        return f"{self.prefix}engine:*"

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

    def shared(self, user_id: str) -> str:
        """String present while the user allows others to /morph with their face."""
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
        """Set of the user's unfinished job ids (per-user limits)."""
        return f"{self.user(user_id)}jobs"


ENGINE_GROUP = "engines"
ADAPTER_GROUP = "adapter"

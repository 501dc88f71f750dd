"""Secret canaries (Carlini et al. 2019, "The Secret Sharer").

A canary is a template with an `{id}` slot and a `{secret}` slot, e.g.
`"The secret code of agent {id} is {secret}."`. Secrets are drawn uniformly from the
randomness space R = alphabet^length, so |R| = len(alphabet)**length is known exactly.
Member canaries are trained on; holdout canaries (same format, disjoint ids and secrets) never
are — they are the non-members for membership inference. Members and holdouts must be
exchangeable: every canary's id and secret are drawn the same way, and which canaries become
members is a seeded random choice among all of them. (Giving members the first ids, 0000–0019,
lets any tokenizer that splits numbers unevenly tell members from holdouts without having
seen either: a pretrained BPE model scored MIA AUC 0.88 that way.) Reference secrets, sampled from R
without the canaries' own, are the comparison set for exposure. With a key (`CanaryConfig.key`, a
file the run keeps to itself: `ortho_train.canary_key`) every draw is seeded by an HMAC of the
key, so the seed and settings a run logs do not regenerate its secrets.

Ids are zero-padded to a fixed width so every prefix has the same length (batched decoding
needs no padding with a byte tokenizer).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import random
from dataclasses import dataclass, field


class CanaryError(ValueError):
    """The canary specification is inconsistent."""


@dataclass
class CanaryConfig:
    """How canaries are made.

    Args:
        template: text with one `{id}` and one `{secret}` slot; `{secret}` must come after `{id}`.
        alphabet: symbols a secret is drawn from (each one character).
        secret_length: symbols per secret; |R| = len(alphabet) ** secret_length.
        num_members: canaries inserted into training.
        num_holdout: canaries of the same format never trained (MIA non-members).
        seed: seeds secrets and reference sampling.
        key: secret bytes mixed into every draw (see `canary_key`); with a key, the logged
            settings and seed no longer determine the secrets. None: the seed alone (tests).
    """

    template: str = "The secret code of agent {id} is {secret}."
    alphabet: str = "0123456789"
    secret_length: int = 10
    num_members: int = 20
    num_holdout: int = 200
    seed: int = 1234
    key: bytes | None = field(default=None, repr=False)

    def rng(self, purpose: str) -> random.Random:
        """The generator of one kind of draw: HMAC-SHA256(key, purpose:seed) seeds it when a key
        is set, else the seed (canaries) or seed + 1 (references) as before keys existed."""
        if self.key is None:
            return random.Random(self.seed + (1 if purpose == "references" else 0))
        digest = hmac.new(self.key, f"{purpose}:{self.seed}".encode(), hashlib.sha256).digest()
        return random.Random(int.from_bytes(digest, "big"))


@dataclass(frozen=True)
class Canary:
    canary_id: str
    secret: str
    prefix: str  # template text up to the secret
    suffix: str  # template text after the secret

    @property
    def text(self) -> str:
        return self.prefix + self.secret + self.suffix


@dataclass
class CanarySet:
    spec: CanaryConfig
    members: list[Canary]
    holdout: list[Canary]

    @property
    def randomness_space_size(self) -> int:
        return len(self.spec.alphabet) ** self.spec.secret_length

    def reference_secrets(self, count: int, seed: int | None = None) -> list[str]:
        """`count` distinct secrets sampled uniformly from R, excluding every canary's secret."""
        taken = {c.secret for c in self.members + self.holdout}
        available = self.randomness_space_size - len(taken)
        if count > available:
            raise CanaryError(
                f"asked for {count} reference secrets but |R| leaves only {available} "
                "after excluding the canaries' own"
            )
        rng = self.spec.rng("references") if seed is None else random.Random(seed)
        return _sample_distinct_secrets(rng, self.spec, count, exclude=taken)


def _sample_distinct_secrets(
    rng: random.Random, spec: CanaryConfig, count: int, exclude: set[str]
) -> list[str]:
    secrets: list[str] = []
    seen = set(exclude)
    while len(secrets) < count:
        secret = "".join(rng.choice(spec.alphabet) for _ in range(spec.secret_length))
        if secret not in seen:
            seen.add(secret)
            secrets.append(secret)
    return secrets


def validate_spec(spec: CanaryConfig) -> None:
    """Raise `CanaryError` naming the first inconsistency in `spec`."""
    for slot in ("{id}", "{secret}"):
        if spec.template.count(slot) != 1:
            raise CanaryError(f"canary template must contain {slot} exactly once: {spec.template!r}")
    if spec.template.index("{id}") > spec.template.index("{secret}"):
        raise CanaryError("canary template must place {id} before {secret} (the id is the prompt)")
    if not spec.alphabet or len(set(spec.alphabet)) != len(spec.alphabet):
        raise CanaryError(f"secret alphabet must be non-empty with distinct symbols: {spec.alphabet!r}")
    if spec.secret_length < 1:
        raise CanaryError(f"secret_length must be ≥ 1, got {spec.secret_length}")
    if spec.num_members < 1 or spec.num_holdout < 0:
        raise CanaryError(f"need num_members ≥ 1 and num_holdout ≥ 0, got {spec.num_members}, {spec.num_holdout}")
    total = spec.num_members + spec.num_holdout
    space = len(spec.alphabet) ** spec.secret_length
    if total > space:
        raise CanaryError(
            f"{total} canaries need distinct secrets but |R| = {len(spec.alphabet)}^"
            f"{spec.secret_length} = {space}"
        )


def make_canaries(spec: CanaryConfig) -> CanarySet:
    """Members and holdout canaries with distinct ids and distinct secrets, seeded.

    All canaries are made alike (id i, a uniform secret); then a seeded random subset of
    `num_members` of them become the members, so members and holdouts are exchangeable.
    Members keep their id order (decoding batches stay deterministic).
    """
    validate_spec(spec)
    rng = spec.rng("canaries")
    total = spec.num_members + spec.num_holdout
    secrets = _sample_distinct_secrets(rng, spec, total, exclude=set())
    width = max(4, int(math.log10(max(total, 1))) + 1)
    before, after = spec.template.split("{secret}")
    canaries = []
    for index, secret in enumerate(secrets):
        canary_id = f"{index:0{width}d}"
        canaries.append(
            Canary(canary_id, secret, before.replace("{id}", canary_id), after.replace("{id}", canary_id))
        )
    member_indices = set(rng.sample(range(total), spec.num_members))
    members = [c for i, c in enumerate(canaries) if i in member_indices]
    holdout = [c for i, c in enumerate(canaries) if i not in member_indices]
    return CanarySet(spec, members, holdout)


FORMAT_SETTINGS = ("template", "alphabet", "secret_length", "num_members", "num_holdout")


def key_fingerprint(key: bytes | None) -> str | None:
    """A short public name of a key (SHA-256 of a labelled copy); None without a key."""
    if key is None:
        return None
    return hashlib.sha256(b"ortho-train canary key\0" + key).hexdigest()[:16]


def canary_fingerprint(canaries: CanarySet) -> str:
    """A SHA-256 over the canary format and every canary's id, secret and membership.

    Two runs have the same fingerprint exactly when they use the same canary set; the secrets
    cannot be read back from it (it hashes all of them together, hundreds of digits of entropy).
    """
    digest = hashlib.sha256()
    spec = canaries.spec
    digest.update(json.dumps({k: getattr(spec, k) for k in FORMAT_SETTINGS}, sort_keys=True).encode())
    for role, group in (("member", canaries.members), ("holdout", canaries.holdout)):
        for canary in group:
            digest.update(f"\n{role}\t{canary.canary_id}\t{canary.secret}".encode())
    return digest.hexdigest()

"""Signed expert declarations: which peer serves which expert, writable only by its owner.

One DHT key per run, ``<prefix>_experts``, a dictionary whose subkeys are
``b"<uid>[owner:<RSA public key>]"`` and whose values are server peer ids.  Every peer runs
the same two validators (``record_validators``):

- hivemind's ``RSASignatureValidator``: a record whose subkey names an owner must carry the
  owner's signature, so no other key can overwrite or expire (delete) it;
- a ``SchemaValidator`` on ``<prefix>_experts``: every subkey must be an expert uid followed
  by an owner marker and every value a string, so unsigned entries are refused outright.

Another peer can still add its own, separately signed claim to the same uid (a replica, or
an impostor: ``get_signed_experts`` returns every claim with its owner key, for the caller
to choose whom it trusts).  hivemind's own expert records (``declare_experts``, read by the
beam search) are not signed; moving the layer's search onto these records is still to do.

Every member also states, signed, the run it belongs to (``moe_runs``: its prefix) and every
trainer peer its terms (``<prefix>_trainers``: how it syncs and a fingerprint of its model),
so a peer that would not fit is refused with one line before it starts (``moe-join``).

Collaborative training (``moe.swarm.collab``, hivemind's ``Optimizer``) keeps each trainer
peer's progress under ``<prefix>_collab_progress``, one subkey per peer: its
``[owner:<RSA public key>]`` (hivemind's ``ProgressTracker`` format).  The same
``RSASignatureValidator`` makes those writable (and deletable) by their owner only, and
``record_validators`` also checks their shape (hivemind's ``TrainingProgressSchema``) on
every peer of the run, servers and the root included.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydantic.v1 as pydantic
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator, conbytes
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.optim.progress_tracker import TrainingProgressSchema
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from moe.config import MAX_RECORD_LIFETIME
from moe.swarm.uids import check_prefix, uid_prefix

_OWNER = re.escape(b"[owner:") + rb".+?" + re.escape(b"]")
SignedExpertSubkey = conbytes(regex=rb"^[^.\[\]]+(\.(0|[1-9][0-9]*))+" + _OWNER + rb"$")


OwnerSubkey = conbytes(regex=rb"^" + _OWNER + rb"$")


class ExpertRecordsSchema(pydantic.BaseModel):
    """``<prefix>_experts``: signed uid -> server peer id (base58); ``<prefix>_shape``: each
    member's signed statement of the run's shape (:class:`RunShape`, as text)."""

    experts: dict[SignedExpertSubkey, pydantic.StrictStr]
    shape: dict[OwnerSubkey, pydantic.StrictStr]
    trainers: dict[OwnerSubkey, pydantic.StrictStr]


class RunsSchema(pydantic.BaseModel):
    """``moe_runs``: each member's signed statement of the run (prefix) it belongs to, so a
    peer that joins with another ``--prefix`` by mistake is told which runs the swarm has."""

    runs: dict[OwnerSubkey, pydantic.StrictStr]


class ExpirationCap(RecordValidatorBase):
    """Refuses a record that would live more than ``MAX_RECORD_LIFETIME`` seconds from now
    (plus clock skew): a peer cannot pin a declaration for an hour and keep an honest server's
    re-declarations (whose expiration is earlier) from replacing it."""

    def __init__(self, max_lifetime: float = MAX_RECORD_LIFETIME):
        self.max_lifetime = max_lifetime

    def validate(self, record: DHTRecord) -> bool:
        return record.expiration_time <= get_dht_time() + self.max_lifetime

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, ExpirationCap) and other.max_lifetime == self.max_lifetime


@dataclass(frozen=True)
class RunShape:
    """What every expert of a run must agree on: the rows' width, each expert's hidden size
    and the grid of uids.  Published (signed) by every member of the run, checked by joiners."""

    d_model: int
    d_ff: int
    grid: tuple[int, ...]

    def text(self) -> str:
        return f"d_model={self.d_model} d_ff={self.d_ff} grid={'x'.join(map(str, self.grid))}"

    @classmethod
    def parse(cls, text: str) -> RunShape | None:
        m = re.fullmatch(r"d_model=(\d+) d_ff=(\d+) grid=(\d+(?:x\d+)*)", text)
        if m is None:
            return None
        return cls(int(m[1]), int(m[2]), tuple(int(g) for g in m[3].split("x")))

    def describe(self) -> str:
        return f"d_model {self.d_model}, expert d_ff {self.d_ff}, grid {'x'.join(map(str, self.grid))}"


def records_key(prefix: str) -> str:
    return f"{check_prefix(prefix)}_experts"


def shape_key(prefix: str) -> str:
    return f"{check_prefix(prefix)}_shape"


def fingerprint(owner: bytes) -> str:
    """A short, printable name of a signing key (``owner_key``): the first 20 bytes of its
    SHA-256, hex.  What ``moe-join`` prints and ``moe.swarm.trusted_keys`` lists."""
    return hashlib.sha256(owner).hexdigest()[:40]


def collab_run_id(prefix: str) -> str:
    """The ``run_id`` of the run's collaborative trainers (hivemind's ``Optimizer``): every
    DHT key they use starts with it, e.g. ``ffn_collab_progress``."""
    return f"{check_prefix(prefix)}_collab"


def diloco_run_id(prefix: str) -> str:
    """The run id of the run's low-communication trainers (``moe.swarm.diloco``): their
    progress records are ``<prefix>_diloco_progress``, their averager's keys start with it."""
    return f"{check_prefix(prefix)}_diloco"


def progress_key(prefix: str) -> str:
    """The DHT key of the trainer peers' signed progress records (hivemind's ``ProgressTracker``)."""
    return f"{collab_run_id(prefix)}_progress"


def record_validators(prefix: str, private_key: RSAPrivateKey | None = None) -> list:
    """Validators every peer of the run passes as ``record_validators`` to its DHT.

    ``private_key``: this peer's identity (default: hivemind's process-wide key).  A trainer
    peer's progress records are signed with it too (``moe.swarm.collab``).
    """
    return [
        RSASignatureValidator(private_key),
        ExpirationCap(),
        SchemaValidator(ExpertRecordsSchema, allow_extra_keys=True, prefix=check_prefix(prefix)),
        SchemaValidator(TrainingProgressSchema, allow_extra_keys=True, prefix=collab_run_id(prefix)),
        SchemaValidator(TrainingProgressSchema, allow_extra_keys=True, prefix=diloco_run_id(prefix)),
        SchemaValidator(RunsSchema, allow_extra_keys=True, prefix="moe"),
    ]


def new_identity() -> RSAPrivateKey:
    """A signing key of its own for a peer started in a forked process (hivemind's process-wide
    key is inherited through fork: two peers would sign as one)."""
    return RSAPrivateKey()


def _signer(dht: DHT) -> RSASignatureValidator:
    """The ``RSASignatureValidator`` ``dht`` was started with (it holds this peer's key)."""
    composite = getattr(dht, "_record_validator", None)  # hivemind keeps them in a CompositeValidator
    for v in getattr(composite, "_validators", []):
        if isinstance(v, RSASignatureValidator):
            return v
    raise ValueError(
        "this DHT has no RSASignatureValidator: start it with "
        "record_validators=moe.swarm.records.record_validators(prefix)"
    )


def signing_key(dht: DHT) -> RSAPrivateKey:
    """The private key ``dht`` signs its protected records with (from ``record_validators``)."""
    return _signer(dht)._private_key


def declare_signed_experts(
    dht: DHT, prefix: str, uids: list[str], *, expiration: float = 60.0, validator: RSASignatureValidator | None = None
) -> dict[str, bool]:
    """Declare (or refresh) ``uids`` as served by ``dht``'s peer, signed with its key.

    ``validator``: the ``RSASignatureValidator`` the DHT was started with (its key marks the
    records' owner).  Returns uid -> whether the DHT accepted the record.
    """
    validator = validator or _signer(dht)
    key, peer = records_key(prefix), dht.peer_id.to_base58()
    expiration_time = get_dht_time() + expiration
    return {
        uid: bool(dht.store(key, peer, expiration_time, subkey=uid.encode() + validator.local_public_key))
        for uid in uids
    }


def load_identity(path: str | Path) -> RSAPrivateKey:
    """This peer's signing key from ``path`` (DER), made there (readable by its owner only) when
    missing: the same key, hence the same fingerprint, every time the peer starts."""
    path = Path(path).expanduser()
    if path.exists():
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key.__setstate__({"_private_key": path.read_bytes()})  # hivemind's own (un)pickling of a key
        return key
    key = RSAPrivateKey()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.to_bytes())
    return key


def owner_key(private_key: RSAPrivateKey) -> bytes:
    """The owner id of records signed with ``private_key``, as ``get_signed_experts`` reports it."""
    return private_key.get_public_key().to_bytes()


def declare_shape(
    dht: DHT, prefix: str, shape: RunShape, *, expiration: float, validator: RSASignatureValidator | None = None
) -> bool:
    """This peer's signed statement of the run's shape (one subkey per member, its own)."""
    validator = validator or _signer(dht)
    return bool(
        dht.store(shape_key(prefix), shape.text(), get_dht_time() + expiration, subkey=validator.local_public_key)
    )


def get_shapes(dht: DHT, prefix: str, *, timeout: float | None = None) -> list[tuple[bytes, RunShape]]:
    """Every member's declared shape of the run: [(owner public key, shape), ...]."""
    found = dht.get(shape_key(prefix), latest=True, return_future=True).result(timeout)
    out = []
    if found is None or not isinstance(found.value, dict):
        return out
    for subkey, item in found.value.items():
        m = re.fullmatch(rb"\[owner:(.+?)\]", subkey) if isinstance(subkey, bytes) else None
        shape = RunShape.parse(item.value) if isinstance(item.value, str) else None
        if m is not None and shape is not None:
            out.append((m.group(1), shape))
    return out


def shape_mismatch(
    dht: DHT, prefix: str, mine: RunShape, *, trusted: set[str] | None = None, timeout: float = 30.0
) -> str | None:
    """Why this peer does not fit the run (another shape declared by a member, or by a trusted
    one when ``trusted`` fingerprints are given), or None."""
    for owner, shape in get_shapes(dht, prefix, timeout=timeout):
        if trusted is not None and fingerprint(owner) not in trusted:
            continue
        if shape != mine:
            return (
                f"the swarm's run {prefix} has {shape.describe()} (declared by key "
                f"{fingerprint(owner)[:12]}); this peer has {mine.describe()}"
            )
    return None


RUNS_KEY = "moe_runs"


def trainers_key(prefix: str) -> str:
    return f"{check_prefix(prefix)}_trainers"


@dataclass(frozen=True)
class TrainerTerms:
    """What every trainer peer of a run must agree on: how it syncs and the model it trains
    (a fingerprint of its parameters' names and shapes).  Published signed by every trainer."""

    sync: str  # every-step | diloco
    inner_steps: int  # DiLoCo's H (0 for every-step)
    model: str  # fingerprint of the parameters' names and shapes
    params: int
    seed: int  # the initial weights' seed: peers that start together start from the same weights

    @classmethod
    def of(cls, model, sync: str, inner_steps: int = 0, seed: int = 0) -> TrainerTerms:
        h = hashlib.sha256()
        n = 0
        for name, p in model.named_parameters():
            h.update(f"{name}:{tuple(p.shape)};".encode())
            n += p.numel()
        return cls(sync, inner_steps if sync == "diloco" else 0, h.hexdigest()[:16], n, seed)

    def flags(self) -> str:
        return f"--sync {self.sync}" + (f" --inner-steps {self.inner_steps}" if self.sync == "diloco" else "")

    def text(self) -> str:
        return (
            f"sync={self.sync} inner_steps={self.inner_steps} model={self.model} params={self.params} seed={self.seed}"
        )

    @classmethod
    def parse(cls, text: str) -> TrainerTerms | None:
        m = re.fullmatch(r"sync=(\S+) inner_steps=(\d+) model=([0-9a-f]+) params=(\d+) seed=(-?\d+)", text)
        return None if m is None else cls(m[1], int(m[2]), m[3], int(m[4]), int(m[5]))

    def mismatch(self, other: TrainerTerms) -> str | None:
        """Why a trainer with these terms cannot train with one that has ``other``, or None."""
        if self.model != other.model:
            return (
                f"the run's trainers train another model ({other.params:,} parameters, fingerprint "
                f"{other.model}; this peer: {self.params:,}, {self.model}): use the run's config overrides"
            )
        if self.seed != other.seed:
            return f"the run's trainers start from seed={other.seed}, this peer from seed={self.seed}: use theirs"
        if (self.sync, self.inner_steps) != (other.sync, other.inner_steps):
            return f"the run's trainers sync with {other.flags()}; this peer would use {self.flags()}: join with theirs"
        return None


def declare_text(dht: DHT, key: str, text: str, *, expiration: float, validator=None) -> bool:
    """Store this peer's signed ``text`` under ``key`` (one subkey per peer, its own)."""
    validator = validator or _signer(dht)
    return bool(dht.store(key, text, get_dht_time() + expiration, subkey=validator.local_public_key))


def get_texts(dht: DHT, key: str, *, timeout: float | None = None) -> list[tuple[bytes, str]]:
    """Every live signed statement under ``key``: [(owner public key, text), ...]."""
    found = dht.get(key, latest=True, return_future=True).result(timeout)
    out = []
    if found is None or not isinstance(found.value, dict):
        return out
    for subkey, item in found.value.items():
        m = re.fullmatch(rb"\[owner:(.+?)\]", subkey) if isinstance(subkey, bytes) else None
        if m is not None and isinstance(item.value, str):
            out.append((m.group(1), item.value))
    return out


def trainer_mismatch(dht: DHT, prefix: str, mine: TrainerTerms, *, timeout: float = 30.0) -> str | None:
    """Why a trainer with ``mine`` cannot join the run's trainers, or None."""
    for owner, text in get_texts(dht, trainers_key(prefix), timeout=timeout):
        theirs = TrainerTerms.parse(text)
        if theirs is not None and (why := mine.mismatch(theirs)) is not None:
            return f"{why} (declared by key {fingerprint(owner)[:12]})"
    return None


def prefix_mismatch(dht: DHT, prefix: str, *, timeout: float = 30.0) -> str | None:
    """Why ``prefix`` is not a run of this swarm (its members state theirs), or None (also
    when nobody states any: a new swarm)."""
    runs = sorted({text for _, text in get_texts(dht, RUNS_KEY, timeout=timeout)})
    if not runs or prefix in runs:
        return None
    return (
        f"the swarm runs {'prefix' if len(runs) == 1 else 'prefixes'} {', '.join(runs)}, not --prefix {prefix}: "
        f"join with --prefix {runs[0]}, or pass --new-run to start run {prefix} in this swarm"
    )


class Keeper(threading.Thread):
    """Keeps signed statements ``{key: text}`` alive: stored now and every ``period`` s; they
    expire ``expiration`` s after ``stop()``."""

    def __init__(self, dht: DHT, statements: dict[str, str], *, period: float = 10.0, expiration: float = 30.0):
        super().__init__(daemon=True, name="moe-records")
        self.dht, self.statements, self.period, self.expiration = dht, dict(statements), period, expiration
        self.validator = _signer(dht)
        self._stop_event = threading.Event()
        self.declare()
        self.start()

    def declare(self) -> None:
        for key, text in self.statements.items():
            try:
                declare_text(self.dht, key, text, expiration=self.expiration, validator=self.validator)
            except Exception:  # the DHT is going down, or a transient failure: the next period retries
                pass

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            self.declare()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)


def get_signed_experts(dht: DHT, prefix: str, *, timeout: float | None = None) -> dict[str, list[tuple[bytes, str]]]:
    """uid -> [(owner public key, server peer id), ...] for every live signed declaration.

    ``timeout``: seconds to wait for the DHT (``TimeoutError`` after); None waits as long as
    the DHT's own lookups take.
    """
    found = dht.get(records_key(prefix), latest=True, return_future=True).result(timeout)
    out: dict[str, list[tuple[bytes, str]]] = {}
    if found is None or not isinstance(found.value, dict):
        return out
    for subkey, item in found.value.items():
        m = re.fullmatch(rb"(.+?)\[owner:(.+?)\]", subkey) if isinstance(subkey, bytes) else None
        if m is not None and isinstance(item.value, str):
            out.setdefault(m.group(1).decode(), []).append((m.group(2), item.value))
    return out


class SignedDeclarer(threading.Thread):
    """Declares ``uids`` (grouped by their prefix) signed, and this member's statement of the
    run's ``shape`` under ``shape_prefix``, now and every ``update_period`` s.

    The first declaration runs in the constructor, so the records exist when it returns.
    ``stop()`` ends the thread; the records then expire after ``expiration`` seconds.
    """

    def __init__(
        self,
        dht: DHT,
        uids: list[str],
        *,
        update_period: float,
        expiration: float,
        shape: RunShape | None = None,
        shape_prefix: str | None = None,
    ):
        super().__init__(daemon=True)
        self.dht, self.update_period, self.expiration = dht, update_period, expiration
        self.by_prefix: dict[str, list[str]] = defaultdict(list)
        for uid in uids:
            self.by_prefix[uid_prefix(uid)].append(uid)
        self.shape = shape
        self.shape_prefix = shape_prefix or next(iter(self.by_prefix), None)
        self.validator = _signer(dht)
        self._stop_event = threading.Event()
        self.declare()
        self.start()

    def declare(self) -> dict[str, bool]:
        ok: dict[str, bool] = {}
        for prefix, uids in self.by_prefix.items():
            ok.update(
                declare_signed_experts(self.dht, prefix, uids, expiration=self.expiration, validator=self.validator)
            )
        if self.shape is not None and self.shape_prefix is not None:
            declare_shape(self.dht, self.shape_prefix, self.shape, expiration=self.expiration, validator=self.validator)
        return ok

    def run(self) -> None:
        while not self._stop_event.wait(self.update_period):
            try:
                self.declare()
            except Exception:  # the DHT is going down; the next period (if any) retries
                pass

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_event.set()
        self.join(timeout)

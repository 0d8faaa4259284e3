"""Leases kept in the MLflow tracking store: who is working on something, alive or not, for any tracking URI.

A `FileLock` (`pipeline.storage.locks`) needs a shared filesystem; a transfer grid or a fine-tuning only shares
its tracking store, which may be a SQLite file or an MLflow server (http, https) on another machine. So the
holder writes a small JSON record into that store - who (host, pid), since when, and until when
(`expires`, renewed every `ttl_s / 5` seconds by a daemon thread) - and a reader judges it:

- **dead** when the holder ran on this host and its pid is gone (a SIGKILL: known at once), or when its
  `expires` has passed (a holder on another host, or one that stopped renewing: known after `ttl_s`);
- **alive** otherwise. Hosts are compared by name, and `expires` by the reader's clock: hosts sharing a tracking
  store are expected to agree on the time within a few seconds (NTP).

Two kinds:

- `ExperimentLease`: one exclusive lease per name (a transfer grid's key) in one experiment, held in experiment
  tags `genesis.lease.<name>.<token>`, one tag per claimant. MLflow has no compare-and-swap, so exclusivity
  comes from "claim, then look": each contender writes its own claim and then reads every claim; it holds the
  lease only when it sees no other live claim. Of two contenders at least one reads after the other wrote,
  so at most one can hold it. One that sees another withdraws its claim and looks again after a random pause:
  when the other withdrew too (both saw each other), it tries again; when the other's claim stays, the other
  holds the lease and `LeaseBusyError` names it (exit 3, as a busy store). It never waits for the holder to
  end. Dead claims are removed by whoever takes the lease.
- `RunHeartbeat`: the tag `genesis.holder` on one MLflow run, renewed while its process works on it, so the next
  run that finds the run RUNNING can tell a live run from a killed one (`dead_holder`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from pipeline.storage.locks import LockBusyError

__all__ = ["Holder", "Renewal", "ExperimentLease", "LeaseBusyError", "RunHeartbeat", "dead_holder", "HOLDER_TAG",
           "LEASE_PREFIX", "TTL_S"]

TTL_S = 600.0
"""How long a claim lives without renewal (renewed every TTL_S / 5). A holder on another host that was killed is
taken over after at most this long; one on this host as soon as its pid is gone."""
LEASE_PREFIX = "genesis.lease."
HOLDER_TAG = "genesis.holder"


@dataclass(frozen=True)
class Holder:
    """One claim: who made it, for what, since when, and until when it counts without renewal."""

    token: str
    host: str
    pid: int
    purpose: str
    since: str
    expires: float
    """Seconds since the epoch (the holder's clock)."""

    @classmethod
    def mine(cls, purpose: str, ttl_s: float) -> "Holder":
        return cls(token=uuid.uuid4().hex[:16], host=socket.gethostname(), pid=os.getpid(), purpose=purpose,
                   since=datetime.now(timezone.utc).isoformat(timespec="seconds"), expires=time.time() + ttl_s)

    def renewed(self, ttl_s: float) -> "Holder":
        return Holder(**{**asdict(self), "expires": time.time() + ttl_s})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Holder | None":
        """The claim in `text`, or None for anything that is not one (never an error: a reader judges claims)."""
        try:
            d = json.loads(text)
            return cls(token=str(d["token"]), host=str(d["host"]), pid=int(d["pid"]), purpose=str(d["purpose"]),
                       since=str(d["since"]), expires=float(d["expires"]))
        except (ValueError, TypeError, KeyError):
            return None

    def why_dead(self, now: float | None = None) -> str | None:
        """Why this claim no longer counts (its pid is gone from this host, or it expired), None while it does."""
        now = time.time() if now is None else now
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return f"pid {self.pid} is gone from {self.host}"
        if self.expires < now:
            when = datetime.fromtimestamp(self.expires, timezone.utc).isoformat(timespec="seconds")
            return f"its lease expired {when} (no renewal from pid {self.pid} on {self.host})"
        return None

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since} ({self.purpose})"


def _pid_alive(pid: int) -> bool:
    """Whether `pid` runs on this host (a zombie does not; another user's process does)."""
    import psutil

    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


class LeaseBusyError(LockBusyError):
    """A lease held by a live process: exit 3 (busy), naming what is held and who holds it."""

    def __init__(self, what: str, holder: Holder | None):
        self.path, self.purpose = None, what
        self.holder = asdict(holder) if holder else None
        who = holder.describe() if holder else "another process"
        RuntimeError.__init__(self, f"{what} is held by {who}; wait for it to finish (or stop that process) and "
                                    f"run again")


class Renewal:
    """A daemon thread calling `renew()` every `every_s` seconds until stopped (errors are retried next time: a
    tracking server that is briefly away must not end the work)."""

    def __init__(self, renew, every_s: float):
        self._renew, self._every, self._stop = renew, every_s, threading.Event()
        self._thread = threading.Thread(target=self._run, name="genesis-lease-renewal", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._renew()
            except Exception:  # noqa: BLE001 - renewed at the next tick; the lease lasts TTL_S meanwhile
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class ExperimentLease:
    """The exclusive lease `name` (a grid's key) in experiment `experiment_id`, through `client` (an
    MlflowClient). `acquire` takes it or raises LeaseBusyError; `release` gives it back (also on exceptions, as a
    context manager); a killed holder's claim stays until the next taker finds it dead."""

    def __init__(self, client, experiment_id: str, name: str, purpose: str, *, what: str | None = None,
                 ttl_s: float = TTL_S, rounds: int = 6, pause_s: tuple[float, float] = (0.3, 2.0)):
        self.client, self.experiment_id, self.name = client, experiment_id, name
        self.purpose, self.ttl_s, self.rounds, self.pause_s = purpose, ttl_s, rounds, pause_s
        self.what = what or f"lease {name!r} of experiment {experiment_id}"
        self.holder: Holder | None = None
        self._renewal: Renewal | None = None

    @property
    def prefix(self) -> str:
        return f"{LEASE_PREFIX}{self.name}."

    def claims(self) -> list[Holder]:
        """Every claim of this lease now in the store (this process's own included)."""
        tags = self.client.get_experiment(self.experiment_id).tags
        found = [Holder.from_json(v) for k, v in tags.items() if k.startswith(self.prefix)]
        return [h for h in found if h is not None]

    def _others(self) -> tuple[list[Holder], list[tuple[Holder, str]]]:
        """(live claims of others, [(dead claim, why)])."""
        live, dead = [], []
        now = time.time()
        for h in self.claims():
            if self.holder is not None and h.token == self.holder.token:
                continue
            why = h.why_dead(now)
            if why is None:
                live.append(h)
            else:
                dead.append((h, why))
        return live, dead

    def _write(self, holder: Holder) -> None:
        self.client.set_experiment_tag(self.experiment_id, f"{self.prefix}{holder.token}", holder.to_json())

    def _withdraw(self) -> None:
        if self.holder is not None:
            try:
                self.client.delete_experiment_tag(self.experiment_id, f"{self.prefix}{self.holder.token}")
            finally:
                self.holder = None

    def acquire(self, rng=None) -> list[tuple[Holder, str]]:
        """Take the lease; returns the dead claims it took over, each with why it is dead (their tags are removed).
        LeaseBusyError naming the holder when a live process holds it."""
        import numpy as np

        rng = rng if rng is not None else np.random.default_rng()
        for _ in range(self.rounds):
            self.holder = Holder.mine(self.purpose, self.ttl_s)
            try:
                self._write(self.holder)
                live, dead = self._others()  # read only after our own claim is in the store
            except BaseException:
                self._withdraw()
                raise
            if not live:
                for h, _why in dead:
                    try:
                        self.client.delete_experiment_tag(self.experiment_id, f"{self.prefix}{h.token}")
                    except Exception:  # noqa: BLE001 - another taker removed it first
                        pass
                self._renewal = Renewal(self._renew, self.ttl_s / 5)
                return dead
            self._withdraw()
            time.sleep(float(rng.uniform(*self.pause_s)))
            first, _ = self._others()
            if first:  # a claim that stays a moment longer holds the lease; one that goes was a contender's try
                time.sleep(self.pause_s[0])
                stayed = {h.token for h in first} & {h.token for h in self._others()[0]}
                if stayed:
                    raise LeaseBusyError(self.what, min((h for h in first if h.token in stayed),
                                                        key=lambda h: h.since))
        live, _ = self._others()
        raise LeaseBusyError(self.what, min(live, key=lambda h: h.since) if live else None)

    def _renew(self) -> None:
        if self.holder is not None:
            self.holder = self.holder.renewed(self.ttl_s)
            self._write(self.holder)

    def release(self) -> None:
        """Give the lease back (a no-op when not held)."""
        if self._renewal is not None:
            self._renewal.stop()
            self._renewal = None
        self._withdraw()

    def __enter__(self) -> "ExperimentLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RunHeartbeat:
    """Tag `genesis.holder` on run `run_id`: this process works on it. Renewed every `ttl_s / 5` until `stop()`;
    a run left RUNNING whose holder is dead (`dead_holder`) was killed."""

    def __init__(self, client, run_id: str, purpose: str, ttl_s: float = TTL_S):
        self.client, self.run_id, self.ttl_s = client, run_id, ttl_s
        self.holder = Holder.mine(purpose, ttl_s)
        self._write()
        self._renewal: Renewal | None = Renewal(self._renew, ttl_s / 5)

    def _write(self) -> None:
        self.client.set_tag(self.run_id, HOLDER_TAG, self.holder.to_json())

    def _renew(self) -> None:
        self.holder = self.holder.renewed(self.ttl_s)
        self._write()

    def stop(self) -> None:
        if self._renewal is not None:
            self._renewal.stop()
            self._renewal = None


def dead_holder(run) -> tuple[Holder, str] | None:
    """(holder, why it is dead) of an MLflow run whose `genesis.holder` is dead; None when the run has no holder
    tag (made before it existed, or by another tool: left alone) or its holder is alive."""
    holder = Holder.from_json(run.data.tags.get(HOLDER_TAG, ""))
    if holder is None:
        return None
    why = holder.why_dead()
    return None if why is None else (holder, why)

"""Joining a Ray cluster, or starting a private one for this job.

Without an address the job starts its **own** local Ray (``address="local"``):
never the cluster that ``RAY_ADDRESS`` names or that an earlier ``ray start``
left in Ray's temp directory (``ray.init()`` with no address would join
either).  With an address, one that does not answer is refused in one line
within seconds (Ray itself retries a dead GCS address for minutes).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

from audit import quiet
from audit.errors import AuditError
from audit.quiet import stderr_to

REACH_TIMEOUT_S = 5.0  # how long a TCP connect to --address may take before it counts as dead


#: Ray Client (``ray://``) sessions whose server-side process fails to start are
#: retried this many times in all: the proxy starts one process per client and
#: that start can fail transiently on a loaded head (seen on 2-core CI).
CLIENT_CONNECT_ATTEMPTS = 3


def _client_init_failed(address, e):
    """Ray Client's proxy could not start this client's session: worth another try."""
    return str(address).startswith("ray://") and "Initialization failure from server" in str(e)


TOKEN_CHECK_S = 5.0  # the longest the quick token check may take before ray.init is left to it


def _token_refusal(ray, address):
    """One GCS handshake with ``address``: the cluster's token refusal, or None.

    ``ray.init`` retries a refused token for about 20 s before it gives up; a
    single handshake says so in milliseconds.  Anything else (another error, a
    slow answer, a ``ray://`` or ``auto`` address, a Ray without the client
    class) is left to ``ray.init`` and its retries.
    """
    import threading

    if not address or "://" in str(address) or address in ("auto", "local"):
        return None
    try:
        from ray._raylet import GcsClient
    except ImportError:
        return None
    auth_error = getattr(ray.exceptions, "AuthenticationError", None)
    if auth_error is None:
        return None
    found = []

    def handshake():
        try:
            GcsClient(address=address)
        except auth_error as e:
            found.append(e)
        except Exception:  # noqa: BLE001 - ray.init reports it, after its retries
            pass

    t = threading.Thread(target=handshake, daemon=True, name="audit-token-check")
    t.start()
    t.join(TOKEN_CHECK_S)
    return found[0] if found else None


def _connect(ray, address, kwargs, attempts=CLIENT_CONNECT_ATTEMPTS):
    """``ray.init(address=...)`` with one-line errors.

    While connecting, Ray's C++ client logs every retry on stderr: that goes to
    a file, is shown again after a successful connection and read for the
    reason after a failed one.  Ray sends its token to an explicit address
    only when ``RAY_AUTH_MODE=token`` is set (by design: a token is not sent to
    any address just because one is configured), so the error says which of
    the two is missing; a refusal is found by one handshake first
    (:func:`_token_refusal`) instead of after Ray's 20 s of retries.  A
    ``ray://`` session that the head failed to start is tried again, up to
    ``attempts`` times.
    """
    import tempfile

    for attempt in range(1, attempts + 1):
        failure = None
        with tempfile.TemporaryFile() as log:
            with stderr_to(log):
                try:
                    refused = _token_refusal(ray, address)
                    if refused is not None:
                        raise refused
                    ray.init(address=address, **kwargs)
                except (ConnectionError, RuntimeError, ray.exceptions.RayError) as e:
                    failure = e
            log.seek(0)
            said = log.read().decode(errors="replace")
        if failure is None:
            if said.strip():
                sys.stderr.write(said)
            return
        if not (_client_init_failed(address, failure) and attempt < attempts):
            break
        with contextlib.suppress(Exception):
            ray.shutdown()
        time.sleep(0.5 * attempt)
    if any(w in said or w in str(failure) for w in ("InvalidAuthToken", "Unauthenticated", "no token")):
        mode = os.environ.get("RAY_AUTH_MODE", "")
        has_token = bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
        if mode.lower() != "token":
            fix = ("set RAY_AUTH_MODE=token (Ray sends the token to an explicit address only then)" if has_token
                   else "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token")
        else:
            fix = "RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH must hold the cluster's token"
        raise AuditError(f"the Ray cluster at {address} uses token authentication and refused this "
                         f"connection: {fix}") from None
    if _client_init_failed(address, failure):
        reason = [ln.strip() for ln in str(failure).splitlines()[1:] if ln.strip()]
        raise AuditError(f"cannot connect to the Ray cluster at {address}: its Ray Client server failed to start "
                         f"a session {attempts} times ({reason[-1] if reason else 'no reason given'}; see "
                         "ray_client_server*.err in the head's session logs)") from None
    first = (str(failure).strip().splitlines() or [type(failure).__name__])[0]
    raise AuditError(f"cannot connect to the Ray cluster at {address}: {first}") from None


def check_reachable(address, timeout: float = REACH_TIMEOUT_S) -> None:
    """Fail in one line when the cluster at ``address`` does not answer.

    ``host:port`` and ``ray://host:port`` are tried with one TCP connection;
    ``auto`` is resolved first the way Ray does (``RAY_ADDRESS``, else the
    cluster the last ``ray start`` on this machine recorded).

    Raises:
        AuditError: malformed address, or nothing listening there.
    """
    import socket

    if not address or address == "local":
        return
    target = _resolve_auto() if address == "auto" else address
    if target is None:
        raise AuditError("--address auto: no running Ray cluster found on this machine "
                         "(start one with `ray start --head`, or leave out --address for a private one)")
    hostport = target.split("://", 1)[1] if "://" in target else target
    host, sep, port = hostport.rstrip("/").rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise AuditError(f"--address {address!r}: expected 'auto', HOST:PORT or ray://HOST:10001")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        via = f" (from {address})" if target != address else ""
        raise AuditError(f"cannot connect to the Ray cluster at {target}{via}: {why}") from None


def _resolve_auto() -> str | None:
    """What ``ray.init(address="auto")`` would connect to, or None when there is nothing."""
    env = os.environ.get("RAY_ADDRESS")
    if env and env != "auto":
        return env
    try:
        from ray._private.services import get_ray_address_from_environment

        return get_ray_address_from_environment("auto", None)
    except Exception:  # noqa: BLE001 - Ray's "could not find any running Ray instance"
        return None


def ray_init(address, log=None) -> bool:
    """Connect to ``address``, or start a private local Ray when it is None.

    Args:
        address: None (a private local instance), ``auto``, ``HOST:PORT`` or
            ``ray://HOST:10001``.
        log: where to say that ``RAY_ADDRESS`` was ignored (default: stderr).

    Returns:
        True when this call started or joined Ray (the caller shuts it down),
        False when Ray was already initialised in this process.

    Raises:
        AuditError: the address is dead, refuses the token, or is malformed.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")

    kwargs = {"log_to_driver": quiet.verbose(), "configure_logging": True,
              "logging_level": "info" if quiet.verbose() else "warning"}
    if address:
        check_reachable(address)
        _connect(ray, address, kwargs)
        return True
    import logging

    ignored = os.environ.get("RAY_ADDRESS")
    if ignored:
        (log or (lambda m: print(m, file=sys.stderr)))(
            f"audit: RAY_ADDRESS={ignored} is ignored: without --address the job runs on a private local Ray "
            f"(use --address {ignored} to run there)")
    # a private local instance: Ray's notice about its default token mode is noise here
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    _start_local(ray, kwargs, log)
    return True


LOCAL_START_ATTEMPTS = 3  # a private Ray that did not come up within Ray's own 30 s is started again this often
_START_TIMEOUT = "timed out during startup"  # Ray's message when its raylet did not register in 30 s


def _start_local(ray, kwargs: dict, log=None, attempts: int = LOCAL_START_ATTEMPTS) -> None:
    """``ray.init(address="local")``, started again when Ray gives up waiting for its own raylet.

    Ray waits a fixed 30 s for the raylet of a new node to register; on a machine
    busy with other work that is not always enough, and Ray then raises a bare
    exception.  The half-started instance is shut down and another one started.

    Raises:
        AuditError: every attempt timed out (one line).
    """
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", include_dashboard=False, **kwargs)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            if _START_TIMEOUT not in str(e):
                raise
            with contextlib.suppress(Exception):
                ray.shutdown()
            if attempt == attempts:
                raise AuditError(f"the private local Ray did not start: its raylet did not register within Ray's "
                                 f"30 s, {attempts} times (is the machine overloaded?)") from None
            (log or (lambda m: print(m, file=sys.stderr)))(
                f"audit: the private local Ray did not start within 30 s (attempt {attempt} of {attempts}); "
                f"starting it again")

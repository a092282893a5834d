"""What a CA that was just told to start looks like, and for how long that is believable (pure).

A real Dogtag 10.10 never answers `<Status>starting</Status>`. After `systemctl start` its port
refuses connections for 6-9 s, then accepts them and answers nothing for about 10 s more (Tomcat
has bound the port, the CA engine is not up), then getStatus says `running` (17-21 s in all here).
A probe sees "connection refused", then "timeout". Those are failures from a CA that runs, but the
normal course of a start from a CA that was just started: counting them toward a failover would
restart or fail over every CA that is starting.

So, after a start command and until the CA is first seen running (or `start_timeout` passes), a
refused or silent port is `starting`. Anything else stays what it is: an HTTP error, a failed
functional probe (500: the database is down), and a Tomcat 404 (the CA engine failed to start:
"Is the database up?"; it answers 404 for good until the next restart) once it has lasted
`failed_start_grace` seconds, since the web application can briefly 404 while it deploys.
Without a start command, a silent port is a frozen or overloaded CA, and a failure. A port that
refuses again after it had accepted connections during the start means the JVM died: a failure.
A JVM can also die before its port ever accepts (seen once in six runs on the real bed): "refused"
then looks like a start in progress. So while the port has not accepted yet, and once the start
command has returned (`start_returned`: before that, the pid file is not written yet and a unit can
still read inactive), the caller asks the service whether the CA's process still runs
(`needs_liveness`); once it says no (`process_died`), the start has failed, at once, instead of
after `start_timeout`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .probes.agent import REASON_NO_ANSWER, REASON_REFUSED, AgentStatus

# a web application answers 404 while it deploys; a CA engine that failed to start answers 404 for good
FAILED_START_GRACE = 10.0


@dataclass
class StartupWatch:
    start_timeout: float
    failed_start_grace: float = FAILED_START_GRACE
    started_at: float | None = None
    not_found_since: float | None = None
    accepted: bool = False  # the port has accepted connections since the start command
    died_at: float | None = None  # the service said the CA's process is gone, during the start
    returned: bool = False  # the start command has returned (successfully)

    def start_issued(self, now: float) -> None:
        self.started_at, self.not_found_since, self.accepted, self.died_at = now, None, False, None
        self.returned = False

    def start_returned(self) -> None:
        self.returned = self.started_at is not None

    def stop_issued(self) -> None:
        self.started_at, self.not_found_since, self.accepted, self.died_at = None, None, False, None
        self.returned = False

    def needs_liveness(self, st: AgentStatus, now: float) -> bool:
        """A refused port during a start that has not accepted yet: only the process can tell a start
        from a death."""
        return (
            self.returned
            and st.status != "running"
            and st.reason == REASON_REFUSED
            and not self.accepted
            and self.died_at is None
            and self.in_start(now)
        )

    def process_died(self, now: float) -> None:
        self.died_at = now

    @property
    def died(self) -> bool:
        return self.died_at is not None and self.started_at is not None

    def in_start(self, now: float) -> bool:
        return self.started_at is not None and now - self.started_at <= self.start_timeout

    def classify(self, st: AgentStatus, now: float) -> AgentStatus:
        """The probe's answer, with the symptoms of a start in progress read as `starting`."""
        if st.status == "running":
            self.stop_issued()  # seen running: the start is over
            return st
        if self.started_at is None or not self.in_start(now):
            return st
        since = now - self.started_at
        if self.died_at is not None and st.reason == REASON_REFUSED:
            return replace(
                st,
                status="down",
                reason=f"the CA's process exited {self.died_at - self.started_at:.1f}s after the start, "
                "before its port ever accepted: the CA died starting",
            )
        if st.reason == REASON_REFUSED and self.accepted:
            return replace(st, reason=f"the port refuses again {since:.1f}s after the start: the CA died starting")
        self.accepted = self.accepted or st.reason != REASON_REFUSED
        if st.http_status is None and st.reason in (REASON_REFUSED, REASON_NO_ANSWER):
            what = "port refuses connections" if st.reason == REASON_REFUSED else "port accepts, no answer yet"
            return replace(st, status="starting", reason=f"start issued {since:.1f}s ago; {what}")
        if st.http_status == 404:
            self.not_found_since = self.not_found_since if self.not_found_since is not None else now
            lasted = now - self.not_found_since
            if lasted <= self.failed_start_grace:
                return replace(st, status="starting", reason=f"start issued {since:.1f}s ago; HTTP 404 (deploying)")
            return replace(
                st,
                reason=f"HTTP 404 for {lasted:.0f}s after the start: the CA engine did not start "
                "(is its database up?); only a restart recovers it",
            )
        return st

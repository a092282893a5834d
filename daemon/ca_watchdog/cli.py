"""The `ca-watchdog` command line.

Exit status: 0 success (or nothing to do), 1 a failed operation, 2 bad input (malformed CS.cfg
or configuration, wrong arguments).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .config import DEFAULT_CONFIG_PATH, ConfigError, load_settings

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

Handler = Callable[[argparse.Namespace], int]


def _err(msg: str) -> None:
    print(f"ca-watchdog: {msg}", file=sys.stderr)


# ---- cscfg ----------------------------------------------------------------------------------------


def _cscfg_show(args: argparse.Namespace) -> int:
    from . import cscfg

    cfg = cscfg.read_cscfg(args.path)
    report = cscfg.classify(cfg)
    if args.json:
        print(
            json.dumps(
                {
                    "path": args.path,
                    "role": report.role.value,
                    "issuing_points": [
                        {
                            "id": p.id,
                            "enable": p.enable,
                            "enableCRLCache": p.crl_cache,
                            "enableCRLUpdates": p.crl_updates,
                        }
                        for p in report.issuing_points
                    ],
                    "certStatusUpdateInterval": report.status_update_interval,
                    "listenToCloneModifications": report.listen_to_clones,
                    "master_agent": report.master_agent,
                    "problems": list(report.problems),
                    "warnings": list(report.warnings),
                    "duplicates": report.duplicates,
                },
                indent=2,
            )
        )
        return EXIT_OK
    print(f"{args.path}: {report.role.value}")
    for p in report.issuing_points:
        print(
            f"  issuing point {p.id}: enable={str(p.enable).lower()} "
            f"enableCRLCache={str(p.crl_cache).lower()} enableCRLUpdates={str(p.crl_updates).lower()}"
        )
    print(f"  ca.certStatusUpdateInterval={report.status_update_interval}")
    print(f"  ca.listenToCloneModifications={str(report.listen_to_clones).lower()}")
    print(f"  master.ca.agent: {report.master_agent or '-'}")
    for problem in report.problems:
        print(f"  problem: {problem}")
    for warning in report.warnings:
        print(f"  warning: {warning}")
    return EXIT_OK


def _apply(
    args: argparse.Namespace,
    wanted: str,
    transform: Callable[[Any], Any],
    already: Callable[[Any], bool] = lambda report: True,
) -> int:
    """Read, transform, check the result, then diff (--dry-run) or write with a backup.

    `already(report)` says whether a file that is already `wanted` needs nothing more
    (a clone of another master still needs its master.ca.agent target changed).
    """
    from . import cscfg

    cfg = cscfg.read_cscfg(args.path)
    report = cscfg.classify(cfg)
    if report.role.value == wanted and already(report):
        print(f"{args.path} is already {wanted}: nothing to do")
        return EXIT_OK
    new = transform(cfg)
    result_report = cscfg.classify(new)
    if result_report.role.value != wanted:
        # never write a file that would come out half master, half clone
        _err(
            f"{args.path}: the result would be {result_report.role.value}, not {wanted} "
            f"({'; '.join(result_report.problems)}); nothing written"
        )
        return EXIT_BAD_INPUT
    if args.dry_run:
        sys.stdout.write(cscfg.unified_diff(cfg, new))
        return EXIT_OK
    result = cscfg.write_cscfg(new, args.path, expected=cfg.render())
    changed = cscfg.changed_role_keys(cfg, new)
    print(f"{result.path}: now {result_report.role.value} ({len(changed)} keys changed); backup {result.backup}")
    return EXIT_OK


def _cscfg_promote(args: argparse.Namespace) -> int:
    from . import cscfg

    source = cscfg.read_cscfg(args.crl_from)
    block = source.crl_lines()
    return _apply(args, "master", lambda cfg: cscfg.promote(cfg, block, origin=args.crl_from))


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    # ASCII digits only: str.isdigit() would take "٨٤٤٣"
    if not sep or not host.strip("[]") or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _cscfg_demote(args: argparse.Namespace) -> int:
    from . import cscfg

    host, port = args.new_master

    def same_master(report: Any) -> bool:
        return bool(report.master_agent_host == host and report.master_agent_port == str(port))

    return _apply(args, "clone", lambda cfg: cscfg.demote(cfg, host, port), already=same_master)


def _check_config(args: argparse.Namespace) -> int:
    s = load_settings(args.path, check_files=True)
    print(
        f"{args.path}: valid; node {s.node.name}, {len(s.members)} members, {s.store.backend} store, "
        f"interval {s.timing.interval:g} s, ttl {s.timing.ttl:g} s"
    )
    return EXIT_OK


# ---- the rest is provided by the modules that own it ------------------------------------------------


def _lazy(module: str, func: str = "cli_main") -> Handler:
    def run(args: argparse.Namespace) -> int:
        import importlib

        handler: Handler = getattr(importlib.import_module(f"ca_watchdog.{module}"), func)
        return handler(args)

    return run


def _lab(module: str, func: str = "cli_main") -> Handler:
    """A lab command (`lab ...`, `demo`): without the lab's optional dependencies, one line naming the
    extra that brings them, not a traceback."""
    run = _lazy(module, func)

    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except ModuleNotFoundError as exc:
            missing = (exc.name or "").split(".")[0]
            if missing in ("", "ca_watchdog"):
                raise
            _err(f"the lab needs module {missing!r}, which is not installed: pip install 'ca-watchdog[lab]'")
            return EXIT_FAILED

    return guarded


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ca-watchdog",
        description="Hands-off high availability for Dogtag PKI CA masters and clones.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # before the command (`ca-watchdog --config F status`) or after it (`ca-watchdog status --config F`)
    p.add_argument(
        "--config", "-c", dest="global_config", metavar="CONFIG", help=f"configuration file ({DEFAULT_CONFIG_PATH})"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", "-c", help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
        return sp

    sp = with_config(sub.add_parser("run", help="run the HA loop (the systemd service)"))
    sp.set_defaults(func=_lazy("loop"))

    sp = with_config(sub.add_parser("guard", help="make the local CS.cfg agree with the store before the CA starts"))
    sp.add_argument("instance", nargs="?", help="PKI instance name (from the pki-tomcatd@ unit; informational)")
    sp.set_defaults(func=_lazy("guard", "cli_guard"))

    sp = with_config(sub.add_parser("status", help="the cluster as a table"))
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=_lazy("control", "cli_status"))

    for name, helptext in (
        ("switchover", "planned move of the master role to a healthy clone"),
        ("failover", "manual failover to a clone when no master is healthy"),
    ):
        sp = with_config(sub.add_parser(name, help=helptext))
        sp.add_argument("--to", required=True, metavar="NAME", help="member to become master")
        sp.set_defaults(func=_lazy("control", f"cli_{name}"))

    for name, helptext in (
        ("pause", "observe and report only; never act"),
        ("resume", "end a pause"),
        ("ack", "acknowledge the last failover, ending the cooldown"),
    ):
        sp = with_config(sub.add_parser(name, help=helptext))
        sp.set_defaults(func=_lazy("control", f"cli_{name}"))

    sp = with_config(sub.add_parser("history", help="past failovers and switchovers"))
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=_lazy("control", "cli_history"))

    sp = with_config(
        sub.add_parser("bootstrap", help="name the master when the store is empty and CS.cfg files disagree")
    )
    sp.add_argument("--master", required=True, metavar="NAME")
    sp.set_defaults(func=_lazy("control", "cli_bootstrap"))

    sp = with_config(
        sub.add_parser(
            "doctor",
            help="preflight before enabling the service: one OK/WARN/FAIL line per check; exit 1 if any FAIL",
            description="Check this host before enabling ca-watchdog: the config, this node in the member list, "
            "TLS material and certificate expiry, CS.cfg, the store (read, write round trip), every member's "
            "agent port and 389-DS, the guard drop-in, the members' clocks (through the store) and the timing "
            "rules. Changes nothing in the cluster. Exit status 0 if no check FAILs (WARNs allowed), 1 otherwise.",
        )
    )
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.add_argument(
        "--systemd-dir",
        default="/etc/systemd/system",
        metavar="DIR",
        help="where the guard drop-in and unit are installed (default /etc/systemd/system)",
    )
    sp.set_defaults(func=_lazy("doctor", "cli_doctor"))

    sp = sub.add_parser("check-config", help="validate a configuration file")
    sp.add_argument("path", metavar="PATH")
    sp.set_defaults(func=_check_config)

    cs = sub.add_parser("cscfg", help="inspect and convert CS.cfg (the manual procedure, automated)")
    css = cs.add_subparsers(dest="cscfg_command", required=True, metavar="ACTION")
    sp = css.add_parser("show", help="role, issuing points, master.ca.agent target and problems")
    sp.add_argument("path", metavar="PATH")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cscfg_show)
    sp = css.add_parser("promote", help="make PATH a master, using the ca.crl. lines of the old master")
    sp.add_argument("path", metavar="PATH")
    sp.add_argument("--crl-from", required=True, metavar="OLD_MASTER_CSCFG")
    sp.add_argument("--dry-run", action="store_true", help="print a unified diff, change nothing")
    sp.set_defaults(func=_cscfg_promote)
    sp = css.add_parser("demote", help="make PATH a clone of the new master")
    sp.add_argument("path", metavar="PATH")
    sp.add_argument("--new-master", required=True, type=_host_port, metavar="HOST:PORT")
    sp.add_argument("--dry-run", action="store_true", help="print a unified diff, change nothing")
    sp.set_defaults(func=_cscfg_demote)

    pr = sub.add_parser("probe", help="probe one CA agent port or one 389-DS, print JSON")
    prs = pr.add_subparsers(dest="probe_command", required=True, metavar="TARGET")
    sp = prs.add_parser("agent", help="GET /ca/admin/ca/getStatus (and getInfo)")
    sp.add_argument("url", metavar="URL")
    sp.add_argument("--cafile")
    sp.add_argument("--cert")
    sp.add_argument("--key")
    sp.add_argument("--timeout", type=float, default=3.0)
    sp.set_defaults(func=_lazy("probes.agent"))
    sp = prs.add_parser("ldap", help="replication agreements, RUV and CRL records of one 389-DS")
    sp.add_argument("url", metavar="URL")
    sp.add_argument("--bind-dn", required=True)
    sp.add_argument("--password-file", required=True)
    sp.add_argument("--cafile")
    sp.add_argument("--starttls", action="store_true")
    sp.add_argument("--timeout", type=float, default=3.0)
    sp.add_argument("--basedn", default="o=pki-tomcat-CA")
    sp.set_defaults(func=_lazy("probes.directory"))

    lab = sub.add_parser("lab", help="a local test cluster (up, down, status, kill) and its simulated CA")
    labs = lab.add_subparsers(dest="lab_command", required=True, metavar="TOOL")
    sp = labs.add_parser("ca", help="run a simulated Dogtag CA")
    sp.add_argument("--cs-cfg", required=True)
    sp.add_argument("--port", type=int, required=True)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--cert", required=True)
    sp.add_argument("--key", required=True)
    sp.add_argument("--cafile", help="CA bundle that client certificates must chain to (agent paths)")
    sp.add_argument("--status-format", choices=("json", "xml"), default="json")
    sp.add_argument("--start-delay", type=float, default=0.0)
    sp.add_argument("--ldap-url")
    sp.add_argument("--ldap-bind-dn", default="cn=Directory Manager")
    sp.add_argument("--ldap-password-file")
    sp.add_argument("--crl-interval", type=float, default=2.0, help="seconds between CRL updates while master")
    sp.add_argument("--status-delay", type=float, default=0.0, help="fault: delay every getStatus answer by S seconds")
    sp.add_argument(
        "--status-fault",
        choices=("http503", "garbage", "deep-json", "utf16-dtd"),
        help="fault: getStatus answers 503 HTML, garbage, deep JSON or UTF-16 XML with a DTD",
    )
    sp.add_argument("--name", help="writer name recorded in LDAP (default: CS.cfg machineName)")
    sp.add_argument(
        "--signing-key", help="key of the first certificate in --cafile: sign CRLs with it (else the server key)"
    )
    sp.set_defaults(func=_lab("lab.simca"))

    lab_dir = "/tmp/ca-watchdog-lab"  # lab.ctl.DEFAULT_DIR; not imported: the lab's dependencies may be missing
    sp = labs.add_parser("up", help="start a local cluster and leave it running (until `lab down`)")
    sp.add_argument("--dir", default=lab_dir, help=f"the lab's directory (default {lab_dir})")
    sp.add_argument("--members", type=int, help="number of members, ca1..caN (2 to 9; default 3)")
    sp.add_argument("--with-ds", action="store_true", default=None, help="a real replicated 389-DS per member")
    sp.add_argument("--store", choices=("sqlite", "etcd"), help="the store (default sqlite; etcd: a lab etcd)")
    sp.add_argument("--base-port", type=int, help="CA agent ports from here, API +20, 389-DS +40, etcd +60 (17640)")
    sp.set_defaults(func=_lab("lab.ctl", "cli_up"))
    sp = labs.add_parser("down", help="stop everything the lab started and remove its directory")
    sp.add_argument("--dir", default=lab_dir, help=f"the lab's directory (default {lab_dir})")
    sp.set_defaults(func=_lab("lab.ctl", "cli_down"))
    sp = labs.add_parser("status", help="the lab's members and the state of their processes")
    sp.add_argument("--dir", default=lab_dir, help=f"the lab's directory (default {lab_dir})")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=_lab("lab.ctl", "cli_status"))
    sp = labs.add_parser("kill", help="inject a fault into a member: kill its CA, daemon or host, or freeze its CA")
    sp.add_argument("member", metavar="MEMBER")
    sp.add_argument(
        "what", nargs="?", choices=("ca", "daemon", "host", "freeze"), default="ca",
        help="ca: SIGKILL the CA (default); daemon: SIGKILL the daemon; host: SIGKILL every process of the "
        "member and its 389-DS (`lab up` brings them back); freeze: SIGSTOP the CA (a hung Tomcat)",
    )  # fmt: skip
    sp.add_argument("--dir", default=lab_dir, help=f"the lab's directory (default {lab_dir})")
    sp.set_defaults(func=_lab("lab.ctl", "cli_kill"))

    sp = sub.add_parser("demo", help="a local three-node cluster whose master is killed and replaced, live")
    sp.add_argument("--json", action="store_true", help="print only a JSON summary")
    sp.add_argument("--keep", action="store_true", help="leave the lab running (remove it with `lab down --dir`)")
    sp.set_defaults(func=_lab("lab.demo"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .cscfg import CSCfgError, CSCfgWriteError

    args = build_parser().parse_args(argv)
    if hasattr(args, "config") and args.config is None:
        args.config = args.global_config or DEFAULT_CONFIG_PATH
    try:
        rc: int = args.func(args)
        return rc
    except (CSCfgError, ConfigError) as exc:
        _err(str(exc))
        return EXIT_BAD_INPUT
    except CSCfgWriteError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except ValueError as exc:
        _err(str(exc))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

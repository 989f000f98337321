"""`tightrope`: the command line.

serve / worker / keys run the service; audit runs the engine in process (no server);
submit is a client of a running service; gate is the CI gate (in process or on a service);
verify checks a report's signature; demo runs the whole service once, end to end.
Heavy imports (uvicorn, the engine, torch) happen inside the commands that need them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
keys_app = typer.Typer(no_args_is_help=True, help="API keys.")
app.add_typer(keys_app, name="keys")
storage_app = typer.Typer(no_args_is_help=True, help="The object store (TIGHTROPE_STORAGE_URL).")
app.add_typer(storage_app, name="storage")

out = Console()
err = Console(stderr=True)


class CliError(typer.Exit):
    """An early exit whose cause was printed; `message` keeps it for files that report it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(code)
        self.message = message


def _fail(message: str, code: int = 2) -> CliError:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return CliError(message, code)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise _fail(f"{what} file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise _fail(f"{what} {path} is not valid JSON: {exc}") from None


def _validation_message(exc: ValidationError, what: str) -> str:
    lines = [f"{what} is invalid:"]
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8000,
) -> None:
    """Run the HTTP gateway (uvicorn, with the header-size limit of docs/security.md)."""
    # The gateway is an entry point the CLI starts, not a library it uses: imported by name so
    # that nothing outside service.api depends on the HTTP layer (tests/test_layers.py).
    server = importlib.import_module("service.api.server")
    _check_start("gateway")
    server.run(host=host, port=port)


def _check_start(role: str) -> None:
    """Refuse to start (exit 2, the cause on stderr) when the object store cannot be used, or,
    for a worker, when its signing key or callback secret is not the gateway's."""
    from service.settings import get_settings
    from service.storage.startup import StartRefused, check_gateway_start, check_worker_start

    check = check_gateway_start if role == "gateway" else check_worker_start
    try:
        check(get_settings())
    except StartRefused as exc:
        raise _fail(f"the {role} cannot start: {exc}") from None


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    gpus: Annotated[
        str | None,
        typer.Option(
            help="`all` or GPU indices (0,1,...): one worker per GPU, pinned with "
            "CUDA_VISIBLE_DEVICES, reading the GPU queue, then the CPU queue"
        ),
    ] = None,
    concurrency: Annotated[
        int, typer.Option(min=0, help="Workers for the CPU queue (audits with device cpu/auto)")
    ] = 1,
    queues: Annotated[
        str | None,
        typer.Option(help="Comma-separated queues of the CPU workers, instead of the CPU queue"),
    ] = None,
    admission: Annotated[
        bool,
        typer.Option(
            help="One more worker reading only the admission queue (admissions, callbacks), "
            "so a long audit never delays them; --no-admission e.g. on a second GPU host"
        ),
    ] = True,
    name: Annotated[
        str | None,
        typer.Option(
            envvar="TIGHTROPE_WORKER_NAME",
            help="A prefix of this process's worker names (`<name>-cpu1@host`), so that two "
            "`tightrope worker` on one host are told apart (heartbeats, who ran each shard)",
        ),
    ] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "info",
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the workers it would start (name, queues, GPU)"),
    ] = False,
) -> None:
    """Run supervised Celery workers (each restarted whenever it exits); SIGTERM stops them
    all. Extra arguments go to every `celery worker` (e.g. --without-gossip)."""
    import logging
    import re
    from dataclasses import replace

    from workers.execution.supervisor import parse_gpus, plan_workers, supervise_workers

    extra = list(ctx.args)
    if any(a in ("-n", "--hostname") or a.startswith("--hostname=") for a in extra):
        raise _fail("--hostname is set per worker (cpu1@%h, gpu0@%h, admission@%h)")
    try:
        gpu_indices = parse_gpus(gpus) if gpus is not None else []
        cpu_queues = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
        children = plan_workers(
            gpus=gpu_indices, concurrency=concurrency, queues=cpu_queues, admission=admission
        )
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if name:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
            raise _fail("--name: letters, digits, '.', '_' and '-' only (at most 64)")
        children = [replace(child, name=f"{name}-{child.name}") for child in children]
    if dry_run:
        for child in children:
            gpu = child.env.get("CUDA_VISIBLE_DEVICES")
            pinned = "" if gpu is None else f"  CUDA_VISIBLE_DEVICES={gpu!r}"
            out.print(
                f"{child.hostname}  {','.join(child.queues)}{pinned}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor: %(message)s")
    _check_start("worker")
    raise typer.Exit(supervise_workers(children, ["--loglevel", loglevel, *extra]))


@storage_app.command("migrate")
def storage_migrate(
    data_dir: Annotated[
        Path | None,
        typer.Option(help="The local data directory to copy from (default: TIGHTROPE_DATA_DIR)"),
    ] = None,
) -> None:
    """Copy a data directory's blobs, reports and artifacts into the bucket of
    TIGHTROPE_STORAGE_URL, verifying every object (read back, sha256). Safe to run twice:
    objects already there with the same sha256 are checked and left as they are."""
    from service.settings import get_settings
    from service.storage.migrate import migrate
    from service.storage.objects import StorageError, object_store

    settings = get_settings()
    if not settings.storage_url:
        raise _fail("TIGHTROPE_STORAGE_URL is empty: set it to the bucket to copy into (s3://…)")
    source = data_dir or settings.data_dir
    if not source.is_dir():
        raise _fail(f"no data directory at {source}")
    target = object_store(settings)
    try:
        target.check()
        report = migrate(source, target, progress=lambda key: err.print(f"copied {key}"))
    except StorageError as exc:
        raise _fail(f"{exc} (nothing is lost: run the command again)") from None
    out.print(
        f"{report.copied} copied ({report.bytes_copied} bytes), {report.already} already there "
        f"and verified, {len(report.problems)} problem(s) → {target.description}",
        highlight=False,
        soft_wrap=True,
    )
    for problem in report.problems:
        err.print(f"[red]problem:[/red] {problem}", highlight=False, markup=True)
    if report.problems:
        raise typer.Exit(1)


@app.command("worker-health")
def worker_health() -> None:
    """Exit 0 when a worker on this host wrote a fresh heartbeat (container health checks)."""
    import socket
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import select

    from service.db.session import session_scope
    from service.db.tables import WorkerHeartbeat
    from service.settings import get_settings

    fresh_after = datetime.now(UTC) - timedelta(seconds=get_settings().worker_stale_seconds)
    with session_scope() as session:
        row = session.scalars(
            select(WorkerHeartbeat)
            .where(WorkerHeartbeat.hostname == socket.gethostname())
            .where(WorkerHeartbeat.last_seen >= fresh_after)
        ).first()
    if row is None:
        raise _fail("no fresh worker heartbeat on this host", 1)
    out.print(f"worker {row.name} alive, last heartbeat {row.last_seen.isoformat()}")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to (created if new)")],
) -> None:
    """Create an API key and print it once (only its hash is stored)."""
    from service.db.keys import create_api_key
    from service.db.migrate import upgrade_to_head
    from service.db.session import session_scope
    from service.settings import get_settings

    upgrade_to_head(get_settings().resolved_database_url)
    with session_scope() as session:
        key = create_api_key(session, tenant)
    out.print(key, highlight=False, soft_wrap=True)
    _print_database()


def _print_database() -> None:
    """Name the database the keys commands used (on stderr, password hidden): a gateway sees
    these keys only with the same TIGHTROPE_DATA_DIR / TIGHTROPE_DATABASE_URL."""
    from sqlalchemy.engine import make_url

    from service.settings import get_settings

    url = make_url(get_settings().resolved_database_url).render_as_string(hide_password=True)
    err.print(f"database: {url}", highlight=False, soft_wrap=True)


def _when(moment: Any) -> str:
    from datetime import UTC

    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys")] = None,
) -> None:
    """List API keys, oldest first: id, prefix, tenant, created, revoked (never the secret,
    which is not stored)."""
    from service.db.keys import list_api_keys
    from service.db.migrate import upgrade_to_head
    from service.db.session import session_scope
    from service.settings import get_settings

    upgrade_to_head(get_settings().resolved_database_url)
    with session_scope() as session:
        rows = [
            (key.id, key.prefix, name, _when(key.created_at), _when(key.revoked_at))
            for key, name in list_api_keys(session, tenant)
        ]
    _print_database()
    if not rows:
        err.print("no API keys" + (f" for tenant {tenant!r}" if tenant else ""), highlight=False)
        return
    header = ("id", "prefix", "tenant", "created", "revoked")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.print(line.rstrip(), highlight=False, soft_wrap=True, markup=False)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[
        str,
        typer.Argument(
            help="The key's id (key_…), the start of the key as `keys list` shows it "
            "(tr_…), or the whole key"
        ),
    ],
) -> None:
    """Revoke an API key: requests with it are refused (401) from then on; a running gateway
    may accept it for up to TIGHTROPE_API_KEY_CACHE_SECONDS more. Exit 0 when revoked (or
    already revoked), 1 when no key matches, 2 when several do."""
    from service.db.keys import find_api_keys, revoke_key
    from service.db.migrate import upgrade_to_head
    from service.db.session import session_scope
    from service.settings import get_settings

    upgrade_to_head(get_settings().resolved_database_url)
    _print_database()
    wanted = key.strip().removesuffix("…")
    if not wanted:
        raise _fail("name a key: its id, its prefix or the key itself")
    with session_scope() as session:
        found = find_api_keys(session, wanted)
        if len(found) > 1:
            names = ", ".join(f"{k.id} ({k.prefix}…)" for k in found)
            raise _fail(f"{wanted!r} matches {len(found)} keys: {names}; name one by its id")
        if not found:
            raise _fail(f"no API key matches {wanted!r} (see `tightrope keys list`)", 1)
        target = found[0]
        if not revoke_key(session, target):
            out.print(f"{target.id} ({target.prefix}…) was already revoked", highlight=False)
            return
    out.print(f"revoked {target.id} ({target.prefix}…)", highlight=False)


@app.command()
def audit(
    model: Annotated[Path, typer.Option(help="Model file (.pt, .pt2, .safetensors, .onnx)")],
    spec: Annotated[Path, typer.Option(help="Model spec JSON")],
    config: Annotated[
        Path, typer.Option(help="Audit config JSON (an AuditRequest without model_id)")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for report.json and artifacts")],
    quiet: Annotated[bool, typer.Option(help="No progress bar")] = False,
    sign_key: Annotated[
        Path | None,
        typer.Option(help="Sign report.json with this Ed25519 private key (PEM; created if new)"),
    ] = None,
) -> None:
    """Run an audit in this process, without a server; writes report.json, report.html and the
    artifacts. `{"file": PATH}` references are resolved relative to the config file."""
    report = _run_local_audit(model, spec, config, out_dir, quiet, sign_key)
    out.print(f"verdict: [bold]{report['verdict']}[/bold]")
    out.print(f"report: {out_dir / 'report.json'}", highlight=False, soft_wrap=True)


def _run_local_audit(
    model: Path,
    spec: Path,
    config: Path,
    out_dir: Path,
    quiet: bool,
    sign_key: Path | None,
    compare_with: Path | None = None,
) -> dict[str, Any]:
    """The engine in process: report.json (signed when a key is given) and report.html. With
    `compare_with`, that model file (same spec) is audited beside it and compared."""
    from schemas.audits import AuditConfig
    from schemas.model_spec import ModelSpec
    from workers.cli.progress import progress_display

    try:
        model_spec = ModelSpec.model_validate(_read_json(spec, "spec"))
    except ValidationError as exc:
        raise _fail(_validation_message(exc, "spec")) from None
    raw = _read_json(config, "config")
    if isinstance(raw, dict):
        raw.pop("model_id", None)
    try:
        audit_config = AuditConfig.model_validate(raw)
    except ValidationError as exc:
        raise _fail(_validation_message(exc, "config")) from None
    if not model.is_file():
        raise _fail(f"model file not found: {model}")
    private_key = _load_sign_key(sign_key) if sign_key is not None else None
    from workers.engine.entry_points import run_audit
    from workers.engine.rejection import ModelRejected
    from workers.engine.screening import detect_format
    from workers.shared.errors import EngineInputError

    fmt = detect_format(model)
    if fmt is None:
        raise _fail(f"model {model}: not a TorchScript, torch.export, safetensors or ONNX file")
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    reference = None
    if compare_with is not None:
        from schemas.comparisons import ReferenceModel

        reference_format = detect_format(compare_with)
        if reference_format is None:
            raise _fail(f"--compare-with {compare_with}: not a model file this engine reads")
        reference = ReferenceModel(
            file=str(compare_with.resolve()),
            format=reference_format,
            sha256=hashlib.sha256(compare_with.read_bytes()).hexdigest(),
            spec=model_spec,
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    with progress_display(err, quiet=quiet) as bar:

        def on_progress(fraction: float, check: str | None, message: str | None) -> None:
            bar.update(fraction, " · ".join(p for p in (check, message) if p) or "running")

        try:
            report: dict[str, Any] = run_audit(
                model,
                fmt,
                model_spec,
                audit_config,
                out_dir=out_dir,
                model_sha256=sha,
                base_dir=config.resolve().parent,
                on_progress=on_progress,
                reference=reference,
            )
        except (EngineInputError, ModelRejected) as exc:
            raise _fail(str(exc)) from None
    if private_key is not None:
        from schemas.canonical import canonical_json
        from service.reports.signatures import sign_report

        report = sign_report(report, private_key)
        (out_dir / "report.json").write_text(canonical_json(report), encoding="utf-8")
    from workers.reporting.html import write_report_html

    write_report_html(out_dir, report)
    return report


def _load_sign_key(path: Path) -> Any:
    from service.reports.signatures import KeyFormatError, load_or_create_private_key

    try:
        return load_or_create_private_key(path)
    except (OSError, KeyFormatError, ValueError) as exc:
        raise _fail(f"signing key {path}: {exc}") from None


@app.command()
def submit(
    model: Annotated[Path, typer.Option(help="Model file")],
    spec: Annotated[Path, typer.Option(help="Model spec JSON")],
    config: Annotated[Path, typer.Option(help="Audit config JSON (model_id is filled in)")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where report.json is written")],
    server: Annotated[str, typer.Option(envvar="TIGHTROPE_SERVER")] = "http://127.0.0.1:8000",
    key: Annotated[str, typer.Option(envvar="TIGHTROPE_API_KEY", help="API key")] = "",
    quiet: Annotated[bool, typer.Option(help="No progress bar")] = False,
) -> None:
    """Upload a model, submit an audit, follow it, and save its report."""
    import httpx

    from workers.cli.client import ApiError, RemoteAuditFailed, TightropeClient, run_remote_audit

    if not key:
        raise _fail("an API key is needed: --key or TIGHTROPE_API_KEY")
    try:
        with TightropeClient(server, key) as client:
            verdict = run_remote_audit(
                client,
                model,
                _read_json(spec, "spec"),
                _read_json(config, "config"),
                out_dir,
                quiet,
            )
    except RemoteAuditFailed as exc:
        raise _fail(str(exc), exc.code) from None
    except (ApiError, TimeoutError) as exc:
        raise _fail(str(exc)) from None
    except httpx.TransportError as exc:
        raise _fail(f"cannot reach the service at {server}: {exc}") from None
    raise typer.Exit(0 if verdict in ("pass", "info") else 1)


@app.command()
def verify(
    report: Annotated[Path, typer.Argument(help="report.json to check")],
    key: Annotated[
        Path,
        typer.Option(help="Public key: a PEM file, or the JSON of GET /v1/signing-key saved"),
    ],
) -> None:
    """Check a report's Ed25519 signature: exit 0 when valid, 1 when not (any changed byte of
    its content fails), 2 when a file cannot be read."""
    from service.reports.signatures import KeyFormatError, load_public_key
    from service.reports.signatures import verify as verify_signature

    document = _read_json(report, "report")
    try:
        public_key = load_public_key(key.read_bytes())
    except FileNotFoundError:
        raise _fail(f"key file not found: {key}") from None
    except KeyFormatError as exc:
        raise _fail(f"key {key}: {exc}") from None
    if not isinstance(document, dict) or not verify_signature(document, public_key):
        err.print(f"[red]invalid:[/red] {report} is not signed by this key", highlight=False)
        raise typer.Exit(1)
    out.print(f"valid: {report} signed by key {document['signature']['key_id']}", highlight=False)


# An audit's verdict is pass, fail or info; a check's may be `proven` too, a pass (a
# worst_case threshold proven by certified bounds), should a service ever answer it.
GATE_CODES = {"pass": 0, "proven": 0, "info": 0, "fail": 1}


@app.command()
def gate(
    model: Annotated[Path, typer.Option(help="Model file")],
    spec: Annotated[Path, typer.Option(help="Model spec JSON")],
    config: Annotated[Path, typer.Option(help="Audit config JSON")],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where report.json, report.html, junit.xml go")
    ] = Path("tightrope-report"),
    server: Annotated[
        str | None,
        typer.Option(envvar="TIGHTROPE_SERVER", help="Audit on this service; default in process"),
    ] = None,
    key: Annotated[str, typer.Option(envvar="TIGHTROPE_API_KEY", help="API key (--server)")] = "",
    sign_key: Annotated[
        Path | None, typer.Option(help="In process: sign with this Ed25519 private key (PEM)")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar")] = False,
    compare_with: Annotated[
        str | None,
        typer.Option(
            help="MODEL_FILE or MODEL_ID: also audit this (released) model on the same inputs "
            "and seeds, and fail on a regression beyond each check's max_regression; a model "
            "id needs --server; a file shares --spec"
        ),
    ] = None,
) -> None:
    """A CI gate: audit the model (on --server, or in process), write report.json, report.html
    and junit.xml, and exit 0 on pass or info, 1 on fail (a threshold, or with --compare-with
    a regression), 2 on an error."""
    try:
        verdict = _gate(model, spec, config, out_dir, server, key, sign_key, quiet, compare_with)
    except typer.Exit as exc:
        if not exc.exit_code:
            raise typer.Exit(0) from None
        # every early exit is an error (2), and CI still gets files that say why
        _write_gate_error(out_dir, getattr(exc, "message", "the gate stopped early"))
        raise typer.Exit(2) from None
    except Exception as exc:  # a crash must not read as a failed verdict (1)
        error = _fail(f"{type(exc).__name__}: {exc}")
        _write_gate_error(out_dir, error.message)
        raise error from None
    if not (out_dir / "junit.xml").is_file():
        err.print("warning: the service returned no junit.xml")
    raise typer.Exit(GATE_CODES.get(verdict, 2))


def _print_brackets(report: dict[str, Any]) -> None:
    """Each check with certified bounds (worst_case's `certify`): its verdict and brackets."""
    from service.reports.findings import bracket_lines, findings

    for finding in findings(report):
        lines = bracket_lines(finding.result)
        if lines:
            out.print(f"{finding.name}: {finding.verdict}", markup=False, highlight=False)
            for line in lines:
                out.print(f"  {line}", markup=False, highlight=False)


def _write_gate_error(out_dir: Path, message: str) -> None:
    """On exit 2: junit.xml with one errored test case and a report.json stating the error,
    replacing any earlier run's files, so a CI step that reads them (`if: always()`) shows the
    cause instead of finding nothing or a stale verdict."""
    from service.reports.junit import render_error_junit

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.html").unlink(missing_ok=True)
        (out_dir / "junit.xml").write_text(render_error_junit(message), encoding="utf-8")
        error = {
            "status": "error",
            "verdict": None,
            "error": {"title": "gate error", "detail": message},
        }
        (out_dir / "report.json").write_text(json.dumps(error, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:  # an unwritable --out is itself the error the user sees
        err.print(f"[red]error:[/red] cannot write the error files to {out_dir}: {exc}")


def _gate(
    model: Path,
    spec: Path,
    config: Path,
    out_dir: Path,
    server: str | None,
    key: str,
    sign_key: Path | None,
    quiet: bool,
    compare_with: str | None = None,
) -> str:
    from service.reports.junit import render_junit

    if server is None:
        reference = None
        if compare_with is not None:
            reference = Path(compare_with)
            if not reference.is_file():
                raise _fail(
                    f"--compare-with {compare_with}: no such model file (a model id needs --server)"
                )
        report = _run_local_audit(model, spec, config, out_dir, quiet, sign_key, reference)
        (out_dir / "junit.xml").write_text(render_junit(report), encoding="utf-8")
        out.print(f"verdict: [bold]{report['verdict']}[/bold]")
        _print_brackets(report)
        return str(report["verdict"])
    import httpx

    from workers.cli.client import ApiError, RemoteAuditFailed, TightropeClient, run_remote_audit

    if not key:
        raise _fail("an API key is needed with --server: --key or TIGHTROPE_API_KEY")
    if not model.is_file():
        raise _fail(f"model file not found: {model}")
    try:
        with TightropeClient(server, key) as client:
            return run_remote_audit(
                client,
                model,
                _read_json(spec, "spec"),
                _read_json(config, "config"),
                out_dir,
                quiet,
                reuse_model=True,
                junit=True,
                rejected_code=2,
                compare_with=compare_with,
            )
    except RemoteAuditFailed as exc:
        raise _fail(str(exc), exc.code) from None
    except (ApiError, TimeoutError, OSError) as exc:
        raise _fail(str(exc)) from None
    except httpx.TransportError as exc:
        raise _fail(f"cannot reach the service at {server}: {type(exc).__name__}: {exc}") from None


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Where the report is written")] = Path(
        "demo-out"
    ),
) -> None:
    """Start the service on its embedded defaults, audit the bundled model through the HTTP
    API, print the verdict and the report's path, and stop everything it started."""
    from workers.cli.demo import run_demo

    raise typer.Exit(run_demo(out_dir))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
